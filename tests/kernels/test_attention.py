"""The attention kernels (kernels/attention.py) against the PyTorch reference ``model.cached_attention``.

On a machine without a GPU (CI) they run through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``): fp32 and fp16 are tested here, and on CUDA bf16 too (conftest.TRITON_DTYPES).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # a Linux dependency; the rest of the package works without it

from xar_infer.kernels import block_causal_attention, rotate_into_cache, sdpa_block_causal_attention  # noqa: E402
from xar_infer.kernels.attention import launch_config  # noqa: E402
from xar_infer.model import KVCache, apply_rope, block_causal_mask, cached_attention  # noqa: E402

from conftest import TRITON_DEVICE as DEVICE, TRITON_DTYPES as DTYPES  # noqa: E402
from cpu_threads import one_torch_thread  # noqa: E402, F401  (autouse: this module runs on one thread)

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
