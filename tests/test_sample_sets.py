"""FID sample sets: labels, the work folder (lock, manifest, shard digests, assembly), resuming after
kill -9 at any moment, torchrun with gloo, and every refusal as one line that changes no file."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_transformer, save_released
from cpu_threads import one_torch_thread, subprocess_env  # noqa: F401  (autouse: this module runs on one thread)
from xar_infer.cli import generate_main
from xar_infer.errors import ResourceError, SampleSetError
from xar_infer.pipeline import XARPipeline, to_uint8
from xar_infer.sample_sets import (FolderLock, ProcessGroup, WorkFolder, claim, fid_labels, fid_labels_spread,
                                   pending_batches, read_labels_file)

RUN_CLI = "import sys; from xar_infer.cli import generate_main; sys.exit(generate_main(sys.argv[1:]))"
CPU = ProcessGroup(0, 1, torch.device("cpu"))
JOB = {"num_images": 7, "seed": 0}
SHAPE = (4, 5, 3)


# --------------------------------------------------------------------------------------------------
# Labels and batches
# --------------------------------------------------------------------------------------------------

def test_fid_labels_follow_the_released_order():
    labels = fid_labels(50_000, 1000)
    assert labels[:50].tolist() == [0] * 50 and labels[50] == 1 and labels[-1] == 999
    assert np.bincount(labels).tolist() == [50] * 1000
    assert fid_labels(5, 2).tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("num_images, num_classes", [(25, 10), (1500, 1000), (5, 2), (11, 10), (999, 1000)])
def test_fid_labels_spread_says_what_fid_labels_does(num_images, num_classes):
    """The message is checked against the counts fid_labels really gives, not against its own wording."""
    counts = np.bincount(fid_labels(num_images, num_classes), minlength=num_classes)
    text = fid_labels_spread(num_images, num_classes)
    claimed = np.full(num_classes, -1)
    for part in text.split(": ", 1)[1].split(" (")[0].split(", "):
        words = part.split()
        first, last = (int(x) for x in (words[1].split("-") * 2)[:2])
        claimed[first:last + 1] = 0 if words[-1] == "none" or words[-2] == "none" else int(words[3])
    assert claimed.tolist() == counts.tolist(), text
    assert fid_labels_spread(2000, 1000) is None


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


# --------------------------------------------------------------------------------------------------
# The work folder
# --------------------------------------------------------------------------------------------------

def _images(start, n):
    return np.arange(start, start + n, dtype=np.uint8)[:, None, None, None] * np.ones((1, *SHAPE), dtype=np.uint8)


def _open(path, job=JOB):
    """Claim and open the work folder of ``path`` (released at the end of the test)."""
    folder = WorkFolder(path)
    lock = folder.lock(overwrite=False)
    _open.locks.append(lock)
    folder.open(job, SHAPE)
    return folder


_open.locks = []


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    for lock in _open.locks:
        lock.release()
    _open.locks.clear()


def _shard_files(folder):
    return sorted(p.name for p in folder.parts.glob("*.npy"))


def test_shards_assemble_into_one_npz_in_order(tmp_path):
    folder = _open(tmp_path / "s.npz")
    for start, n in ((4, 3), (0, 2)):
        folder.write(start, _images(start, n))
    assert folder.finished().tolist() == [True, True, False, False, True, True, True]
    with pytest.raises(SampleSetError, match=r"2 images are missing \(first \[2, 3\]\)"):
        folder.assemble(overwrite=False)
    folder.write(2, _images(2, 2))
    assert folder.assemble(overwrite=False) == []
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (7, *SHAPE)
    np.testing.assert_array_equal(arr, _images(0, 7))
    assert not folder.parts.exists() and sorted(os.listdir(tmp_path)) == ["s.npz"]

    # The same images written in other shards, overlapping ones too, give the same bytes.
    other = _open(tmp_path / "t.npz")
    for start, n in ((0, 3), (3, 1), (2, 3), (4, 3)):
        other.write(start, _images(start, n))
    other.assemble(overwrite=False)
    assert (tmp_path / "t.npz").read_bytes() == (tmp_path / "s.npz").read_bytes()


def test_a_job_resumes_only_with_its_own_settings(tmp_path):
    folder = _open(tmp_path / "s.npz")
    folder.write(0, _images(0, 2))
    _open.locks.pop().release()
    assert _open(tmp_path / "s.npz").finished()[:2].all()  # the same job: resumes
    _open.locks.pop().release()
    with pytest.raises(SampleSetError, match=r"other settings \(seed\).*--overwrite"):
        _open(tmp_path / "s.npz", {**JOB, "seed": 1})
    assert _shard_files(folder)  # nothing was removed


def test_a_new_job_takes_over_a_folder_that_holds_no_image(tmp_path):
    """A run that failed before its first image (say fp16 overflow) recorded its settings; the corrected
    command must not be refused for them."""
    _open(tmp_path / "s.npz")
    _open.locks.pop().release()
    folder = _open(tmp_path / "s.npz", {**JOB, "dtype": "bf16"})
    folder.write(0, _images(0, 7))
    assert folder.assemble(overwrite=False) == []


def test_shards_without_a_manifest_are_refused(tmp_path):
    folder = _open(tmp_path / "s.npz")
    folder.write(0, _images(0, 2))
    _open.locks.pop().release()
    (folder.parts / "manifest.json").unlink()
    with pytest.raises(SampleSetError, match=r"s\.npz\.parts holds shards but no readable manifest\.json"):
        _open(tmp_path / "s.npz", {**JOB, "seed": 1})


def _corrupt(kind, path):
    data = path.read_bytes()
    if kind == "zeroed":
        path.write_bytes(data[:128] + bytes(len(data) - 128))
    elif kind == "float32":
        np.save(path, np.load(path).astype(np.float32))
    elif kind == "truncated":
        path.write_bytes(data[:len(data) // 5])
    elif kind == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("kind", ["zeroed", "float32", "truncated", "empty", "foreign"])
def test_a_bad_shard_is_named_and_made_again_and_good_ones_stay(tmp_path, kind):
    folder = _open(tmp_path / "s.npz")
    folder.write(0, _images(0, 3))
    folder.write(3, _images(3, 4))
    good, bad = sorted(folder.parts.glob("*.npy"))
    good_bytes = good.read_bytes()
    if kind == "foreign":  # a whole shard of the same range, made by a job with another seed
        other = _open(tmp_path / "o.npz", {**JOB, "seed": 5})
        other.write(3, _images(3, 4) + 1)
        foreign = next(other.parts.glob("00000003-*.npy"))
        bad.unlink()
        bad = foreign.rename(folder.parts / foreign.name)
    else:
        _corrupt(kind, bad)
    _open.locks.pop(0).release()

    with pytest.warns(UserWarning, match=rf"{bad.name} .*its images will be made again"):
        again = _open(tmp_path / "s.npz")
    assert again.finished().tolist() == [True] * 3 + [False] * 4
    assert good.read_bytes() == good_bytes and not bad.exists()
    again.write(3, _images(3, 4))
    again.assemble(overwrite=False)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"], _images(0, 7))


def test_a_shard_that_changes_after_its_check_is_never_assembled(tmp_path):
    folder = _open(tmp_path / "s.npz")
    folder.write(0, _images(0, 3))
    folder.write(3, _images(3, 4))
    bad = sorted(folder.parts.glob("*.npy"))[1]
    _corrupt("zeroed", bad)
    with pytest.warns(UserWarning, match="changed after it was checked"):
        assert folder.assemble(overwrite=False) == [range(3, 7)]
    assert not (tmp_path / "s.npz").exists() and not bad.exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    folder.write(3, _images(3, 4))
    assert folder.assemble(overwrite=False) == []
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"], _images(0, 7))


def test_stray_files_and_leftover_temporaries_are_removed(tmp_path):
    folder = _open(tmp_path / "s.npz")
    folder.write(0, _images(0, 7))
    _open.locks.pop().release()
    np.save(folder.parts / "00000000-00000007.npy", np.zeros((7, *SHAPE), np.uint8))  # looks like a shard
    (folder.parts / ".00000000-00000007.abc.npy.0123456789ab.tmp").write_bytes(b"half")
    leftover = tmp_path / ".s.npz.0123456789ab.tmp"
    leftover.write_bytes(b"half an npz")
    with pytest.warns(UserWarning, match="removing .*00000000-00000007.npy: not a shard"):
        again = _open(tmp_path / "s.npz")
    assert again.finished().all() and not leftover.exists()
    assert sorted(os.listdir(again.parts)) == sorted(["lock", "manifest.json", *_shard_files(again)])
    assert len(_shard_files(again)) == 1
    again.assemble(overwrite=False)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"], _images(0, 7))


def test_a_symlinked_or_misplaced_work_folder_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "s.npz.parts").symlink_to(elsewhere)
    with pytest.raises(SampleSetError, match="is a symlink"):
        WorkFolder(tmp_path / "s.npz").lock(overwrite=False)
    assert not os.listdir(elsewhere)
    (tmp_path / "t.npz.parts").write_bytes(b"a file")
    with pytest.raises(SampleSetError, match="is not a folder"):
        WorkFolder(tmp_path / "t.npz").lock(overwrite=False)


def test_a_set_that_cannot_fit_on_its_disk_is_refused(tmp_path):
    folder = WorkFolder(tmp_path / "s.npz")
    _open.locks.append(folder.lock(overwrite=False))
    with pytest.raises(ResourceError, match=r"needs about .* TB of disk .* free"):
        folder.open({"num_images": 10}, (10**6, 10**6, 3))  # 30 TB: more than any test machine's disk


HOLD_LOCK = """
import sys, time
from pathlib import Path
from xar_infer.sample_sets import WorkFolder
lock = WorkFolder(Path(sys.argv[1])).lock(overwrite=False)
print("held", flush=True)
time.sleep(600)
"""


def test_one_job_per_target_and_a_killed_holder_never_blocks(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "s.npz")], env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SampleSetError, match=r"another run is writing this sample set \(it holds .*s\.npz\.parts\)"):
            WorkFolder(tmp_path / "s.npz").lock(overwrite=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    folder = _open(tmp_path / "s.npz")  # the lock died with its process
    folder.write(0, _images(0, 7))
    assert folder.assemble(overwrite=False) == []


def test_a_failure_before_the_first_image_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="model load failed"):
        with claim(tmp_path / "s.npz", False, CPU):
            raise RuntimeError("model load failed")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        with claim(tmp_path / "s.npz", False, CPU) as folder:
            folder.open(JOB, SHAPE)
            folder.write(0, _images(0, 2))
            raise RuntimeError("the second batch failed")
    assert len(_shard_files(folder)) == 1  # kept for the next run


# --------------------------------------------------------------------------------------------------
# Through xar-generate
# --------------------------------------------------------------------------------------------------

def _job(checkpoint, vae, npz, labels_file, *extra):
    return ["--checkpoint", str(checkpoint), "--vae", str(vae), "--npz", str(npz), "--labels-file", str(labels_file),
            "--steps", "2", "--cfg", "2.0", "--device", "cpu", "--quiet", *map(str, extra)]


@pytest.fixture
def labels_file(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text(" ".join(str(i % 7) for i in range(12)))
    return path


@pytest.fixture
def reference(tiny_checkpoint, tiny_vae_checkpoint, labels_file, tmp_path_factory):
    """The file an uninterrupted run writes (seed 0, batch 5)."""
    path = tmp_path_factory.mktemp("reference") / "reference.npz"
    assert generate_main(_job(tiny_checkpoint, tiny_vae_checkpoint, path, labels_file, "--batch-size", 5)) == 0
    return path


def _sha256s(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("xar-generate: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_npz_holds_the_same_images_as_the_pipeline(tiny_checkpoint, tiny_vae_checkpoint, labels_file, reference,
                                                   tmp_path):
    arr = np.load(reference)["arr_0"]
    assert arr.shape == (12, 32, 32, 3) and arr.dtype == np.uint8
    pipe = XARPipeline.from_pretrained(tiny_checkpoint, vae=tiny_vae_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 7 for i in range(12)]
    expected = pipe(labels[9:12], num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in range(9, 12)]).images
    np.testing.assert_array_equal(arr[9:12], to_uint8(expected))
    # Another batch size, the same file.
    assert generate_main(_job(tiny_checkpoint, tiny_vae_checkpoint, tmp_path / "b.npz", labels_file, "--batch-size", 3)) == 0
    assert (tmp_path / "b.npz").read_bytes() == reference.read_bytes()


def _left_behind(folder: Path, target: Path) -> list[str]:
    """Everything of the job but its result: the work folder and temporary files."""
    return sorted(n for n in os.listdir(folder) if n.startswith(f".{target.name}") or n == f"{target.name}.parts")


def test_a_run_killed_at_random_while_writing_shards_resumes_to_the_same_file(
        tiny_checkpoint, tiny_vae_checkpoint, labels_file, reference, tmp_path):
    # Batches of 2: six shards. Each run is killed at a random moment of the shard after the two it
    # watches being written, so that at least one shard and the assembly are still to come however
    # fast the machine is (a fixed delay let a quiet machine finish the job before the kill).
    npz = tmp_path / "resumed.npz"
    argv = [sys.executable, "-c", RUN_CLI, *_job(tiny_checkpoint, tiny_vae_checkpoint, npz, labels_file, "--batch-size", 2)]
    parts = tmp_path / "resumed.npz.parts"
    rng = np.random.default_rng(7)

    def wait_for_shards(count: int, process: subprocess.Popen) -> float:
        deadline = time.time() + 120
        while len(list(parts.glob("*.npy"))) < count:
            assert process.poll() is None and time.time() < deadline, "the run stopped before writing its shards"
            time.sleep(0.001)
        return time.monotonic()

    for watched in (2, 4):  # the run is killed inside shard 3, then inside shard 5
        process = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shard_time = -wait_for_shards(watched - 1, process) + wait_for_shards(watched, process)
        time.sleep(rng.uniform(0, 0.8) * shard_time)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert not npz.exists(), "the run must be killed part way"
    assert generate_main([a for a in argv[3:]]) == 0
    assert npz.read_bytes() == reference.read_bytes()
    assert _left_behind(tmp_path, npz) == []


# A sample set made without a model (images drawn from each image's own generator), through the same
# claim / write_sample_set path as xar-generate --npz. It kills itself (SIGKILL) at one moment of the
# assembly, found by wrapping the file operations it makes: 'zip' as the .npz's last bytes are
# written, 'record' before the digest record, 'link' before and 'linked' after the .npz takes its
# name, 'cleanup' half way through removing the work folder ('none': no kill).
SYNTHETIC_SET = """
import os, signal, sys, zipfile
import numpy as np, torch
from xar_infer.sample_sets import ProcessGroup, SampleSetJob, claim, write_sample_set
moment, npz = sys.argv[1], sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
state = {"linked": False, "unlinks": 0}
real_close, real_replace, real_link, real_unlink = zipfile.ZipFile.close, os.replace, os.link, os.unlink
def close(self):
    if moment == "zip" and self.mode == "w":
        die()
    return real_close(self)
def replace(src, dst, *a, **k):
    if moment == "record" and str(dst).endswith("assembled.json"):
        die()
    return real_replace(src, dst, *a, **k)
def link(src, dst, *a, **k):
    if moment == "link" and str(dst).endswith(".npz"):
        die()
    real_link(src, dst, *a, **k)
    if str(dst).endswith(".npz"):
        state["linked"] = True
        if moment == "linked":
            die()
def unlink(path, *a, **k):
    real_unlink(path, *a, **k)
    if state["linked"] and ".parts" in str(path):
        state["unlinks"] += 1
        if moment == "cleanup" and state["unlinks"] == 2:
            die()
zipfile.ZipFile.close, os.replace, os.link, os.unlink = close, replace, link, unlink
images = lambda labels, generators: np.stack([torch.randint(0, 256, (6, 5, 3), generator=g, dtype=torch.uint8).numpy()
                                              for g in generators])
job = SampleSetJob(np.arange(12) % 7, 0, 5, (6, 5, 3), {"synthetic": True}, images)
group = ProcessGroup(0, 1, torch.device("cpu"))
try:
    with claim(npz, False, group) as folder:
        write_sample_set(folder, job, group, overwrite=False)
except FileExistsError as exc:
    print(exc)
    sys.exit(2)
"""


def _synthetic_set(moment: str, npz: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SYNTHETIC_SET, moment, str(npz)], env=subprocess_env(),
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def synthetic_reference(tmp_path_factory) -> Path:
    reference = tmp_path_factory.mktemp("synthetic") / "s.npz"
    assert _synthetic_set("none", reference).returncode == 0
    return reference


@pytest.mark.parametrize("moment", ["zip", "record", "link", "linked", "cleanup"])
def test_a_run_killed_during_assembly_ends_in_the_same_file_and_leaves_nothing(tmp_path, synthetic_reference, moment):
    run, reference = _synthetic_set, synthetic_reference
    npz = tmp_path / "s.npz"
    killed = run(moment, npz)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _left_behind(tmp_path, npz), "the kill must leave work behind"

    again = run("none", npz)
    if moment in ("linked", "cleanup"):  # the result was already published: the rerun only tidies up
        assert again.returncode == 2 and "s.npz already exists" in again.stdout, again.stderr
    else:
        assert again.returncode == 0, again.stderr
    assert npz.read_bytes() == reference.read_bytes()
    assert _left_behind(tmp_path, npz) == []


def test_two_runs_with_other_seeds_never_mix(tiny_checkpoint, tiny_vae_checkpoint, labels_file, reference, tmp_path):
    """Started together on one target: one writes the file, whole and of its own seed; the other refuses."""
    npz = tmp_path / "s.npz"
    runs = [subprocess.Popen([sys.executable, "-c", RUN_CLI,
                              *_job(tiny_checkpoint, tiny_vae_checkpoint, npz, labels_file, "--batch-size", 5, "--seed", seed)],
                             env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed in (0, 1)]
    outcomes = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    winner = [code for code, _ in outcomes].index(0)
    loser_err = outcomes[1 - winner][1]
    assert len(loser_err.splitlines()) == 1 and ("another run is writing" in loser_err or "already exists" in loser_err)
    if winner == 0:
        assert npz.read_bytes() == reference.read_bytes()
    else:
        arr = np.load(npz)["arr_0"]
        assert arr.shape == (12, 32, 32, 3) and not np.array_equal(arr, np.load(reference)["arr_0"])
    assert _left_behind(tmp_path, npz) == []


def test_resuming_with_other_weights_at_the_same_path_is_refused(tiny_vae_checkpoint, labels_file, tmp_path, capsys):
    checkpoint = save_released(random_transformer(seed=0), tmp_path / "model.pth")
    npz = tmp_path / "s.npz"
    job = [sys.executable, "-c", RUN_CLI, *_job(checkpoint, tiny_vae_checkpoint, npz, labels_file, "--batch-size", 1)]
    process = subprocess.Popen(job, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "s.npz.parts"
    while len(list(parts.glob("*.npy"))) < 2 and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    save_released(random_transformer(seed=1), checkpoint)  # replaced in place
    before = _sha256s(tmp_path)
    _one_line_error(capsys, generate_main(job[3:]), "other settings (transformer_sha256)", "--overwrite")
    assert _sha256s(tmp_path) == before


def test_npz_option_errors(tiny_checkpoint, tiny_vae_checkpoint, labels_file, tmp_path, capsys):
    cases = [
        (["--npz", tmp_path / "x.png"], "--npz must name a .npz file"),
        (["--fid-labels"], "add --npz"),
        (["--npz", tmp_path / "x.npz", "--class", "3", "--fid-labels"], "--class cannot be combined"),
        (["--npz", tmp_path / "x.npz", "--grid", tmp_path / "g.png"], "cannot be combined with --latents-only, --grid"),
        (["--npz", tmp_path / "x.npz", "--output", tmp_path / "out"], "leave out --output"),
        (["--npz", tmp_path / "missing" / "x.npz"], "does not exist; create it first"),
    ]
    before = _sha256s(tmp_path)
    for extra, message in cases:
        code = generate_main(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", *map(str, extra)])
        _one_line_error(capsys, code, message)
    existing = tmp_path / "existing.npz"
    existing.write_bytes(b"results")
    before = _sha256s(tmp_path)
    err = _one_line_error(capsys, generate_main(_job(tiny_checkpoint, tiny_vae_checkpoint, existing, labels_file)),
                          "--overwrite")
    assert "directory" not in err
    assert _sha256s(tmp_path) == before and not (tmp_path / "missing").exists()


def test_fid_labels_that_classes_do_not_divide_are_explained(tmp_path, capsys):
    code = generate_main(["--model", "xar-digits", "--npz", str(tmp_path / "s.npz"), "--fid-labels",
                          "--num-images", "25", "--steps", "1", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.splitlines() == ["xar-generate: warning: --fid-labels: 25 images over 10 classes: classes 0-7 get 3 "
                                "each, class 8 gets 1, class 9 gets none (the released order fills each class in "
                                "turn); a multiple of 10 gives every class the same count"]


def test_two_processes_write_the_same_file_as_one(tiny_checkpoint, tiny_vae_checkpoint, labels_file, tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes every other batch, process 0 assembles. torchrun
    gives each process one thread; the one-process run uses one too (a CPU matmul's last bits can
    depend on the thread count, which moved 2 of 36,864 pixel values by one level here)."""
    single = tmp_path / "single.npz"  # this module runs on one thread
    assert generate_main(_job(tiny_checkpoint, tiny_vae_checkpoint, single, labels_file, "--batch-size", 2)) == 0
    script = tmp_path / "run.py"
    script.write_text(RUN_CLI.replace("; ", "\n"))
    double = tmp_path / "double.npz"
    env = subprocess_env(threads=1)  # torchrun's default, made explicit
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                           *_job(tiny_checkpoint, tiny_vae_checkpoint, double, labels_file, "--batch-size", 2)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert double.read_bytes() == single.read_bytes()
    assert _left_behind(tmp_path, double) == []


def test_a_run_that_fails_before_its_first_image_does_not_block_the_corrected_one(
        tiny_checkpoint, tiny_vae_checkpoint, labels_file, tmp_path, capsys, monkeypatch):
    """fp16 overflows (its error advises bf16); the corrected command must then simply run."""
    from xar_infer import cli

    real_load = cli.load_pipeline

    def load(args, device):
        pipe = real_load(args, device)
        if args.dtype == "fp16":
            with torch.no_grad():
                pipe.transformer.pred.weight.mul_(1e6)  # outputs far beyond fp16's range
        return pipe

    monkeypatch.setattr(cli, "load_pipeline", load)
    npz = tmp_path / "s.npz"
    job = _job(tiny_checkpoint, tiny_vae_checkpoint, npz, labels_file, "--batch-size", 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16 is slow on CPU: said once, tested elsewhere
        code = generate_main(job + ["--dtype", "fp16"])
    assert code == 2 and "use dtype=torch.bfloat16" in capsys.readouterr().err
    assert _left_behind(tmp_path, npz) == []
    assert generate_main(job + ["--dtype", "bf16"]) == 0
    assert np.load(npz)["arr_0"].shape == (12, 32, 32, 3)
