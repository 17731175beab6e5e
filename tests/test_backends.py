"""Choosing the backend, and the whole pipeline on the Triton kernels against the PyTorch path."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from xar_infer import XARPipeline
from xar_infer.backends import TORCH, resolve_backend
from xar_infer.cli import generate_main

from conftest import TRITON_DEVICE


def test_auto_is_torch_without_cuda():
    assert resolve_backend("auto", "cpu") is TORCH
    assert resolve_backend("torch", "cpu") is TORCH


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'cuda'; choose one of"):
        resolve_backend("cuda", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled, not interpreted")
def test_triton_on_cpu_runs_interpreted():
    backend = resolve_backend("triton", "cpu")  # conftest set TRITON_INTERPRET=1 before any import
    assert backend.name == "triton"
    with pytest.raises(ValueError, match="runs on CUDA devices, not meta"):
        resolve_backend("triton", "meta")


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(tiny_checkpoint):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ("import sys; from xar_infer import XARPipeline; "
              "XARPipeline.from_pretrained(sys.argv[1], backend='triton')")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_checkpoint)], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "on CPU it runs only under Triton's interpreter (set TRITON_INTERPRET=1" in done.stderr


def test_cli_reports_an_unusable_backend_in_one_line(tmp_path, capsys):
    code = generate_main(["--checkpoint", str(tmp_path / "never-read.pth"), "--device", "meta", "--backend", "triton",
                          "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("xar-generate: error:")


def _latents(pipe, sampler):
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    return pipe([1, 2, 3], num_inference_steps=3, guidance_scale=2.0, sampler=sampler, generator=generators,
                output_type="latent").images.cpu()


@pytest.mark.triton
@pytest.mark.parametrize("sampler", ["sde", "euler", "heun"])
def test_triton_pipeline_matches_torch(tiny_checkpoint, sampler):
    """Every sampler rule through the kernels, guided, odd batch. The kernels' attention differs from
    the reference by ~1e-6 per call; the random tiny model amplifies that over 12 sequential calls to
    a measured 4.5e-5 (sde) / 1e-5 (ode) on latents of size ~7; the bound is 4x the worst. The parity
    fixture test holds the triton path to the official tokens directly."""
    torch_latents = _latents(XARPipeline.from_pretrained(tiny_checkpoint, backend="torch", device=TRITON_DEVICE), sampler)
    triton_latents = _latents(XARPipeline.from_pretrained(tiny_checkpoint, backend="triton", device=TRITON_DEVICE), sampler)
    assert (torch_latents - triton_latents).abs().max().item() <= 2e-4


@pytest.mark.triton
def test_triton_pipeline_in_fp16(tiny_checkpoint):
    """fp16 weights, cache and attention: as close to the fp16 PyTorch path as fp16 is to fp32 (the
    bound of test_pipeline's reduced-precision test)."""
    on_cpu = TRITON_DEVICE == "cpu"
    with pytest.warns(UserWarning, match="float16 matrix products") if on_cpu else contextlib.nullcontext():
        a = _latents(XARPipeline.from_pretrained(tiny_checkpoint, backend="torch", dtype=torch.float16, device=TRITON_DEVICE), "sde")
        b = _latents(XARPipeline.from_pretrained(tiny_checkpoint, backend="triton", dtype=torch.float16, device=TRITON_DEVICE), "sde")
    assert torch.isfinite(b).all()
    assert ((a - b).norm() / a.norm()).item() < 0.03


def test_the_backend_belongs_to_the_pipeline(tiny_checkpoint):
    """Two pipelines sharing one transformer keep their own backends."""
    first = XARPipeline.from_pretrained(tiny_checkpoint, backend="torch")
    second = XARPipeline(first.transformer, backend="auto")
    assert (first.backend, second.backend) == ("torch", "auto")
    with pytest.raises(ValueError, match="unknown backend"):
        XARPipeline(first.transformer, backend="fast")
