"""The Triton kernels against the PyTorch references (``model.cached_attention``, the adaLN steps of
``model``, ``sampling.flow_step``).

On a machine without a GPU (CI) they run through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``), which has no bf16: fp32 and fp16 are tested here, and on CUDA bf16 too.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # a Linux dependency; the rest of the package works without it

from xar_infer.kernels import block_causal_attention, flow_step, gated_residual, gelu_mul, rms_norm_modulate  # noqa: E402
from xar_infer.kernels import rotate_into_cache, sdpa_block_causal_attention  # noqa: E402
from xar_infer.kernels.attention import launch_config  # noqa: E402
from xar_infer.model import KVCache, apply_rope, block_causal_mask, cached_attention, rms_norm  # noqa: E402
from xar_infer.model import gated_residual as gated_residual_ref  # noqa: E402
from xar_infer.model import gelu_mul as gelu_mul_ref  # noqa: E402
from xar_infer.model import rms_norm_modulate as rms_norm_modulate_ref  # noqa: E402
from xar_infer.sampling import flow_step as torch_flow_step  # noqa: E402

from cpu_threads import one_torch_thread  # noqa: E402, F401  (autouse: this module runs on one thread)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
T = 64  # tokens per cell of the released models (8 x 8)

# Attention error against a float64 evaluation of the same rounded inputs (rotated q/k in the input
# dtype, as both implementations round them). fp32: scores, exponentials and sums in fp32 over at most
# 320 keys stay within ~1e-6 of exact for outputs of size ~1 (both implementations measured <= 1.2e-6);
# 4e-6 leaves room for GPU summation order. fp16/bf16: the output is rounded to the dtype (half an ulp:
# 4.9e-4 / 3.9e-3 for |out| in [1, 2)) and the probabilities are rounded before the product with v;
# 1e-3 / 8e-3 cover both. A wrong mask, a missing rotation or a skipped cache block costs ~1e-1.
ATTENTION_TOL = {torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _cache(batch, heads, length, head_dim, dtype, filled, fill=float("nan")):
    config = SimpleNamespace(num_heads=heads, seq_len=length, head_dim=head_dim, num_layers=1)
    cache = KVCache(config, batch, dtype, DEVICE)
    cache.keys[0].fill_(fill)
    cache.values[0].fill_(fill)
    cache.keys[0][:, :, :filled] = torch.randn(batch, heads, filled, head_dim, device=DEVICE).to(dtype)
    cache.values[0][:, :, :filled] = torch.randn(batch, heads, filled, head_dim, device=DEVICE).to(dtype)
    cache.length = filled
    return cache


def _truth(q, k, v, cos, sin, cache, batch):
    """float64 attention of the rotated (and rounded, like both implementations) new tokens."""
    L = cache.length
    qr, kr = (apply_rope(t.transpose(1, 2), cos, sin).double() for t in (q, k))
    keys = torch.cat([cache.keys[0][:batch, :, :L].double(), kr], dim=2)
    values = torch.cat([cache.values[0][:batch, :, :L].double(), v.transpose(1, 2).double()], dim=2)
    mask = block_causal_mask(T, L, q.shape[1]).to(q.device)
    return F.scaled_dot_product_attention(qr, keys, values, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 64, 80])
# No cache (the loop over finished cells is skipped), and three cells: several key tiles of every
# launch configuration, the last one partial where tiles are 128 long. 64 or 128 add no other path.
@pytest.mark.parametrize("cache_len", [0, 192])
@pytest.mark.parametrize("step", ["first", "later"])
@pytest.mark.parametrize("route", ["fused, few programs", "fused, many programs", "sdpa"])
def test_attention_matches_reference(dtype, head_dim, cache_len, step, route):
    """Both query shapes: the first step of a cell ([previous clean cell ; noisy cell], commits the clean
    one) and every later step (one cell, commits nothing). Odd batch, strided q/k/v from one qkv tensor.
    Both routes: the fused kernel with either family of launch configuration (for few (batch, head)
    programs and for many), and rotate_into_cache followed by SDPA per query cell."""
    torch.manual_seed(head_dim + cache_len)
    batch, heads = 3, 2
    num_new, num_commit = (2 * T, T) if step == "first" else (T, 0)
    q, k, v = torch.randn(batch, num_new, 3, heads, head_dim, device=DEVICE).to(dtype).unbind(2)
    angles = torch.rand(num_new, head_dim, device=DEVICE) * 6
    cos, sin = angles.cos(), angles.sin()
    size = cache_len + num_new
    reference_cache = _cache(batch, heads, size, head_dim, dtype, cache_len, fill=0.0)
    # The kernel's cache is NaN past the finished cells: reading any of it would poison the output.
    kernel_cache = _cache(batch, heads, size, head_dim, dtype, cache_len)
    kernel_cache.keys[0][:, :, :cache_len] = reference_cache.keys[0][:, :, :cache_len]
    kernel_cache.values[0][:, :, :cache_len] = reference_cache.values[0][:, :, :cache_len]
    before_k, before_v = kernel_cache.keys[0].clone(), kernel_cache.values[0].clone()

    if route == "sdpa":
        out = sdpa_block_causal_attention(q, k, v, cos, sin, kernel_cache.keys[0], kernel_cache.values[0], cache_len, T)
        written = num_new  # every new token, like the reference; the caller's cache length marks the finished ones
    else:
        config = launch_config(num_new, head_dim, dtype, batch_heads=batch * heads if "few" in route else 4096)
        out = block_causal_attention(q, k, v, cos, sin, kernel_cache.keys[0], kernel_cache.values[0], cache_len,
                                     num_commit, T, config)
        written = num_commit
    expected = cached_attention(q, k, v, cos, sin, reference_cache, 0, num_commit, T)
    truth = _truth(q, k, v, cos, sin, reference_cache, batch)

    assert out.dtype == dtype and out.shape == (batch, num_new, heads, head_dim)
    assert (out.double() - truth).abs().max().item() <= ATTENTION_TOL[dtype]
    assert (expected.double() - truth).abs().max().item() <= ATTENTION_TOL[dtype]  # the bound is one both meet
    # Written rows hold exactly the reference's rotated keys and values; nothing else changed.
    end = cache_len + written
    assert torch.equal(kernel_cache.keys[0][:, :, cache_len:end], reference_cache.keys[0][:, :, cache_len:end])
    assert torch.equal(kernel_cache.values[0][:, :, cache_len:end], reference_cache.values[0][:, :, cache_len:end])
    for after, before in ((kernel_cache.keys[0], before_k), (kernel_cache.values[0], before_v)):
        assert torch.equal(after[:, :, :cache_len], before[:, :, :cache_len])
        assert after[:, :, end:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 80])
@pytest.mark.parametrize("num_new", [16, 64, 128])
def test_rotate_into_cache_equals_apply_rope(dtype, head_dim, num_new):
    """The rotated queries and the stored keys equal model.apply_rope bit for bit (the same fp32
    products and sum, rounded once), the values are copied, only the rows of the new tokens of the
    batch's own rows change (a cache for a doubled batch, odd batch, token counts below and above a
    program's 16 rows), and q, k, v may be strided views of one qkv tensor."""
    torch.manual_seed(num_new)
    batch, heads, cache_len = 3, 2, 32
    q, k, v = torch.randn(batch, num_new, 3, heads, head_dim, device=DEVICE).to(dtype).unbind(2)
    angles = torch.rand(num_new, head_dim, device=DEVICE) * 6
    cos, sin = angles.cos(), angles.sin()
    cache = _cache(2 * batch, heads, cache_len + num_new + 16, head_dim, dtype, cache_len)
    before_k, before_v = cache.keys[0].clone(), cache.values[0].clone()

    q_rot = rotate_into_cache(q, k, v, cos, sin, cache.keys[0], cache.values[0], cache_len)

    end = cache_len + num_new
    assert q_rot.shape == q.shape and q_rot.dtype == dtype
    assert torch.equal(q_rot, apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2))
    assert torch.equal(cache.keys[0][:batch, :, cache_len:end], apply_rope(k.transpose(1, 2), cos, sin))
    assert torch.equal(cache.values[0][:batch, :, cache_len:end], v.transpose(1, 2))
    for after, before in ((cache.keys[0], before_k), (cache.values[0], before_v)):
        assert torch.equal(after[:, :, :cache_len], before[:, :, :cache_len])
        assert after[:, :, end:].isnan().all() and after[batch:, :, cache_len:].isnan().all()


@pytest.mark.parametrize("num_new", [16, 48])
def test_attention_small_cells_and_several_noisy_cells(num_new):
    """Cells of 16 tokens (the demo model's 4x4 cells), queries shorter than a block, and several noisy
    cells at once (the training-style call), against a cache of the conditional half of a doubled batch."""
    torch.manual_seed(num_new)
    cells, batch, heads, head_dim = 16, 1, 4, 32
    q, k, v = torch.randn(batch, num_new, 3, heads, head_dim, device=DEVICE).unbind(2)
    angles = torch.rand(num_new, head_dim, device=DEVICE) * 6
    cos, sin = angles.cos(), angles.sin()
    reference = _cache(2 * batch, heads, 64 + num_new, head_dim, torch.float32, 32, fill=0.0)
    kernel = _cache(2 * batch, heads, 64 + num_new, head_dim, torch.float32, 32)
    kernel.keys[0][:, :, :32], kernel.values[0][:, :, :32] = reference.keys[0][:, :, :32], reference.values[0][:, :, :32]
    out = block_causal_attention(q, k, v, cos, sin, kernel.keys[0], kernel.values[0], 32, cells, cells)
    expected = cached_attention(q, k, v, cos, sin, reference, 0, cells, cells)
    assert (out - expected).abs().max().item() <= 2 * ATTENTION_TOL[torch.float32]
    assert torch.equal(kernel.keys[0][:batch, :, 32:48], reference.keys[0][:batch, :, 32:48])
    assert kernel.keys[0][batch:, :, 32:].isnan().all()  # the unconditional rows are not touched


def test_attention_rejects_bad_inputs():
    q = torch.randn(1, 64, 2, 16, device=DEVICE)
    cos = torch.ones(64, 16, device=DEVICE)
    cache = torch.zeros(1, 2, 128, 16, device=DEVICE)
    with pytest.raises(ValueError, match="whole cells"):
        block_causal_attention(q, q, q, cos, cos, cache, cache, 0, 0, 48)
    with pytest.raises(ValueError, match="share a dtype"):
        block_causal_attention(q.half(), q.half(), q.half(), cos, cos, cache, cache, 0, 0, 64)
    with pytest.raises(ValueError, match="cannot commit"):
        block_causal_attention(q, q, q, cos, cos, cache, cache, 96, 64, 64)
    with pytest.raises(ValueError, match="does not fit"):
        block_causal_attention(q, q, q, cos, cos, cache[:, :1], cache[:, :1], 0, 0, 64)
    # The SDPA route stores every new token, so all of them must fit after the finished ones.
    with pytest.raises(ValueError, match="cannot commit 64 of 64 tokens after 96"):
        rotate_into_cache(q, q, q, cos, cos, cache, cache, 96)
    with pytest.raises(ValueError, match="whole cells"):
        sdpa_block_causal_attention(q, q, q, cos, cos, cache, cache, 0, 48)


# flow_step: the same operations in the same order as the reference, in the state's dtype. The
# interpreter evaluates them exactly like PyTorch (equal to the last bit here); compiled for a GPU,
# Triton may contract a multiply-add into one FMA, which changes a result by up to an ulp per
# operation. The tolerances allow a few ulps at the state's magnitude (~10): 1e-12 (fp64), 5e-6 (fp32).
STEP_TOL = {torch.float64: 1e-12, torch.float32: 5e-6}


def _step_inputs(rows, row_shape, dtype, guided, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *row_shape, generator=g, dtype=dtype)
    v = torch.randn((2 if guided else 1) * rows, *row_shape, generator=g).to(torch.float32)
    # Per-row scales: one <= 1 (conditional velocity untouched), one exactly 1, others guided.
    scales = torch.tensor([2.5, 1.0, 0.5, 3.75, 1.5][:rows] + [2.0] * max(0, rows - 5), dtype=dtype) if guided else None
    noise = torch.randn(rows, *row_shape, generator=g, dtype=dtype)
    times = torch.cat([torch.linspace(1.0, 0.04, 7, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]).to(dtype)
    return [t.to(DEVICE) if t is not None else None for t in (x, v, scales, noise, times)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rows, row_shape", [(1, (64, 16)), (3, (64, 16)), (5, (7, 3))])
@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("rule, noisy, step", [("sde", True, 0), ("sde", True, 3), ("sde", False, 6), ("euler", False, 2), ("heun", False, 4)])
def test_flow_step_matches_reference(dtype, rows, row_shape, guided, rule, noisy, step):
    x, v, scales, noise, times = _step_inputs(rows, row_shape, dtype, guided)
    kwargs = {"noise": noise if noisy else None}
    if rule == "heun":
        kwargs["previous"] = torch.randn_like(x)
    out = flow_step(rule, x, v, times, step, scales, **kwargs)
    expected = torch_flow_step(rule, x, v, times, step, scales, **kwargs)
    assert out.dtype == dtype and out.shape == x.shape
    assert (out - expected).abs().max().item() <= STEP_TOL[dtype]
    assert not torch.equal(out, x)


@pytest.mark.parametrize("guided", [True, False])
def test_flow_step_euler_returns_the_guided_velocity(guided):
    x, v, scales, _, times = _step_inputs(3, (64, 16), torch.float64, guided)
    out, guided_v = flow_step("euler", x, v, times, 1, scales, return_guided=True)
    expected_out, expected_v = torch_flow_step("euler", x, v, times, 1, scales, return_guided=True)
    assert (out - expected_out).abs().max().item() <= STEP_TOL[torch.float64]
    assert (guided_v - expected_v).abs().max().item() <= STEP_TOL[torch.float64]
    if guided:  # the row with scale 1 and the one with 0.5 keep their conditional velocity bit for bit
        assert torch.equal(guided_v[1:3], v[1:3].double())


def test_flow_step_philox_noise():
    """In-kernel noise: reproducible for a seed and offset, different otherwise, and standard normal
    (recovered from the update with guidance off: x' = x + drift dt + sqrt(2t |dt|) eps)."""
    x, v, _, _, times = _step_inputs(4, (64, 16), torch.float64, guided=False)
    first = flow_step("sde", x, v, times, 2, philox_seed=1234)
    assert torch.equal(first, flow_step("sde", x, v, times, 2, philox_seed=1234))
    assert not torch.equal(first, flow_step("sde", x, v, times, 2, philox_seed=1235))
    assert not torch.equal(first, flow_step("sde", x, v, times, 2, philox_seed=1234, philox_offset=x.numel()))
    noiseless = torch_flow_step("sde", x, v, times, 2, noise=torch.zeros_like(x))
    t, dt = times[2], times[3] - times[2]
    eps = (first - noiseless) / (torch.sqrt(2 * t) * torch.sqrt(dt.abs()))
    n = eps.numel()  # 4096 draws: the mean's standard error is 0.016, the std's about 0.011
    assert abs(eps.mean().item()) < 5 / n ** 0.5
    assert abs(eps.std().item() - 1) < 5 / (2 * n) ** 0.5


def test_flow_step_rejects_bad_inputs():
    x, v, scales, noise, times = _step_inputs(3, (64, 16), torch.float64, guided=True)
    with pytest.raises(ValueError, match="unknown rule"):
        flow_step("rk4", x, v, times, 0, scales)
    with pytest.raises(ValueError, match="does not fit"):
        flow_step("euler", x, v[:3], times, 0, scales)
    with pytest.raises(ValueError, match="needs previous"):
        flow_step("heun", x, v, times, 0, scales)
    with pytest.raises(ValueError, match="grid with a step"):
        flow_step("euler", x, v, times, len(times) - 1, scales)
    with pytest.raises(ValueError, match="only used by the 'sde'"):
        flow_step("euler", x, v, times, 0, scales, noise=noise)


# ---- the adaLN steps (kernels/adaln.py) ----------------------------------------------------------
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
