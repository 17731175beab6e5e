"""Exactness against the official implementation's outputs (../shared/parity, made on CPU in fp32).

Tolerances. The fixtures were computed on another CPU, whose float32 matmul kernels round differently:
the official code itself, run on our CI machine, reproduces `fwd.v0` only to 1.29e-5 and `tokens` to
7.5e-6. An exact float64 evaluation of the same network lies 1.31e-5 from `fwd.v0`, so that is the
fixture's own rounding error; ours (fp32 vs float64) is below 2.5e-6. A float32 implementation can
therefore only promise |ours - fixture| <= 1.31e-5 + 2.5e-6, hence FORWARD_TOL = 2e-5 (the issue's
1e-5 is below what the reference code itself achieves here). A real semantic slip is far above this:
one step of the quantised time (699 instead of 700) moves `fwd.v0` by 0.65.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from xar_infer import XARPipeline
from xar_infer.backends import TORCH
from xar_infer.loading import load_local
from xar_infer.model import TORCH_OPS

from conftest import TRITON_DEVICE

FORWARD_TOL = 2e-5
TOKENS_TOL = 1e-4  # the bound; we measure 2.8e-5 (the fixture's perturbed RoPE table, see below)
VAE_TOL = 1e-4


def _expected(parity_dir):
    path = parity_dir / "xar_tiny_expected.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return load_file(path), json.loads(meta["config"]), int(meta["sample_seed"])


def _load_tiny(parity_dir, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the known RoPE-table warning, asserted in its own test
        return load_local(parity_dir / "xar_tiny.pth", dtype=dtype).model


def _three_evaluations(model, e, dtype=torch.float32, ops=TORCH_OPS):
    """The fixture's fwd.* protocol: cell 0 at t=0.7; cell 1's first call with cell 0 as prefix at t=0.55;
    a later call of cell 1 at t=0.3 against the cache."""
    labels = e["labels"]
    B = len(labels)
    cache = model.new_cache(B)
    with torch.no_grad():
        v0 = model(e["fwd.x0"].to(dtype), labels, torch.full((B,), 0.7), cache, ops=ops)
        v1 = model(e["fwd.x1"].to(dtype), labels, torch.full((B,), 0.55), cache, prefix=e["fwd.x0"].to(dtype), ops=ops)
        v2 = model(e["fwd.x2"].to(dtype), labels, torch.full((B,), 0.3), cache, ops=ops)
    return v0, v1, v2


# The references (linear layers by F.linear: MKL on x86 CPUs), and the torch backend (by oneDNN).
OPS = pytest.mark.parametrize("ops", [TORCH_OPS, TORCH.ops], ids=["reference", "torch-backend"])


@OPS
def test_forward_matches_official(parity_dir, ops):
    e, _, _ = _expected(parity_dir)
    model = _load_tiny(parity_dir)
    for i, v in enumerate(_three_evaluations(model, e, ops=ops)):
        err = (v - e[f"fwd.v{i}"]).abs().max().item()
        assert err <= FORWARD_TOL, f"fwd.v{i}: max abs error {err:.3g}"


@OPS
def test_float64_evaluation_brackets_the_fixture(parity_dir, ops):
    """Our float64 evaluation is the exact-arithmetic reference; fp32 must stay near it and the
    fixture must lie within its own float32 rounding of it (this is what justifies FORWARD_TOL)."""
    e, _, _ = _expected(parity_dir)
    v32 = _three_evaluations(_load_tiny(parity_dir), e, ops=ops)
    v64 = _three_evaluations(_load_tiny(parity_dir, torch.float64), e, torch.float64)
    for i in range(3):
        assert (v32[i].double() - v64[i]).abs().max().item() < 2.5e-6
        assert (e[f"fwd.v{i}"].double() - v64[i]).abs().max().item() < 1.4e-5


def test_time_quantisation_is_semantic(parity_dir):
    """The tolerance can tell a one-step slip in floor(1000 t): t just below 0.7 lands on 699."""
    e, _, _ = _expected(parity_dir)
    model = _load_tiny(parity_dir)
    labels = e["labels"]
    with torch.no_grad():
        v = model(e["fwd.x0"], labels, torch.full((2,), 0.6999), model.new_cache(2))
    assert (v - e["fwd.v0"]).abs().max().item() > 100 * FORWARD_TOL


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device, backend, cuda_graphs", [
    ("cpu", "torch", False),
    pytest.param(TRITON_DEVICE, "triton", False, marks=pytest.mark.triton),
    pytest.param("cuda", "torch", False, marks=needs_cuda),
    pytest.param("cuda", "triton", True, marks=[pytest.mark.triton, needs_cuda]),
])
def test_sampler_tokens_match_official(parity_dir, device, backend, cuda_graphs):
    """The whole pipeline, on the PyTorch path and on the Triton kernels (compiled on a GPU, run by
    Triton's interpreter without one), and on a GPU also the PyTorch path and the captured CUDA graphs,
    all in fp32. Measured on CPU: 2.8e-5 (torch) and 2.7e-5 (triton). A GPU's fp32 matrix products
    (no TF32: PyTorch's default) round no worse than a CPU's, so the same bound holds there."""
    e, cfg, seed = _expected(parity_dir)
    with pytest.warns(UserWarning, match="freqs_cos differs"):
        pipe = XARPipeline.from_pretrained(parity_dir / "xar_tiny.pth", backend=backend, device=device)
    pipe.set_progress_bar_config(disable=True)
    if cuda_graphs:
        pipe.enable_cuda_graphs()
    out = pipe(e["labels"].tolist(), num_inference_steps=cfg["steps"], guidance_scale=cfg["cfg"],
               generator=torch.Generator().manual_seed(seed), output_type="latent")
    assert out.images.shape == e["tokens"].shape
    err = (out.images.cpu() - e["tokens"]).abs().max().item()
    assert err <= TOKENS_TOL, f"tokens: max abs error {err:.3g}"


def test_global_seed_reproduces_official_draw_order(parity_dir):
    """Without a generator the pipeline draws from torch's global RNG in the official order."""
    e, cfg, seed = _expected(parity_dir)
    pipe = XARPipeline(_load_tiny(parity_dir))
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(seed)
    out = pipe(e["labels"].tolist(), num_inference_steps=cfg["steps"], guidance_scale=cfg["cfg"], output_type="latent")
    assert (out.images - e["tokens"]).abs().max().item() <= TOKENS_TOL


def test_checkpoint_rope_table_mismatch_is_reported(parity_dir):
    """The fixture's first encoder block stores a cos table 1.5e-4 off the true one (the sin table and
    all other layers are exact). The official code would use it; we recompute, and say so."""
    with pytest.warns(UserWarning, match=r"encoder_blocks\.0\.attn\.rope\.freqs_cos differs .* 0\.000151"):
        load_local(parity_dir / "xar_tiny.pth")
