"""Generating an image's tokens: cells one after another, each integrated from noise by flow matching.

Time runs from t=1 (noise) to t=0 (data) along ``x_t = (1 - t) x + t eps``; the network predicts the
velocity ``eps - x``. The sampler state stays float64 (float32 on MPS), as in the released sampler,
whatever the network's dtype. ``sde`` is the released Euler-Maruyama sampler; ``euler`` and ``heun`` integrate the
probability-flow ODE deterministically.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

from .errors import InvalidArgumentError
from .model import BlockOps, XARTransformer

if TYPE_CHECKING:
    from .backends import Backend
    from .cuda_graphs import CUDAGraphs

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
    raise InvalidArgumentError(f"unknown guidance schedule {schedule!r}; choose one of {GUIDANCE_SCHEDULES}")


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


# The network sees time quantised to 1000 levels: more steps per cell cannot resolve anything finer.
MAX_STEPS = 1000


def cell_step_counts(num_steps: int | Sequence[int], num_cells: int) -> list[int]:
    """Steps of each cell: one count for all, or one per cell."""
    counts = list(num_steps) if isinstance(num_steps, (list, tuple)) else [num_steps] * num_cells
    if len(counts) != num_cells or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise InvalidArgumentError(f"num_inference_steps must be a positive integer or a list of {num_cells} of them "
                         f"(one per cell), got {num_steps!r}")
    if max(counts) > MAX_STEPS:
        raise InvalidArgumentError(f"num_inference_steps must be at most {MAX_STEPS} per cell (the network resolves time in "
                         f"{MAX_STEPS} levels), got {num_steps!r}")
    return counts


def check_guidance_interval(interval) -> None:
    """``None``, or ``(lo, hi)`` flow times with ``0 <= lo <= hi <= 1``."""
    if interval is not None and not (
            isinstance(interval, (tuple, list)) and len(interval) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
            and 0 <= interval[0] <= interval[1] <= 1):
        raise InvalidArgumentError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1 (flow times; 1 is noise), "
                         f"got {interval!r}")


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


def evaluation_times(sampler: str, num_steps: int) -> list[float]:
    """The flow times at which ``sampler`` evaluates the network; every cell uses the same ones."""
    if sampler == "sde":
        return sde_time_grid(num_steps)[:num_steps].tolist()
    grid = ode_time_grid(num_steps)
    return grid[:num_steps].tolist() + (grid[1:num_steps].tolist() if sampler == "heun" else [])


def modulation_times(sampler: str, steps_per_cell: Sequence[int]) -> list[float]:
    """Every flow time a generation call evaluates, 0 included (the previous cell, run clean)."""
    return sorted({0.0, *(t for n in set(steps_per_cell) for t in evaluation_times(sampler, n))})


# Above this size the modulations are computed per network call instead of all at once (at batch
# sizes that reach it, the per-call matmul is already efficient and a small part of the work).
MODULATION_TABLE_BYTES = 256 * 2**20


class ModulationTable:
    """Every block's adaLN modulation for each (row, time) a generation call will evaluate.

    The modulation depends only on the class and the quantised time, and the same few dozen times
    recur in every cell, so one batched matmul per block up front replaces re-reading the ``ada_lin``
    weights (a third of the model) at each of the hundreds of network calls.
    """

    def __init__(self, model: XARTransformer, labels: Tensor, times: Sequence[float], ops: BlockOps):
        self.index = {t: i for i, t in enumerate(times)}
        grid = torch.tensor(list(times), dtype=torch.float64, device=labels.device)
        self.per_block = model.modulations(labels, grid[None].expand(len(labels), -1), ops)

    @staticmethod
    def fits(model: XARTransformer, rows: int, num_times: int) -> bool:
        """Whether the table for ``rows`` labels and ``num_times`` times stays within ``MODULATION_TABLE_BYTES``."""
        c = model.config
        return c.num_layers * rows * num_times * 6 * c.dim * model.z_proj.weight.element_size() <= MODULATION_TABLE_BYTES

    def lookup(self, rows: int, times: Sequence[float]) -> list[Tensor]:
        """Per block, [rows, len(times), 6 * dim] for the first ``rows`` labels."""
        if len(times) == 1:
            i = self.index[times[0]]
            return [m[:rows, i:i + 1] for m in self.per_block]
        index = [self.index[t] for t in times]
        return [m[:rows, index] for m in self.per_block]


class NetworkCalls:
    """The network calls of one generation call, run eagerly: one KV cache, one modulation table.

    Rows ``[0, B)`` of ``labels`` are the conditional ones, ``[B, 2B)`` (when guided) the null class.
    ``xar_infer.cuda_graphs`` replays the same calls from captured graphs, with the same signature.
    """

    def __init__(self, model: XARTransformer, labels: Tensor, times: Sequence[float], ops: BlockOps):
        self.model, self.labels, self.ops = model, labels, ops
        self.cache = model.new_cache(len(labels))
        fits = ModulationTable.fits(model, len(labels), len(times))
        self.table = ModulationTable(model, labels, times, ops) if fits else None

    def __call__(self, x: Tensor, t: float, rows: int, prefix: Tensor | None) -> Tensor:
        """Velocity [rows, ...] of the noisy cell ``x`` [B, ...] at flow time ``t`` for the first ``rows``
        labels (``x`` repeated for the null half when ``rows`` is 2B), committing the clean cell
        ``prefix`` [B, ...] (given once per cell) to the cache first."""
        dtype = self.model.z_proj.weight.dtype
        copies = rows // len(x)
        inputs = torch.cat([x] * copies) if copies > 1 else x
        call_times = [t] if prefix is None else [0.0, t]
        return self.model(inputs.to(dtype), self.labels[:rows], torch.full((rows,), t, dtype=x.dtype, device=x.device),
                          self.cache, prefix=None if prefix is None else torch.cat([prefix] * copies),
                          ops=self.ops,
                          modulations=None if self.table is None else self.table.lookup(rows, call_times))


@torch.no_grad()
def generate_tokens(
    model: XARTransformer,
    labels: Tensor,
    num_steps: int | Sequence[int],
    guidance_scale: float,
    noise: NoiseSource,
    sampler: str = "sde",
    guidance_schedule: str = "linear",
    on_evaluation: Callable[[], None] | None = None,
    backend: "Backend | None" = None,
    guidance_interval: tuple[float, float] | None = None,
    cuda_graphs: "CUDAGraphs | None" = None,
) -> Tensor:
    """Generate the latent [B, c, grid, grid] (model scale, not yet divided by ``latent_scale``).

    Cells are generated in order. Every network call of a cell sees the finished cells through one KV
    cache made for this call; the first call of each cell also runs the previous cell, clean at t=0,
    and caches it. With guidance the batch is doubled (conditional rows first, null class after), as
    in the released sampler, except where the unconditional half would be thrown away: the calls of
    a cell with scale <= 1 (the first cell under the linear schedule) run the conditional rows only,
    unless they must cache the previous cell for both halves. ``backend``: the block ops and step
    implementations (``xar_infer.backends``; PyTorch when None). ``cuda_graphs``: replay the network
    calls from CUDA graphs (``xar_infer.cuda_graphs``) instead of running them eagerly; same result.

    Two opt-in settings change the output (the released sampler has neither): ``num_steps`` as one
    count per cell (later cells, with more context, can take fewer steps), and ``guidance_interval``
    ``(lo, hi)``: guidance only at flow times ``lo <= t <= hi``, the conditional rows alone elsewhere.
    """
    if backend is None:
        from .backends import TORCH as backend
    config = model.config
    if sampler not in CELL_SAMPLERS:
        raise InvalidArgumentError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    scales = cell_guidance_scales(guidance_scale, config.num_cells, guidance_schedule)
    steps_per_cell = cell_step_counts(num_steps, config.num_cells)
    guided = any(s > 1.0 for s in scales)
    lo, hi = guidance_interval if guidance_interval is not None else (0.0, 1.0)
    batch_labels = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    dtype = model.z_proj.weight.dtype
    # float64 like the released sampler; MPS has no float64.
    state_dtype = torch.float32 if labels.device.type == "mps" else torch.float64
    cell_shape = (config.tokens_per_cell, config.token_channels)
    times = modulation_times(sampler, steps_per_cell)
    B = len(labels)

    def step(rule: str, x: Tensor, v: Tensor, times: Tensor, i: int, scales: Tensor | None, **kwargs):
        # An unguided call returns the conditional rows only.
        return backend.flow_step(rule, x, v, times, i, scales if len(v) > len(x) else None, **kwargs)

    session = (nullcontext(NetworkCalls(model, batch_labels, times, backend.ops)) if cuda_graphs is None
               else cuda_graphs.session(model, batch_labels, times, backend.ops))
    cells: list[Tensor] = []
    with session as network:
        for scale, cell_steps in zip(scales, steps_per_cell):
            prefix = cells[-1].to(dtype) if cells else None

            def velocity(x: Tensor, t: float, first: bool, prefix=prefix, scale=scale) -> Tensor:
                with_prefix = first and prefix is not None
                guide = scale > 1.0 and lo <= t <= hi
                # Both halves run to guide, or to cache the previous cell for later guided calls.
                rows = 2 * B if guide or (guided and with_prefix) else B
                v = network(x, t, rows, prefix if with_prefix else None)
                if on_evaluation is not None:
                    on_evaluation()
                return v if guide else v[:B]

            row_scales = torch.full((B,), scale, dtype=state_dtype, device=labels.device)
            x = noise.randn(cell_shape, torch.float32).to(state_dtype)
            x = CELL_SAMPLERS[sampler](velocity, x, cell_steps, row_scales, noise, step)
            cells.append(x.float())
    return tokens_to_latent(torch.cat(cells, dim=1), config.grid_size, config.cell_size)
