"""FID sample sets: labels, shards, atomic assembly, resuming after kill -9, torchrun with gloo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xar_infer.cli import generate_main
from xar_infer.fid import SampleSet, fid_labels, pending_batches, read_labels_file
from xar_infer.pipeline import XARPipeline, to_uint8

from cpu_threads import one_torch_thread, subprocess_env  # noqa: F401  (autouse: this module runs on one thread)

RUN_CLI = "import sys; from xar_infer.cli import generate_main; sys.exit(generate_main(sys.argv[1:]))"


def test_fid_labels_follow_the_released_order():
    labels = fid_labels(50_000, 1000)
    assert labels[:50].tolist() == [0] * 50 and labels[50] == 1 and labels[-1] == 999
    assert np.bincount(labels).tolist() == [50] * 1000
    assert fid_labels(5, 2).tolist() == [0, 0, 0, 1, 1]


def test_labels_file(tmp_path):
    (tmp_path / "l.txt").write_text("3, 1\n4 1 5\n")
    assert read_labels_file(tmp_path / "l.txt", 10).tolist() == [3, 1, 4, 1, 5]
    np.save(tmp_path / "l.npy", np.array([[2, 7]]))
    assert read_labels_file(tmp_path / "l.npy", 10).tolist() == [2, 7]
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\)"):
        read_labels_file(tmp_path / "l.txt", 5)
    (tmp_path / "bad.txt").write_text("1 two")
    with pytest.raises(ValueError, match="integer class ids"):
        read_labels_file(tmp_path / "bad.txt", 10)


def test_pending_batches_cover_what_is_missing():
    done = np.zeros(10, dtype=bool)
    assert pending_batches(done, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    done[[1, 5, 6]] = True
    assert pending_batches(done, 4) == [range(0, 1), range(2, 4), range(4, 5), range(7, 8), range(8, 10)]
    assert pending_batches(np.ones(3, dtype=bool), 2) == []


def _images(start, n):
    return (np.arange(start, start + n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 5, 3), dtype=np.uint8))


def test_shards_assemble_into_one_npz_in_order(tmp_path):
    settings = {"num_images": 7, "seed": 0}
    samples = SampleSet(tmp_path / "s.npz", settings)
    samples.prepare()
    for start, n in ((4, 3), (0, 2)):
        samples.write(start, _images(start, n))
    assert samples.finished().tolist() == [True, True, False, False, True, True, True]
    with pytest.raises(RuntimeError, match=r"images \[2, 3\]"):
        samples.assemble()
    samples.write(2, _images(2, 2))
    samples.assemble()
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (7, 4, 5, 3)
    np.testing.assert_array_equal(arr, _images(0, 7))
    assert not samples.parts.exists()

    # The same images written in other shards give the same bytes.
    other = SampleSet(tmp_path / "t.npz", settings)
    other.prepare()
    for start, n in ((0, 3), (3, 1), (4, 3)):
        other.write(start, _images(start, n))
    other.assemble()
    assert (tmp_path / "t.npz").read_bytes() == (tmp_path / "s.npz").read_bytes()


def test_a_job_resumes_only_with_its_own_settings(tmp_path):
    SampleSet(tmp_path / "s.npz", {"num_images": 3, "seed": 0}).prepare()
    SampleSet(tmp_path / "s.npz", {"num_images": 3, "seed": 0}).prepare()  # same job: fine
    with pytest.raises(ValueError, match=r"other settings \(seed\).*--overwrite"):
        SampleSet(tmp_path / "s.npz", {"num_images": 3, "seed": 1}).prepare()
    (tmp_path / "done.npz").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        SampleSet(tmp_path / "done.npz", {"num_images": 3}).prepare()


def _job(checkpoint, vae, npz, labels_file, *extra):
    return ["--checkpoint", str(checkpoint), "--vae", str(vae), "--npz", str(npz), "--labels-file", str(labels_file),
            "--steps", "2", "--cfg", "2.0", "--device", "cpu", "--quiet", *map(str, extra)]


@pytest.fixture
def labels_file(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text(" ".join(str(i % 7) for i in range(12)))
    return path


def test_npz_holds_the_same_images_as_the_pipeline(tiny_checkpoint, tiny_vae_checkpoint, labels_file, tmp_path):
    assert generate_main(_job(tiny_checkpoint, tiny_vae_checkpoint, tmp_path / "a.npz", labels_file, "--batch-size", 5)) == 0
    arr = np.load(tmp_path / "a.npz")["arr_0"]
    assert arr.shape == (12, 32, 32, 3) and arr.dtype == np.uint8
    pipe = XARPipeline.from_pretrained(tiny_checkpoint, vae=tiny_vae_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 7 for i in range(12)]
    expected = pipe(labels[9:12], num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in range(9, 12)]).images
    np.testing.assert_array_equal(arr[9:12], to_uint8(expected))
    # Another batch size, the same file.
    assert generate_main(_job(tiny_checkpoint, tiny_vae_checkpoint, tmp_path / "b.npz", labels_file, "--batch-size", 3)) == 0
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_a_killed_run_resumes_to_the_same_file(tiny_checkpoint, tiny_vae_checkpoint, labels_file, tmp_path):
    """kill -9 in the middle, rerun the same command: finished shards are kept, the result is the
    file an uninterrupted run writes."""
    reference = tmp_path / "reference.npz"
    assert generate_main(_job(tiny_checkpoint, tiny_vae_checkpoint, reference, labels_file, "--batch-size", 1)) == 0

    npz = tmp_path / "resumed.npz"
    argv = [sys.executable, "-c", RUN_CLI, *_job(tiny_checkpoint, tiny_vae_checkpoint, npz, labels_file, "--batch-size", 1)]
    env = subprocess_env(TRITON_INTERPRET="1")  # one thread, like the reference above: the same bits
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "resumed.npz.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.npy"))) < 3 and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list(parts.glob("*.npy")))
    assert 3 <= finished < 12, "the run must be killed part way"
    assert not npz.exists()

    loud = [a for a in argv if a != "--quiet"]  # the same command, reporting what it resumes
    done = subprocess.run(loud, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resumed_count = int(done.stdout.split("resuming")[1].split(":")[1].split()[0])
    assert resumed_count >= finished
    assert npz.read_bytes() == reference.read_bytes()
    assert not parts.exists() and not list(tmp_path.glob(".*.tmp"))


def test_two_processes_write_the_same_file_as_one(tiny_checkpoint, tiny_vae_checkpoint, labels_file, tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes every other batch, process 0 assembles. torchrun
    gives each process one thread; the one-process run uses one too (a CPU matmul's last bits can
    depend on the thread count, which moved 2 of 36,864 pixel values by one level here)."""
    single = tmp_path / "single.npz"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert generate_main(_job(tiny_checkpoint, tiny_vae_checkpoint, single, labels_file, "--batch-size", 2)) == 0
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "run.py"
    script.write_text(RUN_CLI.replace("; ", "\n"))
    double = tmp_path / "double.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default, made explicit
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                           *_job(tiny_checkpoint, tiny_vae_checkpoint, double, labels_file, "--batch-size", 2)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert double.read_bytes() == single.read_bytes()


def test_npz_option_errors(tiny_checkpoint, tiny_vae_checkpoint, labels_file, tmp_path, capsys):
    cases = [
        (["--npz", tmp_path / "x.png"], "--npz must name a .npz file"),
        (["--fid-labels"], "add --npz"),
        (["--npz", tmp_path / "x.npz", "--class", "3", "--fid-labels"], "--class cannot be combined"),
        (["--npz", tmp_path / "x.npz", "--grid", tmp_path / "g.png"], "cannot be combined with --latents-only, --grid"),
    ]
    for extra, message in cases:
        code = generate_main(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", *map(str, extra)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (extra, err)
    existing = tmp_path / "existing.npz"
    existing.write_bytes(b"results")
    assert generate_main(_job(tiny_checkpoint, tiny_vae_checkpoint, existing, labels_file)) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_bytes() == b"results"
