"""Where the engine keeps the jobs' adaLN modulations: one tensor for all of them (:class:`ModulationStore`),
each job's entries located by a :class:`JobTable`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..model import XARTransformer


class ModulationStore:
    """The adaLN modulations of the admitted jobs, for each (row, time) they will evaluate, in one tensor.

    The modulation depends only on the class and the quantised time, and the same few dozen times
    recur in every cell, so one batched product per block at admission replaces re-reading the
    ``ada_lin`` weights (half of xAR-B's) at each of the job's calls. Every job's entries live in one
    tensor [blocks, entries, 6 * dim] (each job a consecutive range: its rows, each at all its times),
    so that a call gathers the modulations of all its cells with one index. ``capacity_bytes`` bounds
    it; the tensor grows to what the jobs need, up to that.
    """

    def __init__(self, model: XARTransformer, capacity_bytes: int):
        c = model.config
        self.model = model
        self.capacity = max(0, capacity_bytes) // self.nbytes(model, 1, 1)  # entries
        self.values = torch.empty(c.num_layers, 0, 6 * c.dim, dtype=model.dtype, device=model.device)
        self._free = [(0, self.capacity)] if self.capacity else []  # (start, length), in order, merged

    @staticmethod
    def nbytes(model: XARTransformer, rows: int, num_times: int) -> int:
        """The memory of ``rows`` rows' modulations at ``num_times`` times."""
        c = model.config
        return c.num_layers * rows * num_times * 6 * c.dim * model.dtype.itemsize

    def add(self, labels: Tensor, times: Sequence[float], ops) -> "JobTable | None":
        """Compute and keep the modulations of rows of class ``labels`` at ``times``; None (nothing kept)
        when they do not fit."""
        size = len(labels) * len(times)
        start = next((start for start, length in self._free if length >= size), None)
        if start is None:
            return None
        grid = torch.tensor(list(times), dtype=torch.float64, device=labels.device)
        values = torch.stack(self.model.modulations(labels, grid[None].expand(len(labels), -1), ops))
        self._take(start, size)
        values = values.flatten(1, 2)  # [blocks, rows * times, 6 * dim], in the order entry() counts
        end = self.values.shape[1]
        if start + size <= end:
            self.values[:, start:start + size] = values
        elif end == 0:  # the first job's values are the store (a pipeline call's only job: no copy)
            self.values = values
        else:  # grow (doubling, within the capacity), keeping what is there
            grown = values.new_empty(values.shape[0], min(self.capacity, max(start + size, 2 * end)), values.shape[2])
            grown[:, :end] = self.values
            grown[:, start:start + size] = values
            self.values = grown
        return JobTable(start, len(labels), times)

    def remove(self, table: "JobTable") -> None:
        """The job left: its entries are free again."""
        free = sorted([*self._free, (table.start, table.size)])
        self._free = []
        for start, length in free:
            if self._free and self._free[-1][0] + self._free[-1][1] == start:
                self._free[-1] = (self._free[-1][0], self._free[-1][1] + length)
            else:
                self._free.append((start, length))

    def _take(self, start: int, size: int) -> None:
        i = next(i for i, (s, _) in enumerate(self._free) if s == start)
        length = self._free[i][1]
        self._free[i:i + 1] = [(start + size, length - size)] if length > size else []


class JobTable:
    """Where one job's modulations are in the :class:`ModulationStore`: row ``row`` at time ``t`` is
    entry ``start + row * len(times) + column[t]``."""

    def __init__(self, start: int, num_rows: int, times: Sequence[float]):
        self.start, self.num_times = start, len(times)
        self.size = num_rows * len(times)
        self.column = {t: i for i, t in enumerate(times)}

    def entry(self, row: int, t: float) -> int:
        return self.start + row * self.num_times + self.column[t]
