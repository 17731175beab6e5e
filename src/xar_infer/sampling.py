"""Generating an image's tokens: cells one after another, each integrated from noise by flow matching.

Time runs from t=1 (noise) to t=0 (data) along ``x_t = (1 - t) x + t eps``; the network predicts the
velocity ``eps - x``. The sampler state stays float64 (float32 on MPS), as in the released sampler,
whatever the network's dtype. ``sde`` is the released Euler-Maruyama sampler; ``euler`` and ``heun`` integrate the
probability-flow ODE deterministically.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

from .model import XARTransformer

if TYPE_CHECKING:
    from .backends import Backend

SAMPLERS = ("sde", "euler", "heun")
GUIDANCE_SCHEDULES = ("linear", "constant")

# The released SDE sampler stops its stochastic steps here and takes one noiseless step to t=0.
SDE_LAST_NOISY_TIME = 0.04

# velocity(x, t, first) -> the network's velocity for x (for the doubled batch when guided).
VelocityFn = Callable[[Tensor, float, bool], Tensor]


class NoiseSource:
    """Draws Gaussian noise for a batch from one generator (shared draw order) or one per image.

    With one generator (or None: torch's default one) each draw covers the whole batch at once, which
    is the released code's order. With a list, image i draws only from ``generators[i]``, so an image
    depends on its own seed alone, not on batch size or position.
    """

    def __init__(self, generator: torch.Generator | Sequence[torch.Generator] | None, batch_size: int, device: torch.device):
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one per image or a single one")
        self.generator = generator
        self.batch_size = batch_size
        self.device = device

    def randn(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """Noise of shape [batch, *shape] on the target device."""
        if isinstance(self.generator, (list, tuple)):
            parts = [torch.randn((1, *shape), generator=g, dtype=dtype, device=g.device) for g in self.generator]
            return torch.cat([p.to(self.device) for p in parts])
        device = self.generator.device if self.generator is not None else self.device
        return torch.randn((self.batch_size, *shape), generator=self.generator, dtype=dtype, device=device).to(self.device)


def sde_time_grid(num_steps: int) -> Tensor:
    """``num_steps`` times from 1 to 0.04, then 0: the last step is the noiseless one."""
    return torch.cat([torch.linspace(1.0, SDE_LAST_NOISY_TIME, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def ode_time_grid(num_steps: int) -> Tensor:
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def cell_guidance_scales(guidance_scale: float, num_cells: int, schedule: str = "linear") -> list[float]:
    """Guidance scale of each cell. ``linear`` (released): 1 for the first cell rising to the full scale
    at the last; ``constant``: the full scale everywhere."""
    if schedule == "constant" or num_cells == 1:
        return [float(guidance_scale)] * num_cells
    if schedule == "linear":
        return [(guidance_scale - 1) * s / (num_cells - 1) + 1 for s in range(num_cells)]
    raise ValueError(f"unknown guidance schedule {schedule!r}; choose one of {GUIDANCE_SCHEDULES}")


def sde_drift(v: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """Drift of the reverse SDE with diffusion 2t, from the velocity: ``v - t * score``."""
    score = -(x + (1 - t) * v) / t
    return v - 0.5 * (2 * t) * score


def flow_step(rule: str, x: Tensor, velocity: Tensor, times: Tensor, step: int, scales: Tensor | None = None,
              noise: Tensor | None = None, previous: Tensor | None = None, return_guided: bool = False):
    """One sampler step for the batch: guidance per row, then the state update of ``rule``.

    ``velocity``: the network's output for ``x`` [R, ...], or for the doubled batch [2R, ...]
    (conditional rows first) when ``scales`` [R] is given; a row with scale <= 1 uses its conditional
    velocity as is. ``t = times[step]``, ``dt = times[step + 1] - t``. Rules: ``sde``, the released
    Euler-Maruyama step on the drift (noiseless when ``noise`` is None: the last step); ``euler``,
    ``x + dt * v`` (with ``return_guided``, also the guided ``v``); ``heun``, the corrector
    ``x + dt / 2 * (previous + v)``. Arithmetic in ``x``'s dtype, in the released order. This is the
    reference for ``xar_infer.kernels.flow_step``.
    """
    t, dt = times[step], times[step + 1] - times[step]
    cond, uncond = velocity.to(x.dtype).chunk(2) if scales is not None else (velocity.to(x.dtype), None)
    if rule == "sde":
        cond = sde_drift(cond, x, t)
        uncond = None if uncond is None else sde_drift(uncond, x, t)
    guided = cond
    if uncond is not None:
        scale = scales.view(-1, *[1] * (x.dim() - 1))
        guided = torch.where(scale > 1, uncond + scale * (cond - uncond), cond)
    if rule == "sde":
        return x + dt * guided if noise is None else x + guided * dt + torch.sqrt(2 * t) * (noise * torch.sqrt(dt.abs()))
    if rule == "euler":
        out = x + dt * guided
        return (out, guided) if return_guided else out
    if rule == "heun":
        return x + dt * 0.5 * (previous + guided)
    raise ValueError(f"unknown rule {rule!r}; choose one of ('sde', 'euler', 'heun')")


# step(rule, x, velocity, times, step, scales, ...): flow_step or its kernel.
StepFn = Callable[..., Tensor]


def sample_cell_sde(velocity: VelocityFn, x: Tensor, num_steps: int, scales: Tensor | None, noise: NoiseSource,
                    step: StepFn = flow_step) -> Tensor:
    """The released Euler-Maruyama sampler: ``num_steps`` evaluations, every step but the last noisy.

    Each noisy step draws its noise before evaluating the network, matching the released draw order.
    """
    grid = sde_time_grid(num_steps)
    times = grid.to(device=x.device, dtype=x.dtype)
    for i in range(num_steps):
        eps = None if i == num_steps - 1 else noise.randn(x.shape[1:], x.dtype)
        x = step("sde", x, velocity(x, float(grid[i]), i == 0), times, i, scales, noise=eps)
    return x


def sample_cell_euler(velocity: VelocityFn, x: Tensor, num_steps: int, scales: Tensor | None, noise: NoiseSource,
                      step: StepFn = flow_step) -> Tensor:
    """Euler steps on the guided velocity over a uniform grid from 1 to 0."""
    grid = ode_time_grid(num_steps)
    times = grid.to(device=x.device, dtype=x.dtype)
    for i in range(num_steps):
        x = step("euler", x, velocity(x, float(grid[i]), i == 0), times, i, scales)
    return x


def sample_cell_heun(velocity: VelocityFn, x: Tensor, num_steps: int, scales: Tensor | None, noise: NoiseSource,
                     step: StepFn = flow_step) -> Tensor:
    """Heun's second-order method over a uniform grid; the step landing on t=0 is a plain Euler step,
    so ``num_steps`` steps cost ``2 * num_steps - 1`` evaluations."""
    grid = ode_time_grid(num_steps)
    times = grid.to(device=x.device, dtype=x.dtype)
    for i in range(num_steps):
        x_euler, v = step("euler", x, velocity(x, float(grid[i]), i == 0), times, i, scales, return_guided=True)
        if i == num_steps - 1:
            x = x_euler
        else:
            x = step("heun", x, velocity(x_euler, float(grid[i + 1]), False), times, i, scales, previous=v)
    return x


CELL_SAMPLERS = {"sde": sample_cell_sde, "euler": sample_cell_euler, "heun": sample_cell_heun}


def evaluations_per_cell(sampler: str, num_steps: int) -> int:
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def tokens_to_latent(tokens: Tensor, grid_size: int, cell_size: int) -> Tensor:
    """[B, seq_len, c] tokens in cell order -> [B, c, grid, grid] latent."""
    B, _, c = tokens.shape
    n = grid_size // cell_size
    return tokens.reshape(B, n, n, cell_size, cell_size, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, grid_size, grid_size)


def latent_to_tokens(latent: Tensor, cell_size: int) -> Tensor:
    """[B, c, grid, grid] latent -> [B, seq_len, c] tokens in cell order (the inverse of ``tokens_to_latent``)."""
    B, c, g, _ = latent.shape
    n = g // cell_size
    return latent.reshape(B, c, n, cell_size, n, cell_size).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, c)


@torch.no_grad()
def generate_tokens(
    model: XARTransformer,
    labels: Tensor,
    num_steps: int,
    guidance_scale: float,
    noise: NoiseSource,
    sampler: str = "sde",
    guidance_schedule: str = "linear",
    on_evaluation: Callable[[], None] | None = None,
    backend: "Backend | None" = None,
) -> Tensor:
    """Generate the latent [B, c, grid, grid] (model scale, not yet divided by ``latent_scale``).

    Cells are generated in order. Every network call of a cell sees the finished cells through one KV
    cache made for this call; the first call of each cell also runs the previous cell, clean at t=0,
    and caches it. With guidance the batch is doubled (conditional rows first, null class after) on
    every call, as in the released sampler. ``backend``: the attention and step implementations
    (``xar_infer.backends``; PyTorch when None).
    """
    if backend is None:
        from .backends import TORCH as backend
    config = model.config
    if sampler not in CELL_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    scales = cell_guidance_scales(guidance_scale, config.num_cells, guidance_schedule)
    guided = any(s > 1.0 for s in scales)
    batch_labels = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    cache = model.new_cache(len(batch_labels))
    dtype = model.z_proj.weight.dtype
    # float64 like the released sampler; MPS has no float64.
    state_dtype = torch.float32 if labels.device.type == "mps" else torch.float64
    cell_shape = (config.tokens_per_cell, config.token_channels)

    cells: list[Tensor] = []
    for scale in scales:
        prefix = cells[-1].to(dtype) if cells else None
        if prefix is not None and guided:
            prefix = torch.cat([prefix, prefix])

        def velocity(x: Tensor, t: float, first: bool, prefix=prefix) -> Tensor:
            inputs = torch.cat([x, x]) if guided else x
            times = torch.full((len(inputs),), t, dtype=x.dtype, device=x.device)
            v = model(inputs.to(dtype), batch_labels, times, cache, prefix=prefix if first else None,
                      attention=backend.attention)
            if on_evaluation is not None:
                on_evaluation()
            return v

        row_scales = torch.full((len(labels),), scale, dtype=state_dtype, device=labels.device) if guided else None
        x = noise.randn(cell_shape, torch.float32).to(state_dtype)
        x = CELL_SAMPLERS[sampler](velocity, x, num_steps, row_scales, noise, backend.flow_step)
        cells.append(x.float())
    return tokens_to_latent(torch.cat(cells, dim=1), config.grid_size, config.cell_size)
