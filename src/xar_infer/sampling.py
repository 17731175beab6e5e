"""Generating an image's tokens: cells one after another, each integrated from noise by flow matching.

Time runs from t=1 (noise) to t=0 (data) along ``x_t = (1 - t) x + t eps``; the network predicts the
velocity ``eps - x``. The sampler state stays float64 (float32 on MPS), as in the released sampler,
whatever the network's dtype. ``sde`` is the released Euler-Maruyama sampler; ``euler`` and ``heun``
integrate the probability-flow ODE deterministically.

The samplers are generators: they yield each network evaluation they need (an :class:`Evaluation`,
with the :class:`StateUpdate` its velocity makes) and are sent that update's result. Whoever runs the
network (``xar_infer.engine``) can so batch the evaluations of many images at different cells and
steps into one call, and their updates into one ``flow_step`` per kind (:func:`apply_updates`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


def flow_step(rule: str, x: Tensor, velocity: Tensor, t: Tensor, dt: Tensor, scales: Tensor | None = None,
              noise: Tensor | None = None, previous: Tensor | None = None, return_guided: bool = False):
    """One sampler step for R rows: guidance per row, then the state update of ``rule``.

    ``velocity``: the network's output for ``x`` [R, ...], or for the doubled batch [2R, ...]
    (conditional rows first) when ``scales`` [R] is given; a row with scale <= 1 uses its conditional
    velocity as is. ``t``: the flow time the velocity was evaluated at, ``dt``: the step to the next
    time, each one value for all rows (0-d) or one per row ([R]), in ``x``'s dtype, so that rows of
    different jobs, at different times, step together. Rules: ``sde``, the released Euler-Maruyama
    step on the drift (noiseless when ``noise`` is None: the last step); ``euler``, ``x + dt * v``
    (with ``return_guided``, also the guided ``v``); ``heun``, the corrector
    ``x + dt / 2 * (previous + v)``. Arithmetic in ``x``'s dtype, in the released order, elementwise:
    a row's result does not depend on the rows beside it. This is the reference for
    ``xar_infer.kernels.flow_step``.
    """
    per_row = (-1, *[1] * (x.dim() - 1))
    t, dt = t.view(per_row) if t.dim() else t, dt.view(per_row) if dt.dim() else dt
    cond, uncond = velocity.to(x.dtype).chunk(2) if scales is not None else (velocity.to(x.dtype), None)
    if rule == "sde":
        cond = sde_drift(cond, x, t)
        uncond = None if uncond is None else sde_drift(uncond, x, t)
    guided = cond
    if uncond is not None:
        scale = scales.view(per_row)
        guided = torch.where(scale > 1, uncond + scale * (cond - uncond), cond)
    if rule == "sde":
        return x + dt * guided if noise is None else x + guided * dt + torch.sqrt(2 * t) * (noise * torch.sqrt(dt.abs()))
    if rule == "euler":
        out = x + dt * guided
        return (out, guided) if return_guided else out
    if rule == "heun":
        return x + dt * 0.5 * (previous + guided)
    raise ValueError(f"unknown rule {rule!r}; choose one of ('sde', 'euler', 'heun')")


# step(rule, x, velocity, t, dt, scales, noise=, previous=, return_guided=): flow_step or its kernel.
StepFn = Callable[..., "Tensor | tuple[Tensor, Tensor]"]


@dataclass(frozen=True)
class StateUpdate:
    """A sampler step waiting for its velocity: ``flow_step(rule, x, velocity, t, dt, scales, noise,
    previous, return_guided)``. Whoever runs the network applies it (:func:`apply_updates`, which
    steps the updates of many jobs together) and sends the sampler the result."""

    rule: str
    x: Tensor
    t: Tensor  # 0-d, x's dtype and device
    dt: Tensor
    scales: Tensor | None = None  # per image, when the velocity holds both guidance halves
    noise: Tensor | None = None
    previous: Tensor | None = None
    return_guided: bool = False

    @property
    def kind(self) -> tuple:
        """What changes the arithmetic: updates of one kind run as one ``flow_step``."""
        return self.rule, self.scales is not None, self.noise is not None, self.return_guided


def apply_updates(updates: Sequence[StateUpdate], velocities: Sequence[Tensor], step: StepFn = flow_step) -> list:
    """Each update's result (as ``flow_step`` returns it) for its velocity, with one ``step`` per kind
    of update on the rows of every update of that kind, each row at its own ``t`` and ``dt``.

    This is how the engine steps all its jobs after a network call. ``flow_step`` is elementwise, so
    an update's rows get the same operations on the same values as when stepped alone: its result is
    the same to the bit.
    """
    groups: dict[tuple, list[int]] = {}
    for i, update in enumerate(updates):
        groups.setdefault(update.kind, []).append(i)
    results: list = [None] * len(updates)
    for members in groups.values():
        group = [updates[i] for i in members]
        first, sizes = group[0], [len(u.x) for u in group]
        if len(group) == 1:
            x, velocity, t, dt = first.x, velocities[members[0]], first.t, first.dt
            scales, noise, previous = first.scales, first.noise, first.previous
        else:
            x = torch.cat([u.x for u in group])
            velocity = [velocities[i] for i in members]
            if first.scales is not None:  # every update's conditional rows, then the unconditional ones
                velocity = [v[:n] for v, n in zip(velocity, sizes)] + [v[n:] for v, n in zip(velocity, sizes)]
            velocity = torch.cat(velocity)
            t = torch.cat([u.t.expand(n) for u, n in zip(group, sizes)])
            dt = torch.cat([u.dt.expand(n) for u, n in zip(group, sizes)])
            scales = None if first.scales is None else torch.cat([u.scales for u in group])
            noise = None if first.noise is None else torch.cat([u.noise for u in group])
            previous = None if first.previous is None else torch.cat([u.previous for u in group])
        out = step(first.rule, x, velocity, t, dt, scales, noise=noise, previous=previous,
                   return_guided=first.return_guided)
        if first.return_guided:
            for i, state, guided in zip(members, out[0].split(sizes), out[1].split(sizes)):
                results[i] = (state, guided)
        else:
            for i, state in zip(members, out.split(sizes)):
                results[i] = state
    return results


class StepTimes:
    """A cell's time grid for ``num_steps`` steps: the floats (for the network) and, on the state's
    device and dtype, each step's ``t`` and ``dt`` (made once, read as views at each step)."""

    def __init__(self, grid: Tensor, device: torch.device, dtype: torch.dtype):
        self.grid = grid.tolist()
        times = grid.to(device=device, dtype=dtype)
        self.t, self.dt = times[:-1], times[1:] - times[:-1]

    @property
    def num_steps(self) -> int:
        return len(self.grid) - 1


# What a cell sampler yields (the state to evaluate, its flow time, and the update its velocity makes)
# and is sent back (that update's result).
CellSampler = Generator[tuple[Tensor, float, StateUpdate], "Tensor | tuple[Tensor, Tensor]", Tensor]


def sample_cell_sde(x: Tensor, times: StepTimes, noise: "NoiseSource") -> CellSampler:
    """The released Euler-Maruyama sampler on ``sde_time_grid``: every step but the last noisy.

    Each noisy step draws its noise before evaluating the network, matching the released draw order.
    """
    n = times.num_steps
    for i in range(n):
        eps = None if i == n - 1 else noise.randn(x.shape[1:], x.dtype)
        x = yield x, times.grid[i], StateUpdate("sde", x, times.t[i], times.dt[i], noise=eps)
    return x


def sample_cell_euler(x: Tensor, times: StepTimes, noise: "NoiseSource") -> CellSampler:
    """Euler steps on the guided velocity over ``ode_time_grid``, from 1 to 0."""
    for i in range(times.num_steps):
        x = yield x, times.grid[i], StateUpdate("euler", x, times.t[i], times.dt[i])
    return x


def sample_cell_heun(x: Tensor, times: StepTimes, noise: "NoiseSource") -> CellSampler:
    """Heun's second-order method over ``ode_time_grid``; the step landing on t=0 is a plain Euler
    step, so ``num_steps`` steps cost ``2 * num_steps - 1`` evaluations."""
    n = times.num_steps
    for i in range(n):
        t, dt = times.t[i], times.dt[i]
        x_euler, guided = yield x, times.grid[i], StateUpdate("euler", x, t, dt, return_guided=True)
        if i == n - 1:
            x = x_euler
        else:
            x = yield x_euler, times.grid[i + 1], StateUpdate("heun", x, t, dt, previous=guided)
    return x


# Each sampler with its time grid (a function of the step count).
CELL_SAMPLERS = {"sde": (sample_cell_sde, sde_time_grid), "euler": (sample_cell_euler, ode_time_grid),
                 "heun": (sample_cell_heun, ode_time_grid)}


@dataclass(frozen=True)
class Evaluation:
    """One network evaluation that a batch of B images asks for.

    ``x`` [B, tokens_per_cell, channels]: the noisy state of cell ``cell`` at flow time ``t``.
    ``prefix``: on a cell's first evaluation, the previous cell (clean, at t=0), whose keys and values
    the call adds to the images' context. ``guide``: the velocity must hold both guidance halves,
    [2B, ...] with the conditional rows first; otherwise only the conditional [B, ...].
    ``both_halves``: the unconditional half's context is needed too (to guide now, or later), so a
    ``prefix`` is committed for both halves. ``update``: the sampler step that the velocity makes;
    the sampler is sent its result.
    """

    cell: int
    t: float
    x: Tensor
    prefix: Tensor | None
    guide: bool
    both_halves: bool
    update: StateUpdate


# What ``sample_image`` yields and is sent: evaluations, the results of their updates.
ImageSampler = Generator[Evaluation, "Tensor | tuple[Tensor, Tensor]", Tensor]


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
                 on_cell: Callable[[int, list[Tensor]], None] | None = None,
                 on_step: StepHook | None = None) -> ImageSampler:
    """Generate the latent [B, c, grid, grid] (model scale) of ``noise.batch_size`` images, cell by cell.

    Yields every network evaluation it needs (:class:`Evaluation`) and expects back the result of its
    ``update`` for the evaluation's velocity (``apply_updates([e.update], [velocity])[0]``; the
    engine steps many jobs' updates at once). With guidance the
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
    cell_sampler, time_grid = CELL_SAMPLERS[plan.sampler]
    step_times: dict[int, StepTimes] = {}  # per step count: most cells share one
    cells: list[Tensor] = []
    evaluations = 0
    for index, cell in enumerate(plan.cells):
        prefix = cells[-1] if cells else None
        scales = torch.full((B,), cell.scale, dtype=state_dtype, device=device)
        if cell.num_steps not in step_times:
            step_times[cell.num_steps] = StepTimes(time_grid(cell.num_steps), device, state_dtype)
        sampler = cell_sampler(noise.randn(cell_shape, torch.float32).to(state_dtype), step_times[cell.num_steps], noise)
        request = next(sampler)
        while True:
            x, t, update = request
            guide = plan.guides(index, t)
            if guide:
                update = replace(update, scales=scales)
            result = yield Evaluation(index, t, x, prefix, guide, guide or (plan.guided and prefix is not None), update)
            prefix = None
            try:
                request = sampler.send(result)
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


