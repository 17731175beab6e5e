"""Bad input, property-based: every invalid argument is refused with a message naming it, in the API
and in the CLI (one line on stderr, exit status 2, no traceback); and concurrent use is safe."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xar_infer import InvalidArgumentError, XARPipeline
from xar_infer.cli import generate_main
from xar_infer.pipeline import NumericalError

from conftest import random_transformer

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pipe():
    pipe = XARPipeline(random_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 1)
    return pipe([1], output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)


@FAST
@given(steps=st.one_of(st.integers(max_value=0), st.integers(min_value=1001), st.floats(), st.booleans(),
                       st.lists(st.integers(1, 5), max_size=3)))
def test_bad_step_counts(pipe, steps):
    with pytest.raises(ValueError, match="num_inference_steps must be"):
        _call(pipe, num_inference_steps=steps)


@FAST
@given(scale=st.one_of(st.floats(max_value=0.999), st.just(math.nan), st.just(math.inf), st.text(max_size=3)))
def test_bad_guidance_scales(pipe, scale):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 1"):
        _call(pipe, guidance_scale=scale)


@FAST
@given(label=st.one_of(st.integers(max_value=-1), st.integers(min_value=1000)))
def test_class_ids_out_of_range(pipe, label):
    with pytest.raises(ValueError, match="negative|out of range"):
        pipe([label], output_type="latent", num_inference_steps=1)


@FAST
@given(interval=st.tuples(st.floats(allow_nan=True), st.floats(allow_nan=True)).filter(
    lambda lh: not (0 <= lh[0] <= lh[1] <= 1)))
def test_bad_guidance_intervals(pipe, interval):
    with pytest.raises(ValueError, match="guidance_interval must be"):
        _call(pipe, guidance_interval=interval)


@pytest.mark.parametrize("generator, named", [
    (0, "generator must be a torch.Generator, a list of one per image, or None; got int 0"),
    ("seed", "generator must be a torch.Generator, .* got str 'seed'"),
    (np.random.default_rng(0), "generator must be a torch.Generator, .* got Generator"),
    ([torch.Generator(), 7], r"generator\[1\] is a int, not a torch.Generator"),
    ([torch.Generator()] * 3, "generator: got 3 generators for 2 images"),
    ([], "generator: got 0 generators for 2 images"),
])
def test_bad_generators_are_named(pipe, generator, named):
    with pytest.raises(InvalidArgumentError, match=named):
        pipe([1, 2], output_type="latent", num_inference_steps=1, generator=generator)


def test_generators_are_checked_before_the_progress_bar_starts(capsys):
    pipe = XARPipeline(random_transformer())  # progress bar on
    with pytest.raises(InvalidArgumentError, match="generator"):
        pipe([1], output_type="latent", num_inference_steps=1, generator=0)
    assert capsys.readouterr().err == ""


CLI_BAD = st.one_of(
    st.tuples(st.just("--steps"), st.integers(max_value=0).map(str)),
    st.tuples(st.just("--cfg"), st.one_of(st.floats(max_value=0.999, allow_nan=False), st.just(math.nan)).map(str)),
    st.tuples(st.just("--batch-size"), st.integers(max_value=0).map(str)),
    st.tuples(st.just("--num-images"), st.integers(max_value=0).map(str)),
    st.tuples(st.just("--class"), st.integers(max_value=-1).map(str)),
    st.tuples(st.just("--device"), st.sampled_from(["gpu", "cuda:7", "tpu", "meta"])),
    st.tuples(st.just("--sha256"), st.text(alphabet="0123456789abcdefxyz", max_size=70).filter(lambda t: len(t) != 64 or "x" in t)),
)


@FAST
@given(option=CLI_BAD)
def test_cli_refuses_bad_values_in_one_line(tiny_checkpoint, tmp_path, capsys, option):
    capsys.readouterr()  # the fixture lives across examples
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tiny_checkpoint), "--latents-only", "--output", str(out), "=".join(option)]
    try:
        code = generate_main(argv)
    except SystemExit as exc:  # usage errors exit from argparse, also in one line
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("xar-generate: error:") and "Traceback" not in err
    assert option[0] in err or "class" in err or "device" in err
    assert not (out / "latents.safetensors").exists()


def test_unknown_dtype_and_backend_are_usage_errors(capsys):
    for argv in (["--dtype", "fp8"], ["--backend", "cuda"]):
        with pytest.raises(SystemExit) as exc:
            generate_main(argv)
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_two_threads_on_one_pipeline_and_two_pipelines_match_sequential_runs(tiny_checkpoint):
    """No state is shared between calls: concurrent generations give the sequential results."""
    first = XARPipeline.from_pretrained(tiny_checkpoint)
    second = XARPipeline.from_pretrained(tiny_checkpoint)
    for p in (first, second):
        p.set_progress_bar_config(disable=True)

    def generate(p, label, seed):
        return p([label, label + 1], num_inference_steps=3, guidance_scale=2.0, output_type="latent",
                 generator=[torch.Generator().manual_seed(seed + i) for i in range(2)]).images

    jobs = [(first, 1, 10), (first, 5, 20), (second, 9, 30)]
    sequential = [generate(*job) for job in jobs]
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        barrier.wait()
        results[i] = generate(*jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(results, sequential):
        assert torch.equal(got, expected)


def test_fp16_overflow_is_reported_with_the_fix(tiny_checkpoint, tiny_vae_checkpoint, tmp_path, capsys):
    pipe = XARPipeline.from_pretrained(tiny_checkpoint, vae=tiny_vae_checkpoint, dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.transformer.pred.weight.mul_(1e6)  # outputs far beyond fp16 range (65504)
    with pytest.raises(NumericalError, match=r"inf or NaN, computed in float16; use dtype=torch.bfloat16"), \
            pytest.warns(UserWarning, match="float16 matrix products are very slow"):
        _call(pipe, num_inference_steps=2, guidance_scale=2.0)
    # The CLI: one line, nothing written.
    from xar_infer import cli

    original = cli.load_pipeline
    cli.load_pipeline = lambda args, device: pipe
    try:
        code = generate_main(["--checkpoint", str(tiny_checkpoint), "--vae", str(tiny_vae_checkpoint), "--dtype", "fp16",
                              "--steps", "2", "--device", "cpu", "--quiet", "--output", str(tmp_path / "out")])
    finally:
        cli.load_pipeline = original
    # One error line, after the one-line warning that float16 is slow on CPU.
    *warnings_, error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and error.startswith("xar-generate: error:") and "bfloat16" in error
    assert [w.split(":")[1] for w in warnings_] == [" warning"] and "float16 matrix products" in warnings_[0]
    assert not list((tmp_path / "out").glob("*.png"))
