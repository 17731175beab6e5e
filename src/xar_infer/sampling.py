"""Generating an image's tokens: cells one after another, each integrated from noise by flow matching.

Time runs from t=1 (noise) to t=0 (data) along ``x_t = (1 - t) x + t eps``; the network predicts the
velocity ``eps - x``. The sampler state stays float64 (float32 on MPS), as in the released sampler,
whatever the network's dtype. ``sde`` is the released Euler-Maruyama sampler; ``euler`` and ``heun``
integrate the probability-flow ODE deterministically.

The samplers are generators: they yield each network evaluation they need (an :class:`Evaluation`)
and are sent its velocity. Whoever runs the network (``xar_infer.engine``) can so batch the
evaluations of many images at different cells and steps into one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Sequence

import torch
from torch import Tensor

from .errors import InvalidArgumentError
from .settings import SamplingPlan, ode_time_grid, sde_time_grid


class NoiseSource:
    """Draws Gaussian noise for a batch from one generator (shared draw order) or one per image.

    With one generator (or None: torch's default one) each draw covers the whole batch at once, which
    is the released code's order. With a list, image i draws only from ``generators[i]``, so an image
    depends on its own seed alone, not on batch size or position.
    """

    def __init__(self, generator: torch.Generator | Sequence[torch.Generator] | None, batch_size: int, device: torch.device):
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise InvalidArgumentError(f"generator: got {len(generator)} generators for {batch_size} images; pass one "
                                           "per image or a single one")
            bad = next((i for i, g in enumerate(generator) if not isinstance(g, torch.Generator)), None)
            if bad is not None:
                raise InvalidArgumentError(f"generator[{bad}] is a {type(generator[bad]).__name__}, not a torch.Generator; "
                                           "e.g. torch.Generator().manual_seed(seed)")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise InvalidArgumentError(f"generator must be a torch.Generator, a list of one per image, or None; got "
                                       f"{type(generator).__name__} {generator!r:.40}: for a seed, pass "
                                       "torch.Generator().manual_seed(seed)")
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

# What a cell sampler yields (the state to evaluate and its flow time) and is sent back (the velocity,
# and the per-row guidance scales when it holds both halves, else None).
CellSampler = Generator[tuple[Tensor, float], tuple[Tensor, "Tensor | None"], Tensor]


def sample_cell_sde(x: Tensor, num_steps: int, noise: "NoiseSource", step: StepFn = flow_step) -> CellSampler:
    """The released Euler-Maruyama sampler: ``num_steps`` evaluations, every step but the last noisy.

    Each noisy step draws its noise before evaluating the network, matching the released draw order.
    """
    grid = sde_time_grid(num_steps)
    times = grid.to(device=x.device, dtype=x.dtype)
    for i in range(num_steps):
        eps = None if i == num_steps - 1 else noise.randn(x.shape[1:], x.dtype)
        v, scales = yield x, float(grid[i])
        x = step("sde", x, v, times, i, scales, noise=eps)
    return x


def sample_cell_euler(x: Tensor, num_steps: int, noise: "NoiseSource", step: StepFn = flow_step) -> CellSampler:
    """Euler steps on the guided velocity over a uniform grid from 1 to 0."""
    grid = ode_time_grid(num_steps)
    times = grid.to(device=x.device, dtype=x.dtype)
    for i in range(num_steps):
        v, scales = yield x, float(grid[i])
        x = step("euler", x, v, times, i, scales)
    return x


def sample_cell_heun(x: Tensor, num_steps: int, noise: "NoiseSource", step: StepFn = flow_step) -> CellSampler:
    """Heun's second-order method over a uniform grid; the step landing on t=0 is a plain Euler step,
    so ``num_steps`` steps cost ``2 * num_steps - 1`` evaluations."""
    grid = ode_time_grid(num_steps)
    times = grid.to(device=x.device, dtype=x.dtype)
    for i in range(num_steps):
        v, scales = yield x, float(grid[i])
        x_euler, guided = step("euler", x, v, times, i, scales, return_guided=True)
        if i == num_steps - 1:
            x = x_euler
        else:
            v, scales = yield x_euler, float(grid[i + 1])
            x = step("heun", x, v, times, i, scales, previous=guided)
    return x


CELL_SAMPLERS = {"sde": sample_cell_sde, "euler": sample_cell_euler, "heun": sample_cell_heun}


@dataclass(frozen=True)
class Evaluation:
    """One network evaluation that a batch of B images asks for.

    ``x`` [B, tokens_per_cell, channels]: the noisy state of cell ``cell`` at flow time ``t``.
    ``prefix``: on a cell's first evaluation, the previous cell (clean, at t=0), whose keys and values
    the call adds to the images' context. ``guide``: the velocity must hold both guidance halves,
    [2B, ...] with the conditional rows first; otherwise only the conditional [B, ...].
    ``both_halves``: the unconditional half's context is needed too (to guide now, or later), so a
    ``prefix`` is committed for both halves.
    """

    cell: int
    t: float
    x: Tensor
    prefix: Tensor | None
    guide: bool
    both_halves: bool


# What ``sample_image`` yields and is sent: evaluations, velocities.
ImageSampler = Generator[Evaluation, Tensor, Tensor]


@dataclass(frozen=True)
class Step:
    """What an ``on_step`` hook of :func:`sample_image` is shown after each network evaluation.

    ``index``: the evaluation's number in the image's sampling, from 0. ``t``: its flow time (1 is
    noise). ``cell``: the cell it was for. ``x`` [B, tokens_per_cell, channels], the sampler's state
    dtype: the state the next evaluation reads (for Heun's corrector, the Euler estimate it is
    evaluated at); after the cell's last evaluation, the finished cell. ``cells``: the finished cells,
    float32, that one included.
    """

    index: int
    t: float
    cell: int
    x: Tensor
    cells: list[Tensor]


class StopSampling(Exception):
    """Raised by an ``on_step`` hook to end sampling at once: :func:`sample_image` then returns the
    finished cells, with zeros for the cell under way and those after it."""


# on_step(step) -> None, or a tensor of x's shape that replaces x; or raises StopSampling.
StepHook = Callable[[Step], "Tensor | None"]


def sample_image(plan: SamplingPlan, noise: "NoiseSource", cell_shape: tuple[int, int], grid_size: int, cell_size: int,
                 step: StepFn = flow_step, on_cell: Callable[[int, list[Tensor]], None] | None = None,
                 on_step: StepHook | None = None) -> ImageSampler:
    """Generate the latent [B, c, grid, grid] (model scale) of ``noise.batch_size`` images, cell by cell.

    Yields every network evaluation it needs and expects its velocity back. With guidance the
    unconditional half runs only where it is used (the cells with scale > 1, inside the guidance
    interval) and where its context must grow (a cell's first call when any cell guides), as in the
    released sampler, which computes and then discards the rest. ``on_cell(index, cells)`` is called
    after every finished cell with the clean cells so far ([B, tokens, channels] float32 each).

    ``on_step(step)`` is called after every evaluation has moved the state (:class:`Step`). A tensor
    it returns replaces ``step.x`` from then on: it is copied into the state the cell sampler holds
    (the samplers keep no other copy), or, after a cell's last evaluation, it becomes the finished
    cell, which the next cell then sees as its context. ``StopSampling`` from it ends the sampling.
    """
    device = noise.device
    # float64 like the released sampler; MPS has no float64.
    state_dtype = torch.float32 if device.type == "mps" else torch.float64
    B = noise.batch_size
    cells: list[Tensor] = []
    evaluations = 0
    for index, cell in enumerate(plan.cells):
        prefix = cells[-1] if cells else None
        scales = torch.full((B,), cell.scale, dtype=state_dtype, device=device)
        sampler = CELL_SAMPLERS[plan.sampler](noise.randn(cell_shape, torch.float32).to(state_dtype), cell.num_steps,
                                              noise, step)
        request = next(sampler)
        while True:
            x, t = request
            guide = plan.guides(index, t)
            velocity = yield Evaluation(index, t, x, prefix, guide, guide or (plan.guided and prefix is not None))
            prefix = None
            try:
                request = sampler.send((velocity, scales if guide else None))
                state = request[0]
            except StopIteration as finished:
                request, state = None, finished.value
            if on_step is not None:
                shown = cells if request is not None else [*cells, state.float()]
                try:
                    replacement = on_step(Step(evaluations, t, index, state, shown))
                except StopSampling:
                    sampler.close()
                    no_cell = state.new_zeros(B, 0, state.shape[2], dtype=torch.float32)
                    return cells_to_latent(shown or [no_cell], grid_size, cell_size)
                if replacement is not None:
                    if request is None:
                        state = replacement.to(device=state.device, dtype=state.dtype)
                    else:
                        state.copy_(replacement.clone())  # a copy first: the replacement may view the state
            evaluations += 1
            if request is None:
                cells.append(state.float())
                break
        if on_cell is not None:
            on_cell(index, cells)
    return tokens_to_latent(torch.cat(cells, dim=1), grid_size, cell_size)


def cells_to_latent(cells: list[Tensor], grid_size: int, cell_size: int) -> Tensor:
    """The latent [B, c, grid, grid] of the first ``len(cells)`` cells ([B, tokens, c] each), zero elsewhere."""
    tokens = torch.cat(cells, dim=1)
    missing = grid_size**2 - tokens.shape[1]
    tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], missing, tokens.shape[2])], dim=1)
    return tokens_to_latent(tokens, grid_size, cell_size)


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


