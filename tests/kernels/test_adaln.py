"""The adaLN steps (kernels/adaln.py) against their PyTorch references in ``model``: the RMSNorm with
its modulation, the gated residual and the MLP's GELU product.

On a machine without a GPU (CI) they run through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``): fp32 and fp16 are tested here, and on CUDA bf16 too (conftest.TRITON_DTYPES).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # a Linux dependency; the rest of the package works without it

from xar_infer.kernels import gated_residual, gelu_mul, rms_norm_modulate  # noqa: E402
from xar_infer.model import gated_residual as gated_residual_ref  # noqa: E402
from xar_infer.model import gelu_mul as gelu_mul_ref  # noqa: E402
from xar_infer.model import rms_norm, rms_norm_modulate as rms_norm_modulate_ref  # noqa: E402

from conftest import TRITON_DEVICE as DEVICE, TRITON_DTYPES as DTYPES  # noqa: E402
from cpu_threads import one_torch_thread  # noqa: E402, F401  (autouse: this module runs on one thread)


# Unit roundoff of each dtype: every rounding step of an implementation errs by at most this, relatively,
# or by half the spacing of subnormals (SUBNORMAL_STEP) below the normal range.
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SUBNORMAL_STEP = {dtype: torch.finfo(dtype).smallest_normal * 2 * u for dtype, u in UNIT.items()}


def _condition(B, N, D, T, dtype, seed=0):
    """x [B, N, D] and per-cell conditions laid out as in a block: six [B, cells, D] views of one tensor."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, N, D, generator=g) * 3).to(DEVICE, dtype)
    modulation = (torch.randn(B, N // T, 6 * D, generator=g) * 0.5).to(DEVICE, dtype)
    return x, modulation.chunk(6, dim=-1)


ADALN_SHAPES = [(1, 128, 768, 64), (3, 64, 1280, 64), (2, 8, 33, 4), (1, 0, 16, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, N, D, T", ADALN_SHAPES)
def test_rms_norm_modulate_is_within_rounding_of_exact(dtype, B, N, D, T):
    """Both the kernel and the reference are checked against a float64 evaluation with a bound from
    their roundings: the norm's fp32 sum of D squares errs by at most (D - 1) u32 relatively (half that
    after the square root), the reciprocal and product a few u32 more; then the norm, 1 + scale, the
    product and the sum each round to the dtype. A wrong cell, eps or order of operations costs ~1e-1."""
    x, (_, _, scale, _, shift, _) = _condition(B, N, D, T, dtype)
    exact = rms_norm_modulate_ref(x.double(), scale.double(), shift.double(), T, 1e-6)
    normed = rms_norm(x.double(), 1e-6).view(B, -1, T, D)
    magnitude = (normed.abs() * (1 + scale.double().unsqueeze(2)).abs()).view(B, N, D)
    u = UNIT[dtype]
    bound = ((D / 2 + 4) * UNIT[torch.float32] * magnitude + 3 * u * magnitude + 2 * u * exact.abs()
             + 2 * u * shift.double().abs().repeat_interleave(T, 1) + 4 * SUBNORMAL_STEP[dtype])
    for out in (rms_norm_modulate(x, scale, shift, T, 1e-6), rms_norm_modulate_ref(x, scale, shift, T, 1e-6)):
        assert out.shape == x.shape and out.dtype == dtype
        assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, N, D, T", ADALN_SHAPES)
def test_gated_residual_equals_reference(dtype, B, N, D, T):
    """The same two roundings as the reference, no contraction into an FMA: equal bit for bit."""
    x, (gamma, *_) = _condition(B, N, D, T, dtype)
    h = torch.randn(B, N, D, device=DEVICE).to(dtype)
    assert torch.equal(gated_residual(x, h, gamma, T), gated_residual_ref(x, h, gamma, T))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 128, 2048), (3, 5, 7), (0, 4)])
def test_gelu_mul_is_within_rounding_of_exact(dtype, shape):
    """Against a float64 evaluation (the same formula as the reference): fp32 erf errs by a few u32,
    i.e. u32 |gate| in gelu(gate); rounding gelu and the product to the dtype adds an ulp each, so
    |error| <= 2 u |gate * value| + 2 u |exact|, u of the dtype (>= u32). Not against torch's CPU
    GELU bit for bit: its vectorised erf errs by up to 6 u32 |gate| (measured), more than the kernel."""
    g = torch.Generator().manual_seed(1)
    gate = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    value = torch.randn(shape, generator=g).to(DEVICE, dtype)
    out = gelu_mul(gate, value)
    exact = gelu_mul_ref(gate.double(), value.double())
    u = UNIT[dtype]
    bound = 2 * u * (gate.double() * value.double()).abs() + 2 * u * exact.abs() + 2 * SUBNORMAL_STEP[dtype]
    assert out.dtype == dtype and out.shape == gate.shape
    assert ((out.double() - exact).abs() <= bound).all()


def test_adaln_kernels_reject_bad_inputs():
    x, (gamma, _, scale, _, shift, _) = _condition(1, 8, 16, 4, torch.float32)
    with pytest.raises(ValueError, match=r"scale must be \[1, 2, 16\]"):
        rms_norm_modulate(x, scale[:, :1], shift, 4, 1e-6)
    with pytest.raises(ValueError, match="not whole cells of 3"):
        rms_norm_modulate(x, scale, shift, 3, 1e-6)
    with pytest.raises(ValueError, match="x must be contiguous"):
        gated_residual(x.transpose(1, 2).contiguous().transpose(1, 2), x, gamma, 4)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        gelu_mul(x.double(), x.double())
    with pytest.raises(ValueError, match="value must be like gate"):
        gelu_mul(x, x[:, :4])
