"""Block-causal attention of a network call's cells over a KV cache of slots, in one launch.

A call packs cells of T tokens from any images (``model.CellBatch``): each cell has its own cache
slot and position, and the cells of one slot in a call are consecutive (a row: one noisy cell, or the
previous cell, clean, then the noisy one). A cell's keys are its slot's cache before its row, then the
row's own cells up to itself; a cell sees all of its own tokens, so no mask exists. RoPE is applied to
queries and keys as they are loaded, and every cell's rotated keys and values are written to its
positions of its slot. Softmax is online (one pass over the keys), in fp32. The reference is
``xar_infer.model.cached_attention``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x, cos, sin, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of an fp32 [tokens, head_dim] tile rotated by their RoPE angles: channel pairs (2i, 2i+1)
    become (x0 cos - x1 sin, x1 cos + x0 sin). The partner of each channel comes from the tile itself
    (split into even and odd channels and joined back swapped), so every load is a contiguous vector load."""
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_D // 2, 2)))
    x_pair = tl.reshape(tl.join(-x_odd, x_even), (BLOCK_R, BLOCK_D))  # (-x1, x0) for each pair
    return x * cos + x_pair * sin


@triton.jit
def _load_rotated(ptrs, rows, row_mask, cos_ptr, sin_ptr, stride_rope, offs_d, d_mask,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of a [tokens, head_dim] tile, loaded and rotated (``_rotate``), in fp32."""
    mask = row_mask[:, None] & d_mask[None, :]
    x = tl.load(ptrs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + rows[:, None] * stride_rope + offs_d[None, :], mask=mask, other=0.0)
    sin = tl.load(sin_ptr + rows[:, None] * stride_rope + offs_d[None, :], mask=mask, other=0.0)
    return _rotate(x, cos, sin, BLOCK_R, BLOCK_D)


@triton.jit
def _online_softmax_update(acc, m_i, l_i, scores, v, DOT_PRECISION: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _ragged_attention_kernel(
    Q, K, V, COS, SIN, CACHE_K, CACHE_V, OUT, SLOTS, CELLS, ROW_STARTS,
    stride_qs, stride_qn, stride_qh,
    stride_ks, stride_kn, stride_kh,
    stride_vs, stride_vn, stride_vh,
    stride_cb, stride_ch, stride_cn,
    stride_os, stride_on, stride_oh,
    stride_rope,
    num_heads, tokens_per_cell, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_sh = tl.program_id(1)
    s = pid_sh // num_heads
    h = pid_sh % num_heads
    dtype = Q.dtype.element_ty
    slot = tl.load(SLOTS + s)
    cell = tl.load(CELLS + s)
    row_start = tl.load(ROW_STARTS + s)
    # The row's first cell starts the tokens that come from the inputs; the cache holds those before it.
    cache_len = tl.load(CELLS + row_start) * tokens_per_cell

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < tokens_per_cell
    d_mask = offs_d < HEAD_DIM
    mask = m_mask[:, None] & d_mask[None, :]
    positions = cell * tokens_per_cell + offs_m
    cos = tl.load(COS + positions[:, None] * stride_rope + offs_d[None, :], mask=mask, other=0.0)
    sin = tl.load(SIN + positions[:, None] * stride_rope + offs_d[None, :], mask=mask, other=0.0)
    q = tl.load(Q + s * stride_qs + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask, other=0.0)
    q = _rotate(q.to(tl.float32), cos, sin, BLOCK_M, BLOCK_D).to(dtype)  # rounded as the reference's queries

    # This program's tokens enter the slot's cache first, rotated by the same tables. No program of this
    # launch reads them there: a reader of this slot reads the cache only below its row's first cell and
    # takes the row's tokens from the inputs.
    cache_k = CACHE_K + slot * stride_cb + h * stride_ch
    cache_v = CACHE_V + slot * stride_cb + h * stride_ch
    k_new = tl.load(K + s * stride_ks + h * stride_kh + offs_m[:, None] * stride_kn + offs_d[None, :], mask=mask, other=0.0)
    v_new = tl.load(V + s * stride_vs + h * stride_vh + offs_m[:, None] * stride_vn + offs_d[None, :], mask=mask)
    rows = positions[:, None] * stride_cn + offs_d[None, :]
    tl.store(cache_k + rows, _rotate(k_new.to(tl.float32), cos, sin, BLOCK_M, BLOCK_D).to(dtype), mask=mask)
    tl.store(cache_v + rows, v_new, mask=mask)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, cache_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < cache_len
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_k + offs_n[:, None] * stride_cn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(cache_v + offs_n[:, None] * stride_cn + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        acc, m_i, l_i = _online_softmax_update(acc, m_i, l_i, scores, v, DOT_PRECISION)

    # The row's own segments up to this one, as one run of tokens: token j is token j % T of segment
    # row_start + j // T, at position cache_len + j, and every query sees all of them (no mask).
    # They are rotated and rounded here exactly as the cache write below stores them.
    num_row = (s - row_start + 1) * tokens_per_cell
    for start_n in range(0, num_row, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < num_row
        seg = row_start + offs_n // tokens_per_cell
        tok = offs_n % tokens_per_cell
        k_ptrs = K + h * stride_kh + seg[:, None] * stride_ks + tok[:, None] * stride_kn
        k = _load_rotated(k_ptrs, cache_len + offs_n, n_mask, COS, SIN, stride_rope, offs_d, d_mask, BLOCK_N, BLOCK_D).to(dtype)
        v_ptrs = V + h * stride_vh + seg[:, None] * stride_vs + tok[:, None] * stride_vn + offs_d[None, :]
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        acc, m_i, l_i = _online_softmax_update(acc, m_i, l_i, scores, v, DOT_PRECISION)

    out = acc / l_i[:, None]
    out_ptrs = OUT + s * stride_os + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(out_ptrs, out.to(dtype), mask=mask)


def channel_block(head_dim: int) -> int:
    """The kernel's tile width over channels: the head dim rounded up to a power of two (at least 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(num_new: int, head_dim: int, dtype: torch.dtype, batch_heads: int) -> dict:
    """Tile sizes, warps and pipeline stages, from a sweep on an H100 (benchmarks/results/
    h100-attention-sweep-bf16.md, xAR-B shapes, bf16): one stage (the loops are a few tiles long, so
    prefetching buys nothing and its shared memory costs occupancy); with few (batch, head) programs,
    long key tiles and 8 warps (fewer, larger steps: latency); with many, shorter key tiles (4 warps,
    more programs resident). Wide rows (fp32, or more than 64 channels) keep tiles of 64 rows so the
    fp32 accumulator stays in registers."""
    wide = channel_block(head_dim) * (4 if dtype == torch.float32 else 2) > 128  # bytes per row
    block_m = 128 if num_new >= 128 and not wide else min(64, max(16, triton.next_power_of_2(num_new)))
    if batch_heads < 1024:
        block_n = 64 if wide else 128
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8 if block_n == 128 else 4, "num_stages": 1}
    return {"BLOCK_M": block_m, "BLOCK_N": 64 if num_new > 64 else 32, "num_warps": 4, "num_stages": 1}


def _leading_strides(*tensors: torch.Tensor) -> list[int]:
    """The strides of each tensor's first three dimensions, in order: the kernels' stride arguments
    (every last dimension is contiguous)."""
    return [stride for t in tensors for stride in t.stride()[:3]]


def _check_ragged_inputs(q, k, v, cos, sin, cache_k, cache_v, slots, cells, row_starts, tokens_per_cell: int) -> None:
    """What ``ragged_attention`` relies on and can check without reading device values; a clear ValueError otherwise."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [segments, tokens_per_cell, heads, head_dim] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    S, T, H, D = q.shape
    if T != tokens_per_cell:
        raise ValueError(f"each segment is one cell of {tokens_per_cell} tokens, but q has {T} tokens per segment")
    devices = {t.device for t in (q, k, v, cos, sin, cache_k, cache_v, slots, cells, row_starts)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not q.dtype == k.dtype == v.dtype == cache_k.dtype == cache_v.dtype:
        raise ValueError(f"q, k, v and the cache must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {cache_k.dtype}, {cache_v.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {q.dtype}")
    if D % 2:
        raise ValueError(f"need an even head_dim, got {D}")
    if cache_k.dim() != 4 or cache_k.shape != cache_v.shape or cache_k.stride() != cache_v.stride():
        raise ValueError("cache keys and values must be [slots, heads, seq_len, head_dim] of one shape and layout")
    seq_len = cache_k.shape[2]
    if cache_k.shape[1] != H or cache_k.shape[3] != D or seq_len < T:
        raise ValueError(f"cache {tuple(cache_k.shape)} does not fit segments {tuple(q.shape)}")
    if cos.shape != (seq_len, D) or sin.shape != (seq_len, D) or cos.dtype != torch.float32 or sin.stride() != cos.stride():
        raise ValueError(f"cos and sin must be fp32 [{seq_len}, {D}] tables (the cache's whole sequence) with one layout")
    for name, index in (("slots", slots), ("cells", cells), ("row_starts", row_starts)):
        if index.shape != (S,) or index.dtype not in (torch.int32, torch.int64) or not index.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 or int64 tensor of shape [{S}] (one per segment), "
                             f"got {index.dtype} {tuple(index.shape)} with strides {index.stride()}")
    if any(t.stride(-1) != 1 for t in (q, k, v, cache_k, cos)):
        raise ValueError("the last dimension of q, k, v, the cache and the RoPE tables must be contiguous")


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor, cells: torch.Tensor,
                     row_starts: torch.Tensor, tokens_per_cell: int, config: dict | None = None) -> torch.Tensor:
    """Attention of ``S`` packed segments, each one cell of one request, over its own KV-cache slot:
    one launch for a continuous batch.

    ``q, k, v``: [S, T, heads, head_dim] (T = ``tokens_per_cell``), not yet rotated, any strides with a
    unit last one. ``cos, sin``: fp32 [seq_len, head_dim] RoPE tables of the whole sequence.
    ``cache_k, cache_v``: one layer's cache, [num_slots, heads, seq_len, head_dim]. ``slots, cells,
    row_starts``: int [S] on the device: segment ``s`` is cell ``cells[s]`` (tokens ``cells[s] * T + i``)
    of slot ``slots[s]``, and its row (the segments of its slot in this call: one cell, or [previous
    cell, clean ; this cell, noisy]) starts at segment ``row_starts[s]``; a row's segments are
    consecutive, at consecutive cells, and a slot has at most one row per call. These values are not
    read on the host, so they are not checked: a slot or cell out of range writes out of bounds.

    The result equals writing the rotated keys and the values of every segment into the cache at its
    slot and positions, then attending, for each segment, over its slot's positions
    ``[0, (cells[s] + 1) * T)``. Returns [S, T, heads, head_dim] in q's dtype; the cache is written in
    place. ``config`` overrides ``launch_config``'s choice.

    Example (two requests: slot 0's first noisy cell; slot 3 commits cell 4 and starts cell 5)::

        out = ragged_attention(q, k, v, cos, sin, cache_k, cache_v, slots=torch.tensor([0, 3, 3]),
                               cells=torch.tensor([0, 4, 5]), row_starts=torch.tensor([0, 1, 1]),
                               tokens_per_cell=64)
    """
    _check_ragged_inputs(q, k, v, cos, sin, cache_k, cache_v, slots, cells, row_starts, tokens_per_cell)
    S, T, H, D = q.shape
    out = torch.empty((S, T, H, D), dtype=q.dtype, device=q.device)
    if S == 0:
        return out
    config = config or launch_config(T, D, q.dtype, S * H)
    grid = (triton.cdiv(T, config["BLOCK_M"]), S * H)
    _ragged_attention_kernel[grid](
        q, k, v, cos, sin, cache_k, cache_v, out, slots, cells, row_starts,
        *_leading_strides(q, k, v, cache_k, out), cos.stride(0),
        H, T, math.log2(math.e) / math.sqrt(D),
        HEAD_DIM=D, BLOCK_D=channel_block(D),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # as block_causal_attention: fp32 stays exact
        enable_fp_fusion=False,  # the rotated keys round as the reference's do, in the cache and in the scores
        **config,
    )
    return out
