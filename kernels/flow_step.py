"""One flow-matching sampler step for the whole batch, in one launch.

Takes the network's velocity for the (possibly doubled: conditional rows, then unconditional) batch,
applies guidance per row, and writes the next state. Rules, in the state's dtype (float64 in the
released sampler), with the same operations in the same order as ``xar_infer.sampling.flow_step``:

* ``sde``: the released Euler-Maruyama step on the drift ``v - t * score``; noisy unless ``noise`` is None
  (the last step), or draws its own Philox noise when given ``philox_seed``;
* ``euler``: ``x + dt * v``, optionally also writing the guided velocity (Heun's predictor);
* ``heun``: ``x + dt / 2 * (previous + v)``, Heun's corrector.

Each row has its own flow time ``t`` and step ``dt`` (rows of different jobs step together), read from
device tensors by row: Triton passes Python floats as fp32, which would round the float64 schedule.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

RULES = {"sde": 0, "euler": 1, "heun": 2}


@triton.jit
def _sde_drift(v, x, t):
    score = -(x + (1 - t) * v) / t
    return v - 0.5 * (2 * t) * score


@triton.jit
def _sqrt_rn(v):
    # Correctly rounded like torch.sqrt: fp64 sqrt is; fp32 tl.sqrt may be approximate on GPUs.
    if v.dtype == tl.float64:
        return tl.sqrt(v)
    else:
        return tl.sqrt_rn(v)


@triton.jit
def _flow_step_kernel(
    X, V, NOISE, PREVIOUS, SCALES, T, DT, OUT, GUIDED,
    t_stride, dt_stride, row_size, numel, philox_seed, philox_offset,
    RULE: tl.constexpr, GUIDANCE: tl.constexpr, NOISE_KIND: tl.constexpr, WRITE_GUIDED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = offs // row_size
    # Stride 0: one time for every row. Masked lanes read t = 1, not a division by zero.
    t = tl.load(T + row * t_stride, mask=mask, other=1.0)
    dt = tl.load(DT + row * dt_stride, mask=mask, other=0.0)
    x = tl.load(X + offs, mask=mask, other=0.0)
    cond = tl.load(V + offs, mask=mask, other=0.0).to(x.dtype)
    if RULE == 0:
        cond = _sde_drift(cond, x, t)
    if GUIDANCE:
        # Rows with scale <= 1 keep the conditional term unchanged, bit for bit, as the reference does.
        scale = tl.load(SCALES + row, mask=mask, other=1.0)
        uncond = tl.load(V + numel + offs, mask=mask, other=0.0).to(x.dtype)
        if RULE == 0:
            uncond = _sde_drift(uncond, x, t)
        guided = tl.where(scale > 1, uncond + scale * (cond - uncond), cond)
    else:
        guided = cond

    if RULE == 0:
        if NOISE_KIND == 0:  # the last step lands on t = 0 without noise
            out = x + dt * guided
        else:
            if NOISE_KIND == 1:
                eps = tl.load(NOISE + offs, mask=mask, other=0.0).to(x.dtype)
            else:
                eps = tl.randn(philox_seed, philox_offset + offs).to(x.dtype)
            out = x + guided * dt + _sqrt_rn(2 * t) * (eps * _sqrt_rn(tl.abs(dt)))
    elif RULE == 1:
        out = x + dt * guided
    else:
        previous = tl.load(PREVIOUS + offs, mask=mask, other=0.0)
        out = x + dt * 0.5 * (previous + guided)
    tl.store(OUT + offs, out, mask=mask)
    if WRITE_GUIDED:
        tl.store(GUIDED + offs, guided, mask=mask)


def flow_step(rule: str, x: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
              scales: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              previous: torch.Tensor | None = None, return_guided: bool = False,
              philox_seed: int | None = None, philox_offset: int = 0):
    """Next state for ``x`` [R, ...] from ``velocity`` ([R, ...], or [2R, ...] = conditional ; unconditional
    when ``scales`` [R] is given). ``t``, ``dt``: the flow time and step, one for all rows (0-d) or
    one per row ([R]), on ``x``'s device, in ``x``'s dtype.
    ``noise``: like ``x``, for a noisy ``sde`` step; ``philox_seed`` instead draws it in the kernel
    (``philox_offset`` + element index selects the stream; not the released draw order).
    ``previous``: Heun's guided predictor velocity. Returns the next state, and the guided velocity if
    ``return_guided`` (``euler`` only)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {tuple(RULES)}")
    R, numel = x.shape[0], x.numel()
    guided_rows = 2 * R if scales is not None else R
    if velocity.shape[0] != guided_rows or velocity.shape[1:] != x.shape[1:]:
        raise ValueError(f"velocity {tuple(velocity.shape)} does not fit state {tuple(x.shape)} "
                         f"({'with' if scales is not None else 'without'} guidance)")
    if scales is not None and (scales.shape != (R,) or scales.dtype != x.dtype):
        raise ValueError(f"scales must be [{R}] in {x.dtype}, got {tuple(scales.shape)} {scales.dtype}")
    for name, value in (("t", t), ("dt", dt)):
        if value.dtype != x.dtype or value.shape not in ((), (R,)):
            raise ValueError(f"{name} must be one {x.dtype} value or one per row [{R}], got {tuple(value.shape)} "
                             f"{value.dtype}")
    if (noise is not None or philox_seed is not None) and rule != "sde":
        raise ValueError("noise is only used by the 'sde' rule")
    if noise is not None and (noise.shape != x.shape or noise.dtype != x.dtype):
        raise ValueError(f"noise must be like the state {tuple(x.shape)} {x.dtype}")
    if (rule == "heun") != (previous is not None) or (return_guided and rule != "euler"):
        raise ValueError("'heun' needs previous (the predictor's guided velocity); only 'euler' returns it")
    if any(v is not None and v.device != x.device for v in (velocity, t, dt, scales, noise, previous)):
        raise ValueError("flow_step needs all its tensors on one device")
    # The kernel indexes flat rows; a copy happens only for strided inputs (e.g. the velocity of a
    # call that also ran the previous cell).
    x, velocity = x.contiguous(), velocity.contiguous()
    noise = None if noise is None else noise.contiguous()
    previous = None if previous is None else previous.contiguous()
    t, dt = t.contiguous(), dt.contiguous()  # one value (read with stride 0) or one per row

    out = torch.empty_like(x)
    guided = torch.empty_like(x) if return_guided else out
    noise_kind = 1 if noise is not None else 2 if philox_seed is not None else 0
    BLOCK = 1024
    _flow_step_kernel[(triton.cdiv(numel, BLOCK),)](
        x, velocity, noise if noise is not None else x, previous if previous is not None else x,
        scales if scales is not None else x, t, dt, out, guided,
        1 if t.dim() else 0, 1 if dt.dim() else 0, numel // R, numel, philox_seed or 0, philox_offset,
        RULE=RULES[rule], GUIDANCE=scales is not None, NOISE_KIND=noise_kind, WRITE_GUIDED=return_guided,
        BLOCK=BLOCK,
    )
    return (out, guided) if return_guided else out
