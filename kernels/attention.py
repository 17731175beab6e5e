"""Block-causal attention of a step's new tokens over the KV cache of finished cells.

One kernel serves both calls the sampler makes: the first step of a cell (queries = [previous cell,
clean ; this cell, noisy]) and every later step (queries = this cell). Keys are the cache's finished
cells followed by the new tokens; a new token sees the new tokens of its own and earlier cells, a rule
computed from indices, so no mask tensor exists. RoPE is applied to queries and keys as they are
loaded, and the rotated keys/values of the first ``num_commit`` new tokens are written into the cache
in place, after its ``cache_len`` finished tokens. Softmax is online (one pass over the keys), in fp32.

For large batches in bf16/fp16 there is a second route, ``sdpa_block_causal_attention``: a small
kernel rotates the new queries and writes the rotated keys and values into the cache, then PyTorch's
``scaled_dot_product_attention`` (FlashAttention on GPUs) attends one query cell at a time, which
needs no mask. ``xar_infer.backends`` chooses between the two.

``ragged_attention`` is the same attention for a continuous batch: packed segments of one cell each,
every one with its own cache slot and position, in one launch. Its keys are the slot's cache before
the segment's row, then the row's own new segments (rotated on load, as the cache write stores them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
def _block_causal_attention_kernel(
    Q, K, V, COS, SIN, CACHE_K, CACHE_V, OUT,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_cb, stride_ch, stride_cn,
    stride_ob, stride_on, stride_oh,
    stride_rope,
    num_heads, num_new, cache_len, num_commit, tokens_per_cell, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    dtype = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < num_new
    d_mask = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
    # Rounded to the input dtype like the reference's rotated queries; the softmax scale (and log2 e,
    # for exp2) is folded into the scores afterwards.
    q = _load_rotated(q_ptrs, offs_m, m_mask, COS, SIN, stride_rope, offs_d, d_mask, BLOCK_M, BLOCK_D).to(dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Finished cells: every new token sees all of them.
    cache_k = CACHE_K + b * stride_cb + h * stride_ch
    cache_v = CACHE_V + b * stride_cb + h * stride_ch
    for start_n in range(0, cache_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < cache_len
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_k + offs_n[:, None] * stride_cn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(cache_v + offs_n[:, None] * stride_cn + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        acc, m_i, l_i = _online_softmax_update(acc, m_i, l_i, scores, v, DOT_PRECISION)

    # New tokens, block-causally: key j is visible to query i iff cell(j) <= cell(i). The first key
    # block holds token 0, visible to every query, so no row meets a fully masked block first.
    query_cell = offs_m // tokens_per_cell
    last_query = tl.minimum(pid_m * BLOCK_M + BLOCK_M, num_new) - 1
    kv_end = (last_query // tokens_per_cell + 1) * tokens_per_cell
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_end
        k = _load_rotated(k_base + offs_n[:, None] * stride_kn, offs_n, n_mask, COS, SIN, stride_rope, offs_d, d_mask,
                          BLOCK_N, BLOCK_D).to(dtype)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        visible = (offs_n[None, :] // tokens_per_cell <= query_cell[:, None]) & n_mask[None, :]
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(visible, scores, float("-inf"))
        acc, m_i, l_i = _online_softmax_update(acc, m_i, l_i, scores, v, DOT_PRECISION)

    out = acc / l_i[:, None]
    out_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(out_ptrs, out.to(dtype), mask=m_mask[:, None] & d_mask[None, :])

    # This block's rows among the committed tokens enter the cache; each row has one owner program,
    # and no program reads cache rows at or after cache_len, so there is no race.
    commit_mask = offs_m < num_commit
    if pid_m * BLOCK_M < num_commit:
        k_new = _load_rotated(k_base + offs_m[:, None] * stride_kn, offs_m, commit_mask, COS, SIN, stride_rope, offs_d, d_mask,
                              BLOCK_M, BLOCK_D)
        v_new = tl.load(v_base + offs_m[:, None] * stride_vn + offs_d[None, :], mask=commit_mask[:, None] & d_mask[None, :])
        rows = (cache_len + offs_m)[:, None] * stride_cn + offs_d[None, :]
        tl.store(cache_k + rows, k_new.to(dtype), mask=commit_mask[:, None] & d_mask[None, :])
        tl.store(cache_v + rows, v_new, mask=commit_mask[:, None] & d_mask[None, :])


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


@triton.jit
def _rotate_into_cache_kernel(
    Q, K, V, COS, SIN, Q_OUT, CACHE_K, CACHE_V,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_cb, stride_ch, stride_cn,
    stride_rope,
    num_heads, num_new, cache_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One program per (block of tokens, batch row), looping over the heads: the RoPE tables of its
    # tokens are loaded once for all of them.
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1)
    dtype = Q.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < num_new)[:, None] & (offs_d < HEAD_DIM)[None, :]
    cos = tl.load(COS + rows[:, None] * stride_rope + offs_d[None, :], mask=mask, other=0.0)
    sin = tl.load(SIN + rows[:, None] * stride_rope + offs_d[None, :], mask=mask, other=0.0)
    cache_rows = (cache_len + rows)[:, None] * stride_cn + offs_d[None, :]
    for h in range(num_heads):
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :], mask=mask, other=0.0)
        k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kn + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vn + offs_d[None, :], mask=mask)
        q_rot = _rotate(q.to(tl.float32), cos, sin, BLOCK_T, BLOCK_D).to(dtype)
        k_rot = _rotate(k.to(tl.float32), cos, sin, BLOCK_T, BLOCK_D).to(dtype)
        tl.store(Q_OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :], q_rot, mask=mask)
        tl.store(CACHE_K + b * stride_cb + h * stride_ch + cache_rows, k_rot, mask=mask)
        tl.store(CACHE_V + b * stride_cb + h * stride_ch + cache_rows, v, mask=mask)


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


def _check_inputs(q, k, v, cos, sin, cache_k, cache_v, cache_len: int, num_commit: int, tokens_per_cell: int = 1) -> None:
    """Shapes, dtypes and layouts that both attention routes rely on; a clear ValueError otherwise.
    ``tokens_per_cell=1`` accepts any number of new tokens (``rotate_into_cache`` knows no cells)."""
    B, N, H, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype == cache_k.dtype == cache_v.dtype:
        raise ValueError(f"q, k, v and the cache must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {cache_k.dtype}, {cache_v.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {q.dtype}")
    if D % 2 or N % tokens_per_cell:
        raise ValueError(f"need an even head_dim and whole cells of {tokens_per_cell} tokens, got head_dim {D}, {N} tokens")
    if cache_k.shape != cache_v.shape or cache_k.stride() != cache_v.stride():
        raise ValueError("cache keys and values must have one shape and layout")
    if cache_k.shape[0] < B or cache_k.shape[1] != H or cache_k.shape[3] != D:
        raise ValueError(f"cache {tuple(cache_k.shape)} does not fit queries {tuple(q.shape)}")
    if not 0 <= num_commit <= N or cache_len + num_commit > cache_k.shape[2]:
        raise ValueError(f"cannot commit {num_commit} of {N} tokens after {cache_len} into a cache of {cache_k.shape[2]}")
    if cos.shape != (N, D) or sin.shape != (N, D) or cos.dtype != torch.float32 or sin.stride() != cos.stride():
        raise ValueError(f"cos and sin must be fp32 [{N}, {D}] tables with one layout")
    if any(t.stride(-1) != 1 for t in (q, k, v, cache_k, cos)):
        raise ValueError("the last dimension of q, k, v, the cache and the RoPE tables must be contiguous")


def _leading_strides(*tensors: torch.Tensor) -> list[int]:
    """The strides of each tensor's first three dimensions, in order: the kernels' stride arguments
    (every last dimension is contiguous)."""
    return [stride for t in tensors for stride in t.stride()[:3]]


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           cache_k: torch.Tensor, cache_v: torch.Tensor, cache_len: int, num_commit: int,
                           tokens_per_cell: int, config: dict | None = None) -> torch.Tensor:
    """Attention of ``N`` new tokens over ``cache_len`` cached ones and themselves, block-causal by cell.

    ``q, k, v``: [B, N, heads, head_dim], not yet rotated, any strides with a unit last one (e.g. views
    into the fused qkv projection). ``cos, sin``: fp32 [N, head_dim] RoPE tables of the new tokens'
    positions. ``cache_k, cache_v``: [B_cache >= B, heads, max_len, head_dim]; rows ``[0, cache_len)``
    are read, the rotated keys/values of new tokens ``[0, num_commit)`` are written at
    ``[cache_len, cache_len + num_commit)``. ``N`` is a whole number of cells. Returns [B, N, heads, head_dim].
    ``config`` overrides ``launch_config``'s choice (for tuning; see benchmarks/attention.py --sweep).
    """
    _check_inputs(q, k, v, cos, sin, cache_k, cache_v, cache_len, num_commit, tokens_per_cell)
    B, N, H, D = q.shape
    out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
    config = config or launch_config(N, D, q.dtype, B * H)
    grid = (triton.cdiv(N, config["BLOCK_M"]), B * H)
    _block_causal_attention_kernel[grid](
        q, k, v, cos, sin, cache_k, cache_v, out,
        *_leading_strides(q, k, v, cache_k, out), cos.stride(0),
        H, N, cache_len, num_commit, tokens_per_cell, math.log2(math.e) / math.sqrt(D),
        HEAD_DIM=D, BLOCK_D=channel_block(D),
        # fp32 models stay exact: no TF32 in the products.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # No fused multiply-adds: the rotated keys written to the cache must round as the reference's do.
        enable_fp_fusion=False,
        **config,
    )
    return out


# 16 token rows per program: its fp32 RoPE tables (16 x up to 128 channels) stay in registers.
ROTATE_LAUNCH = {"BLOCK_T": 16, "num_warps": 4, "num_stages": 1}


def rotate_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache_k: torch.Tensor, cache_v: torch.Tensor, cache_len: int) -> torch.Tensor:
    """RoPE on the new tokens, with their keys and values stored in the cache: returns the rotated ``q``
    [B, N, heads, head_dim] and writes the rotated ``k`` and ``v`` of all ``N`` tokens at
    ``[cache_len, cache_len + N)`` of ``cache_k, cache_v`` [B_cache >= B, heads, max_len, head_dim].
    Rotations round to the input dtype exactly as ``model.apply_rope`` does. Inputs as for
    ``block_causal_attention``."""
    _check_inputs(q, k, v, cos, sin, cache_k, cache_v, cache_len, num_commit=q.shape[1])
    B, N, H, D = q.shape
    q_rot = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
    _rotate_into_cache_kernel[(triton.cdiv(N, ROTATE_LAUNCH["BLOCK_T"]), B)](
        q, k, v, cos, sin, q_rot, cache_k, cache_v,
        *_leading_strides(q, k, v, q_rot, cache_k), cos.stride(0),
        H, N, cache_len,
        HEAD_DIM=D, BLOCK_D=channel_block(D),
        enable_fp_fusion=False,  # round as the reference's separate products and sum do
        **ROTATE_LAUNCH,
    )
    return q_rot


def sdpa_block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, cache_len: int,
                                tokens_per_cell: int) -> torch.Tensor:
    """What ``block_causal_attention`` computes, by ``rotate_into_cache`` and then PyTorch's
    ``scaled_dot_product_attention`` once per query cell. Each query cell sees exactly the cache up to
    its own last token, so no call needs a mask and SDPA can use FlashAttention (bf16/fp16 on GPUs).
    All ``N`` new tokens are written to the cache (``model.cached_attention`` does the same): only the
    caller's ``cache_len`` says which rows are finished. Returns [B, N, heads, head_dim]."""
    if q.shape[1] % tokens_per_cell:  # the rest is checked by rotate_into_cache
        raise ValueError(f"need whole cells of {tokens_per_cell} tokens, got {q.shape[1]} tokens")
    q_rot = rotate_into_cache(q, k, v, cos, sin, cache_k, cache_v, cache_len)
    B, N = q.shape[:2]
    queries = q_rot.transpose(1, 2)  # [B, heads, N, head_dim]: the layout SDPA takes, without a copy
    if N == tokens_per_cell:
        end = cache_len + N
        return F.scaled_dot_product_attention(queries, cache_k[:B, :, :end], cache_v[:B, :, :end]).transpose(1, 2)
    out = torch.empty_like(q_rot)
    for first in range(0, N, tokens_per_cell):
        end = cache_len + first + tokens_per_cell
        cell = F.scaled_dot_product_attention(queries[:, :, first:first + tokens_per_cell], cache_k[:B, :, :end],
                                              cache_v[:B, :, :end])
        out[:, first:first + tokens_per_cell] = cell.transpose(1, 2)
    return out


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
