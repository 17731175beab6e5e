"""What the engine is asked for (:class:`GenerationRequest`, public) and what it tracks (:class:`Job`)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..sampling import Evaluation, ImageSampler
from ..settings import SamplingPlan


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate. Settings left as None take the model's defaults.

    ``class_label``: a class id or an ImageNet name. ``seed``: the image's own seed (its noise comes
    from ``torch.Generator().manual_seed(seed)``, so it equals ``pipe([class_label],
    generator=[torch.Generator().manual_seed(seed)])``); None draws one, reported as ``future.seed``.
    ``num_inference_steps``: a count, or one per cell. ``output_type``: ``"latent"``, ``"pt"``,
    ``"np"`` or ``"pil"``, as in the pipeline.
    """

    class_label: int | str
    seed: int | None = None
    num_inference_steps: int | Sequence[int] | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    guidance_schedule: str | None = None
    guidance_interval: tuple[float, float] | None = None
    output_type: str = "latent"


class GenerationFuture(Future):
    """A request's result. Unlike a plain ``Future``, ``cancel()`` also works while the request runs:
    the engine drops it before its next network call and frees its cache slots."""

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = seed


# on_cell(index, latent_so_far): called by the engine's thread after each finished cell.
CellCallback = Callable[[int, Tensor], None]


class Job:
    """B images generated together with one sampler (a request, or a pipeline call's batch).

    The job owns its sampler generator, its cache slots (given by the scheduler) and its entries in
    the engine's modulation store; the engine advances it one evaluation per network call.
    """

    def __init__(self, labels: Tensor, plan: SamplingPlan, sampler: ImageSampler,
                 future: Future, finish: Callable[[Tensor], Any], on_evaluation: Callable[[], None] | None = None):
        self.labels = labels
        self.plan = plan
        self.sampler = sampler
        self.future = future
        self.finish = finish  # latent -> the future's result
        self.on_evaluation = on_evaluation
        self.slots: list[int] = []  # conditional rows, then the unconditional ones when guided
        self.table = None  # where its modulations are in the engine's store, if they fit
        self.row_labels: list[int] = []  # the label of each slot's row, known at admission
        self.pending: Evaluation | None = None  # the evaluation the next network call computes

    @property
    def batch_size(self) -> int:
        return len(self.labels)

    @property
    def num_slots(self) -> int:
        return self.batch_size * (2 if self.plan.guided else 1)
