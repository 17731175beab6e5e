"""The elementwise steps of an adaLN block, fused: one launch each instead of three to eight.

A block of xAR is two matmul-bound branches (attention, gated MLP) joined by elementwise steps, and in
PyTorch each step is several kernels that each read and write the whole activation: the RMSNorm (a
square, a mean, an add, a reciprocal square root, a product), the modulation ``* (1 + scale) + shift``,
the gate and residual ``x + h * gamma``, and the MLP's ``gelu(g) * v``. At batch 1 those launches are
most of a block's kernels; at large batches their memory traffic is a large part of its time.

Each kernel rounds where the reference (``model.rms_norm_modulate``, ``model.gated_residual``,
``model.gelu_mul``) rounds: to the activation dtype after every operation, the norm in fp32. With
floating-point contraction off (no fused multiply-add), ``gated_residual`` equals the reference bit
for bit; the other two differ only by the order of the norm's sum and by ``erf``'s last bit.
The per-cell conditions ``scale``, ``shift``, ``gamma`` [B, cells, D] are read in place, any row
strides (they are views into the modulation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SQRT_HALF = tl.constexpr(0.7071067811865476)


@triton.jit
def _rms_norm_modulate_kernel(X, SCALE, SHIFT, OUT, stride_mb, stride_mc, num_rows, num_tokens, tokens_per_cell, dim,
                              eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # tokens: b * num_tokens + n
    b = rows // num_tokens
    cell = (rows % num_tokens) // tokens_per_cell
    offs = tl.arange(0, BLOCK_D)
    mask = (rows < num_rows)[:, None] & (offs < dim)[None, :]
    x = tl.load(X + rows[:, None] * dim + offs[None, :], mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    mean_square = tl.sum(xf * xf, axis=1) / dim
    normed = (xf * (1.0 / tl.sqrt_rn(mean_square + eps))[:, None]).to(dtype)
    condition = (b * stride_mb + cell * stride_mc)[:, None] + offs[None, :]
    scale = tl.load(SCALE + condition, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + condition, mask=mask, other=0.0).to(tl.float32)
    one_plus_scale = (1.0 + scale).to(dtype)
    out = (normed.to(tl.float32) * one_plus_scale.to(tl.float32)).to(dtype)
    out = (out.to(tl.float32) + shift).to(dtype)
    tl.store(OUT + rows[:, None] * dim + offs[None, :], out, mask=mask)


@triton.jit
def _gated_residual_kernel(X, H, GAMMA, OUT, stride_gb, stride_gc, num_tokens, tokens_per_cell, dim, numel,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = offs // dim
    b = row // num_tokens
    cell = (row % num_tokens) // tokens_per_cell
    x = tl.load(X + offs, mask=mask, other=0.0)
    dtype = x.dtype
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    gamma = tl.load(GAMMA + b * stride_gb + cell * stride_gc + offs % dim, mask=mask, other=0.0).to(tl.float32)
    gated = (h * gamma).to(dtype)
    tl.store(OUT + offs, (x.to(tl.float32) + gated.to(tl.float32)).to(dtype), mask=mask)


@triton.jit
def _gelu_mul_kernel(GATE, VALUE, OUT, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(GATE + offs, mask=mask, other=0.0)
    dtype = g.dtype
    gf = g.to(tl.float32)
    gelu = (0.5 * gf * (1.0 + tl.math.erf(gf * SQRT_HALF))).to(dtype)
    v = tl.load(VALUE + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (gelu.to(tl.float32) * v).to(dtype), mask=mask)


def _check_activation(name: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_condition(name: str, c: torch.Tensor, x: torch.Tensor, tokens_per_cell: int) -> None:
    B, N, D = x.shape
    if N % tokens_per_cell:
        raise ValueError(f"{N} tokens are not whole cells of {tokens_per_cell}")
    if c.shape != (B, N // tokens_per_cell, D) or c.dtype != x.dtype or c.device != x.device or c.stride(-1) != 1:
        raise ValueError(f"{name} must be [{B}, {N // tokens_per_cell}, {D}] in {x.dtype} on {x.device} with a "
                         f"contiguous last dimension, got {tuple(c.shape)} {c.dtype} on {c.device}")


# Fixed launch options: no fused multiply-add, so that each product and sum rounds as in PyTorch.
_LAUNCH = {"enable_fp_fusion": False}


def rms_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, tokens_per_cell: int,
                      eps: float) -> torch.Tensor:
    """``rms_norm(x) * (1 + scale) + shift`` for ``x`` [B, N, D] (contiguous), per cell of ``tokens_per_cell``
    tokens ``scale``, ``shift`` [B, N / tokens_per_cell, D]; as ``model.rms_norm_modulate``."""
    _check_activation("x", x)
    _check_condition("scale", scale, x, tokens_per_cell)
    _check_condition("shift", shift, x, tokens_per_cell)
    if scale.stride() != shift.stride():
        raise ValueError("scale and shift must have one layout")
    B, N, D = x.shape
    out = torch.empty_like(x)
    block_d = triton.next_power_of_2(D)
    # Whole rows per program, several when they are short (about 8k elements a program).
    block_m = max(1, min(64, 8192 // block_d))
    if out.numel():
        _rms_norm_modulate_kernel[(triton.cdiv(B * N, block_m),)](
            x, scale, shift, out, scale.stride(0), scale.stride(1), B * N, N, tokens_per_cell, D, eps,
            BLOCK_M=block_m, BLOCK_D=block_d, **_LAUNCH)
    return out


def gated_residual(x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor, tokens_per_cell: int) -> torch.Tensor:
    """``x + h * gamma`` for ``x``, ``h`` [B, N, D] (contiguous) and per cell ``gamma`` [B, N / tokens_per_cell, D];
    as ``model.gated_residual``."""
    _check_activation("x", x)
    _check_activation("h", h)
    if h.shape != x.shape or h.dtype != x.dtype:
        raise ValueError(f"h must be like x {tuple(x.shape)} {x.dtype}, got {tuple(h.shape)} {h.dtype}")
    _check_condition("gamma", gamma, x, tokens_per_cell)
    B, N, D = x.shape
    out = torch.empty_like(x)
    BLOCK = 1024
    if out.numel():
        _gated_residual_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, h, gamma, out, gamma.stride(0), gamma.stride(1), N,
                                                                 tokens_per_cell, D, x.numel(), BLOCK=BLOCK, **_LAUNCH)
    return out


def gelu_mul(gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``gelu(gate) * value`` (exact GELU) for two contiguous tensors of one shape; as ``model.gelu_mul``."""
    _check_activation("gate", gate)
    _check_activation("value", value)
    if value.shape != gate.shape or value.dtype != gate.dtype:
        raise ValueError(f"value must be like gate {tuple(gate.shape)} {gate.dtype}, got {tuple(value.shape)} {value.dtype}")
    out = torch.empty_like(gate)
    BLOCK = 1024
    if out.numel():
        _gelu_mul_kernel[(triton.cdiv(gate.numel(), BLOCK),)](gate, value, out, gate.numel(), BLOCK=BLOCK, **_LAUNCH)
    return out
