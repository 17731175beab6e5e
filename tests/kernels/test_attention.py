"""The attention kernels (kernels/attention.py) against the PyTorch reference ``model.cached_attention``,
and the continuous-batching one (``ragged_attention``) against ``model.cached_attention``.

On a machine without a GPU (CI) they run through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``): fp32 and fp16 are tested here, and on CUDA bf16 too (conftest.TRITON_DTYPES).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # a Linux dependency; the rest of the package works without it

from xar_infer.kernels import ragged_attention  # noqa: E402
from xar_infer.kernels.attention import launch_config  # noqa: E402
from xar_infer.model import CellBatch, apply_rope, cached_attention  # noqa: E402

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


def ragged_attention_reference(q, k, v, cos, sin, cache_k, cache_v, slots, cells, row_starts, tokens_per_cell):
    """``model.cached_attention``, the engine's PyTorch path, on the same inputs: rotate every segment's
    q and k at its positions, write all rotated keys and values into the cache, then attend each segment
    over its slot's positions [0, (cell + 1) T). Writes the cache in place; returns [S, T, heads, head_dim]."""
    batch = CellBatch.build(slots.tolist(), cells.tolist(), [0] * len(slots), [0.0] * len(slots), q.device)
    assert torch.equal(batch.row_starts, row_starts.long())  # the rows of the case are what CellBatch makes of them
    assert q.shape[1] == tokens_per_cell
    return cached_attention(q, k, v, cos, sin, SimpleNamespace(keys=[cache_k], values=[cache_v]), 0, batch)


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
