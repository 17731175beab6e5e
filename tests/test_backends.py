"""Choosing the backend, and the whole pipeline on the Triton kernels against the PyTorch path."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from xar_infer import XARPipeline
from xar_infer.backends import TORCH, onednn_linear, resolve_backend
from xar_infer.cli import generate_main
from xar_infer.model import CellBatch, KVCache, rope_tables

from conftest import TINY_CONFIG, TRITON_DEVICE
from cpu_threads import one_torch_thread  # noqa: F401  (autouse: this module runs on one thread)


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


# ---- linear layers: oneDNN for fp32 on CPUs ---------------------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def _dispatched(fn) -> set[str]:
    """The names of the operators ``fn()`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@contextlib.contextmanager
def _onednn_switched_off():
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


@needs_onednn
def test_linear_layers_use_onednn_for_fp32_on_cpu_and_f_linear_otherwise():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in _dispatched(lambda: onednn_linear(x, layer))
        bf16 = layer.to(torch.bfloat16)
        assert "mkldnn::_linear_pointwise" not in _dispatched(lambda: onednn_linear(x.bfloat16(), bf16))
        layer.float()
        with _onednn_switched_off():
            assert "mkldnn::_linear_pointwise" not in _dispatched(lambda: onednn_linear(x, layer))
    # With autograd recording (training the demo model) it is F.linear, whose gradients exist.
    x.requires_grad_(True)
    onednn_linear(x, layer).square().sum().backward()
    expected = torch.autograd.grad(F.linear(x, layer.weight, layer.bias).square().sum(), x)[0]
    assert torch.allclose(x.grad, expected)
    assert TORCH.ops.linear is onednn_linear


@needs_onednn
def test_onednn_linear_is_exact_fp32_arithmetic():
    """Data for which fp32 is exact in any summation order: 12-bit integers over 1024 (times -1/0/1, plus
    small integer biases) keep every partial sum a multiple of 2**-10 below 2**14, so within fp32's 24
    bits. A product rounding its inputs to bf16 or TF32 (8 or 11 significant bits) would not be exact."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4095, 4096, (2, 64, 768), generator=g).float() / 1024
    layer = torch.nn.Linear(768, 2304)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-1, 2, layer.weight.shape, generator=g).float())
        layer.bias.copy_(torch.randint(-8, 9, layer.bias.shape, generator=g).float())
        out = onednn_linear(x, layer)
    assert torch.equal(out.double(), F.linear(x.double(), layer.weight.double(), layer.bias.double()))


@needs_onednn
@pytest.mark.parametrize("case", ["3d", "transposed input", "no bias", "transposed weight", "one row"])
def test_onednn_linear_matches_f_linear_within_fp32_rounding(case):
    """Random data in the layouts the model produces. Each fp32 result is within gamma_K * sum|x_i w_i|
    (+ the bias's rounding) of the exact one, gamma_K = K u / (1 - K u), u = 2**-24, whatever the
    summation order; two such results are within twice that. A wrong layout is off by O(1)."""
    g = torch.Generator().manual_seed(1)
    K, N = 768, 2304
    layer = torch.nn.Linear(K, N, bias=case != "no bias")
    x = torch.randn(2, 64, K, generator=g)
    if case == "transposed input":
        x = torch.randn(64, 2, K, generator=g).transpose(0, 1)
    if case == "transposed weight":
        layer.weight = torch.nn.Parameter(torch.randn(K, N, generator=g).T / K**0.5)
    if case == "one row":
        x = x[:1, :1]
    with torch.no_grad():
        out, reference = onednn_linear(x, layer), F.linear(x, layer.weight, layer.bias)
    u = 2.0**-24
    gamma = K * u / (1 - K * u)
    bias = 0 if layer.bias is None else layer.bias.abs().double()
    bound = 2 * (gamma * F.linear(x.abs().double(), layer.weight.abs().double()) + u * bias)
    assert out.shape == reference.shape
    assert ((out.double() - reference.double()).abs() <= bound).all()


def _latents(pipe, sampler):
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    return pipe([1, 2, 3], num_inference_steps=3, guidance_scale=2.0, sampler=sampler, generator=generators,
                output_type="latent").images.cpu()


@pytest.mark.triton
@pytest.mark.parametrize("sampler", ["sde", "euler", "heun"])
def test_triton_pipeline_matches_torch(tiny_checkpoint, sampler):
    """Every sampler rule through the kernels, guided, odd batch. The kernels' attention differs from
    the reference by ~1e-6 per call; the random tiny model amplifies that over 12 sequential calls.
    Measured through Triton's interpreter with the ragged attention kernel: 2.5e-5 (sde) / 8.7e-6 (ode)
    on latents of size ~7 (the lockstep kernel before it: 4.5e-5 / 1e-5, of which the bound is 4x).
    The parity fixture test holds the triton path to the official tokens directly."""
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


@pytest.mark.triton
def test_triton_attention_is_one_ragged_kernel_launch_on_the_batchs_device_tensors(monkeypatch):
    """The Triton backend runs a layer's attention as one ``kernels.ragged_attention`` launch over that
    layer's cache, given the batch's device tensors (slots, cells, row starts) and never its host-side
    groups, so that a captured CUDA graph may replay it with other cells (``attention_uses_groups``)."""
    from xar_infer import kernels

    launches = []
    monkeypatch.setattr(kernels, "ragged_attention", lambda *args: launches.append(args) or args[0])
    backend = resolve_backend("triton", "cpu")
    config = TINY_CONFIG
    cache = KVCache(config, 3, torch.float32, "cpu")
    batch = CellBatch.build([2, 2, 0], [0, 1, 3], [5, 5, 1000], [0.0, 0.5, 0.2], "cpu")
    q = torch.zeros(3, config.tokens_per_cell, config.num_heads, config.head_dim)
    cos, sin = rope_tables(config)
    backend.ops.attention(q, q, q, cos, sin, cache, 1, batch)
    [args] = launches
    assert args[5] is cache.keys[1] and args[6] is cache.values[1]
    for given, wanted in zip(args[7:10], (batch.slots, batch.cells, batch.row_starts)):  # the same memory, no copy
        assert given.data_ptr() == wanted.data_ptr() and torch.equal(given, wanted)
    assert args[10] == config.tokens_per_cell
    assert backend.ops.attention_uses_groups is False and TORCH.ops.attention_uses_groups is True
    assert (backend.ops.rms_norm_modulate, backend.ops.gated_residual, backend.ops.gelu_mul) == (
        kernels.rms_norm_modulate, kernels.gated_residual, kernels.gelu_mul)
    assert backend.ops.linear is onednn_linear and backend.flow_step is kernels.flow_step


def test_the_backend_belongs_to_the_pipeline(tiny_checkpoint):
    """Two pipelines sharing one transformer keep their own backends."""
    first = XARPipeline.from_pretrained(tiny_checkpoint, backend="torch")
    second = XARPipeline(first.transformer, backend="auto")
    assert (first.backend, second.backend) == ("torch", "auto")
    with pytest.raises(ValueError, match="unknown backend"):
        XARPipeline(first.transformer, backend="fast")
