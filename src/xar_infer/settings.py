"""How an image is sampled: the settings of one generation, checked once.

The command line, the pipeline and the engine all build a :class:`SamplingSettings`; after that no
code checks a setting again. :meth:`SamplingSettings.plan` turns settings into what the sampler does
per cell: its step count, its guidance scale and the flow times at which it calls the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .errors import InvalidArgumentError

SAMPLERS = ("sde", "euler", "heun")
GUIDANCE_SCHEDULES = ("linear", "constant")

# The network sees time quantised to 1000 levels: more steps per cell cannot resolve anything finer.
MAX_STEPS = 1000

# The released SDE sampler stops its stochastic steps here and takes one noiseless step to t=0.
SDE_LAST_NOISY_TIME = 0.04

# How each setting is called where it was given; the CLI passes its option names.
API_NAMES = {"num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale",
             "sampler": "sampler", "guidance_schedule": "guidance_schedule", "guidance_interval": "guidance_interval"}


def sde_time_grid(num_steps: int) -> torch.Tensor:
    """``num_steps`` times from 1 to 0.04, then 0: the last step is the noiseless one."""
    return torch.cat([torch.linspace(1.0, SDE_LAST_NOISY_TIME, num_steps, dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64)])


def ode_time_grid(num_steps: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def evaluation_times(sampler: str, num_steps: int) -> list[float]:
    """The flow times at which ``sampler`` evaluates the network in one cell of ``num_steps`` steps."""
    if sampler == "sde":
        return sde_time_grid(num_steps)[:num_steps].tolist()
    grid = ode_time_grid(num_steps)
    return grid[:num_steps].tolist() + (grid[1:num_steps].tolist() if sampler == "heun" else [])


def evaluations_per_cell(sampler: str, num_steps: int) -> int:
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def cell_guidance_scales(guidance_scale: float, num_cells: int, schedule: str = "linear") -> list[float]:
    """Guidance scale of each cell. ``linear`` (released): 1 for the first cell rising to the full scale
    at the last; ``constant``: the full scale everywhere."""
    if schedule not in GUIDANCE_SCHEDULES:
        raise InvalidArgumentError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or num_cells == 1:
        return [float(guidance_scale)] * num_cells
    return [(guidance_scale - 1) * s / (num_cells - 1) + 1 for s in range(num_cells)]


@dataclass(frozen=True)
class CellPlan:
    """One cell: ``num_steps`` sampler steps at guidance ``scale``."""

    num_steps: int
    scale: float


@dataclass(frozen=True)
class SamplingPlan:
    """What the sampler does in each cell of an image, and when it needs the unconditional half."""

    sampler: str
    cells: tuple[CellPlan, ...]
    guidance_interval: tuple[float, float]

    def guides(self, cell: int, t: float) -> bool:
        """Whether the call of ``cell`` at flow time ``t`` combines both guidance halves."""
        lo, hi = self.guidance_interval
        return self.cells[cell].scale > 1.0 and lo <= t <= hi

    @property
    def guided(self) -> bool:
        """Whether any call guides: then every image needs its unconditional half's context too."""
        return any(c.scale > 1.0 for c in self.cells)

    @property
    def num_evaluations(self) -> int:
        return sum(evaluations_per_cell(self.sampler, c.num_steps) for c in self.cells)

    @property
    def modulation_times(self) -> list[float]:
        """Every flow time the image's calls evaluate, 0 included (the previous cell, run clean)."""
        counts = {c.num_steps for c in self.cells}
        return sorted({0.0, *(t for n in counts for t in evaluation_times(self.sampler, n))})


@dataclass(frozen=True)
class SamplingSettings:
    """The settings of a generation, valid for a model of ``num_cells`` cells.

    ``steps_per_cell``: one count per cell (a single ``num_inference_steps`` repeated, or one per
    cell); ``guidance_scale`` >= 1 (1: no guidance); ``sampler``: ``sde`` (released), ``euler`` or
    ``heun``; ``guidance_schedule``: ``linear`` (released) or ``constant``; ``guidance_interval``:
    ``(lo, hi)`` flow times where guidance applies, or None for everywhere.
    """

    steps_per_cell: tuple[int, ...]
    guidance_scale: float
    sampler: str = "sde"
    guidance_schedule: str = "linear"
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self):
        # Made directly rather than by build(): the same checks, so no unchecked settings exist.
        checked = SamplingSettings.build(None, list(self.steps_per_cell), self.guidance_scale, self.sampler,
                                         self.guidance_schedule, self.guidance_interval, _construct=False)
        normalised = (self.steps_per_cell, self.guidance_scale, self.guidance_interval)
        if not isinstance(self.steps_per_cell, tuple) or checked != normalised:
            raise InvalidArgumentError(f"SamplingSettings: steps_per_cell must be a tuple of ints, guidance_scale a "
                                       f"float and guidance_interval None or a tuple of floats; use "
                                       f"SamplingSettings.build(...), which normalises them")

    @classmethod
    def build(cls, num_cells: int | None, num_inference_steps: int | Sequence[int], guidance_scale: float,
              sampler: str = "sde", guidance_schedule: str = "linear",
              guidance_interval: Sequence[float] | None = None,
              names: Mapping[str, str] = API_NAMES, _construct: bool = True) -> "SamplingSettings":
        """Check every setting and normalise it. ``num_cells`` None checks all but the length of a
        per-cell step list (for a model not loaded yet; the result then keeps a single count as one,
        to be repeated by ``plan``). ``names``: how to call each setting in errors (the CLI's option
        names show a step list as it is typed, ``10,8``)."""
        steps = num_inference_steps
        counts = list(steps) if isinstance(steps, (list, tuple)) else [steps]
        shown = ",".join(map(str, counts)) if dict(names) != API_NAMES else repr(steps)
        per_cell = "them" if num_cells is None else f"{num_cells} of them"
        if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
            raise InvalidArgumentError(f"{names['num_inference_steps']} must be a positive integer or a list of "
                                       f"{per_cell} (one per cell), got {shown}")
        if max(counts) > MAX_STEPS:
            raise InvalidArgumentError(f"{names['num_inference_steps']} must be at most {MAX_STEPS} per cell (the "
                                       f"network resolves time in {MAX_STEPS} levels), got {shown}")
        if num_cells is not None:
            if len(counts) == 1 and not isinstance(steps, (list, tuple)):
                counts = counts * num_cells
            if len(counts) != num_cells:
                raise InvalidArgumentError(f"{names['num_inference_steps']} must be a positive integer or a list of "
                                           f"{per_cell} (one per cell): {shown} gives {len(counts)} count{'s' * (len(counts) != 1)}, but this "
                                           f"model makes {num_cells} cells")
        scale = guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 1:
            raise InvalidArgumentError(f"{names['guidance_scale']} must be a finite number >= 1 (1 turns guidance off), "
                                       f"got {scale!r}")
        if sampler not in SAMPLERS:
            raise InvalidArgumentError(f"{names['sampler']} must be one of {SAMPLERS}, got {sampler!r}")
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise InvalidArgumentError(f"{names['guidance_schedule']} must be one of {GUIDANCE_SCHEDULES}, "
                                       f"got {guidance_schedule!r}")
        interval = guidance_interval
        if interval is not None and not (
                isinstance(interval, (tuple, list)) and len(interval) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
                and 0 <= interval[0] <= interval[1] <= 1):
            raise InvalidArgumentError(f"{names['guidance_interval']} must be (lo, hi) with 0 <= lo <= hi <= 1 (flow "
                                       f"times; 1 is noise), got {interval!r}")
        normalised = (tuple(counts), float(scale), None if interval is None else (float(interval[0]), float(interval[1])))
        if not _construct:
            return normalised
        return cls(normalised[0], normalised[1], sampler, guidance_schedule, normalised[2])

    def plan(self, num_cells: int) -> SamplingPlan:
        """What the sampler does in each of ``num_cells`` cells (a single step count applies to all)."""
        counts = self.steps_per_cell * num_cells if len(self.steps_per_cell) == 1 else self.steps_per_cell
        if len(counts) != num_cells:
            raise InvalidArgumentError(f"these settings give {len(self.steps_per_cell)} step counts, but this model "
                                       f"makes {num_cells} cells: give one count, or one per cell")
        scales = cell_guidance_scales(self.guidance_scale, num_cells, self.guidance_schedule)
        return SamplingPlan(self.sampler, tuple(CellPlan(n, s) for n, s in zip(counts, scales)),
                            self.guidance_interval or (0.0, 1.0))
