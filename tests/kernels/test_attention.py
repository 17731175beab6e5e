"""The attention kernels (kernels/attention.py) against the PyTorch reference ``model.cached_attention``,
and the continuous-batching one (``ragged_attention``) against ``ragged_attention_reference`` below.

On a machine without a GPU (CI) they run through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``): fp32 and fp16 are tested here, and on CUDA bf16 too (conftest.TRITON_DTYPES).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # a Linux dependency; the rest of the package works without it

from xar_infer.kernels import block_causal_attention, ragged_attention, rotate_into_cache, sdpa_block_causal_attention  # noqa: E402
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



# ---- ragged_attention: packed segments, each one cell of its own cache slot -------------------------

def ragged_attention_reference(q, k, v, cos, sin, cache_k, cache_v, slots, cells, row_starts, tokens_per_cell):
    """What ``ragged_attention`` computes, step by step: rotate every segment's q and k at its positions
    (``apply_rope``), write all rotated keys and values into the cache, then attend each segment over
    its slot's positions [0, (cell + 1) T). Writes the cache in place; returns [S, T, heads, head_dim]."""
    T = tokens_per_cell
    slots, cells, row_starts = slots.tolist(), cells.tolist(), row_starts.tolist()
    rotated_q = []
    for s, (slot, cell, first) in enumerate(zip(slots, cells, row_starts)):
        # The contract of a row: consecutive segments of one slot at consecutive cells.
        assert first <= s and all(slots[j] == slot and cells[j] == cells[first] + j - first for j in range(first, s + 1))
        positions = torch.arange(cell * T, cell * T + T, device=q.device)
        rotated_q.append(apply_rope(q[s].transpose(0, 1), cos[positions], sin[positions]))
        cache_k[slot, :, positions] = apply_rope(k[s].transpose(0, 1), cos[positions], sin[positions])
        cache_v[slot, :, positions] = v[s].transpose(0, 1)
    out = torch.empty_like(q)
    for s, (slot, cell) in enumerate(zip(slots, cells)):
        end = (cell + 1) * T
        out[s] = F.scaled_dot_product_attention(rotated_q[s], cache_k[slot, :, :end], cache_v[slot, :, :end]).transpose(0, 1)
    return out


# (slot, first cell, segments) of each row, in call order: slots out of order, slot 2 unused; a
# [clean ; noisy] row over 4 finished cells and one over none; single cells at 0, 2 and the last, 7.
RAGGED_ROWS = [(3, 4, 2), (0, 0, 1), (5, 2, 1), (1, 0, 2), (4, 7, 1)]
RAGGED_SLOTS, RAGGED_CELLS = 6, 8


def _ragged_case(T, head_dim, dtype, heads=2, seed=0):
    """Packed inputs for RAGGED_ROWS, q/k/v as strided views of one qkv tensor, and a cache that holds
    random keys/values at each used slot's finished cells and NaN everywhere else: a kernel that reads
    anything else (or the row's own positions from the cache) returns NaN."""
    torch.manual_seed(seed)
    slots, cells, row_starts = [], [], []
    for slot, cell, n in RAGGED_ROWS:
        row_starts += [len(slots)] * n
        slots += [slot] * n
        cells += range(cell, cell + n)
    S, seq_len = len(slots), RAGGED_CELLS * T
    q, k, v = torch.randn(S, T, 3, heads, head_dim, device=DEVICE).to(dtype).unbind(2)
    angles = torch.rand(seq_len, head_dim, device=DEVICE) * 6
    cache_k = torch.full((RAGGED_SLOTS, heads, seq_len, head_dim), float("nan"), device=DEVICE, dtype=dtype)
    cache_v = cache_k.clone()
    for slot, cell, _ in RAGGED_ROWS:
        cache_k[slot, :, :cell * T] = torch.randn(heads, cell * T, head_dim, device=DEVICE).to(dtype)
        cache_v[slot, :, :cell * T] = torch.randn(heads, cell * T, head_dim, device=DEVICE).to(dtype)
    index = [torch.tensor(x, device=DEVICE) for x in (slots, cells, row_starts)]
    return q, k, v, angles.cos(), angles.sin(), cache_k, cache_v, *index


def _bits(x):
    """x's bit patterns: compares NaNs too."""
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def _ragged_truth(q, cos, sin, cache_k, cache_v, slots, cells, T):
    """float64 attention of each segment's rotated (and rounded) queries over the written cache, and
    P|v| (the probabilities applied to |v|): the scale of the rounding of p before its product with v."""
    truth, spread = torch.empty(2, *q.shape, dtype=torch.float64, device=q.device)
    for s, (slot, cell) in enumerate(zip(slots.tolist(), cells.tolist())):
        positions = torch.arange(cell * T, cell * T + T, device=q.device)
        qr = apply_rope(q[s].transpose(0, 1), cos[positions], sin[positions]).double()
        keys, values = cache_k[slot, :, :(cell + 1) * T].double(), cache_v[slot, :, :(cell + 1) * T].double()
        p = torch.softmax(qr @ keys.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        truth[s], spread[s] = (p @ values).transpose(0, 1), (p @ values.abs()).transpose(0, 1)
    return truth, spread


def _ragged_bound(dtype, truth, spread):
    """fp32: ATTENTION_TOL's 4e-6, whose reasoning holds here (at most 8 cells of 32 tokens: 256 keys,
    within its 320; measured: kernel <= 5.9e-7, reference <= 1.1e-6). fp16/bf16: two roundings to the
    dtype, each within u (half an ulp) relatively: the output (u |out|) and the probabilities before
    their product with v (u sum p |v| / sum p); the fp32 arithmetic adds less than the fp32 bound.
    Elementwise rather than ATTENTION_TOL's 1e-3 for |out| < 2: with 4 keys (T = 4, cell 0) |out|
    reaches 2.4, where half an fp16 ulp alone is 9.8e-4 (measured: the kernel's error is up to 0.61 of
    this bound, the reference's 0.49; a wrong rotation, position or missing key costs ~1e-1)."""
    if dtype == torch.float32:
        return torch.full_like(truth, ATTENTION_TOL[torch.float32])
    u = torch.finfo(dtype).eps / 2
    return u * (truth.abs() + spread) + ATTENTION_TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, head_dim, launch", [
    (4, 16, "few programs"), (4, 16, "many programs"), (16, 80, "few programs"), (16, 80, "many programs"),
    # Two query blocks per segment, and key tiles shorter than a cell: every tile offset in use. Also the
    # one case where reading a row's earlier segment from the cache shows: the interpreter runs programs
    # in grid order, query blocks outermost, so half of that segment is still NaN there (a GPU races).
    pytest.param(32, 16, {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}, id="32-16-tiles of 16"),
])
def test_ragged_attention_matches_reference(dtype, T, head_dim, launch):
    """Rows of every kind in one call (RAGGED_ROWS) with either family of launch_config (key tiles of
    128/64 and of 32 tokens: a tile spans several cells of T = 4 or 16) or an explicit small one. The
    output is within rounding of a float64 evaluation, as the reference's is; the cache afterwards holds,
    bit for bit, what the reference writes, and changed exactly at the segments' slots and positions."""
    q, k, v, cos, sin, cache_k, cache_v, slots, cells, row_starts = _ragged_case(T, head_dim, dtype)
    reference_k, reference_v = cache_k.clone(), cache_v.clone()
    before_k, before_v = cache_k.clone(), cache_v.clone()
    S, heads = q.shape[0], q.shape[2]
    config = launch if isinstance(launch, dict) else launch_config(T, head_dim, dtype, S * heads if "few" in launch else 4096)

    out = ragged_attention(q, k, v, cos, sin, cache_k, cache_v, slots, cells, row_starts, T, config)
    expected = ragged_attention_reference(q, k, v, cos, sin, reference_k, reference_v, slots, cells, row_starts, T)
    truth, spread = _ragged_truth(q, cos, sin, reference_k, reference_v, slots, cells, T)

    assert out.dtype == dtype and out.shape == q.shape
    bound = _ragged_bound(dtype, truth, spread)
    assert ((out.double() - truth).abs() <= bound).all()
    assert ((expected.double() - truth).abs() <= bound).all()  # the bound is one both meet
    assert torch.equal(_bits(cache_k), _bits(reference_k)) and torch.equal(_bits(cache_v), _bits(reference_v))
    written = torch.zeros(RAGGED_SLOTS, RAGGED_CELLS, dtype=torch.bool, device=DEVICE)
    written[slots, cells] = True
    for after, before in ((cache_k, before_k), (cache_v, before_v)):
        changed = (_bits(after) != _bits(before)).any(dim=-1).any(dim=1).view(RAGGED_SLOTS, RAGGED_CELLS, T)
        assert torch.equal(changed, written[:, :, None].expand_as(changed))


def test_ragged_attention_rejects_bad_inputs():
    q, k, v, cos, sin, cache_k, cache_v, slots, cells, row_starts = _ragged_case(4, 16, torch.float32)
    args = (cos, sin, cache_k, cache_v, slots, cells, row_starts)
    with pytest.raises(ValueError, match="one cell of 8 tokens"):
        ragged_attention(q, k, v, *args, 8)
    with pytest.raises(ValueError, match="share a dtype"):
        ragged_attention(q.half(), k.half(), v.half(), *args, 4)
    with pytest.raises(ValueError, match="does not fit"):
        ragged_attention(q, k, v, cos, sin, cache_k[:, :1], cache_v[:, :1], slots, cells, row_starts, 4)
    with pytest.raises(ValueError, match=r"cos and sin must be fp32 \[32, 16\]"):
        ragged_attention(q, k, v, cos[:16], sin[:16], cache_k, cache_v, slots, cells, row_starts, 4)
    with pytest.raises(ValueError, match="slots must be a contiguous int32 or int64 tensor of shape"):
        ragged_attention(q, k, v, cos, sin, cache_k, cache_v, slots.float(), cells, row_starts, 4)
    with pytest.raises(ValueError, match="cells must be a contiguous"):
        ragged_attention(q, k, v, cos, sin, cache_k, cache_v, slots, torch.stack([cells, cells], 1)[:, 0], row_starts, 4)
    with pytest.raises(ValueError, match="row_starts must be"):
        ragged_attention(q, k, v, cos, sin, cache_k, cache_v, slots, cells, row_starts[:3], 4)
    with pytest.raises(ValueError, match="one device"):
        ragged_attention(q, k, v, cos, sin, cache_k, cache_v, slots.to("meta"), cells, row_starts, 4)
    # No segments: an empty result, nothing launched, the cache untouched.
    before = cache_k.clone()
    empty = ragged_attention(q[:0], k[:0], v[:0], cos, sin, cache_k, cache_v, slots[:0], cells[:0], row_starts[:0], 4)
    assert empty.shape == (0, 4, 2, 16) and torch.equal(_bits(cache_k), _bits(before))
