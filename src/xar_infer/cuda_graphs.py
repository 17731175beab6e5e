"""Network calls replayed from CUDA graphs, so that small batches are not bound by kernel launches.

At batch 1 a network call of xAR-B is a few hundred small kernels, and on a GPU launching them takes
far longer than running them. But a generation call makes only a few kinds of network call, and every
call of one kind has the same shapes and reads and writes the same cache positions: for each cell, the
first call (the previous cell, clean, then this one) and the later ones, each for the conditional rows
or both guidance halves. So each kind is captured once as a CUDA graph and then replayed, with its
inputs (the noisy cell, the previous cell, the flow time) copied into static buffers first.

A graph records the addresses it reads and writes, so the buffers, the KV cache and the modulation
table belong to a :class:`CUDAGraphs` object and outlive a generation call: the next call with the same
model, batch and time grid reuses every graph. Anything else rebuilds them. A lock keeps two threads
from sharing the buffers; give each pipeline its own object.

Replays run the very kernels of the eager call on the same values, so the images are identical.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .errors import InvalidArgumentError
from .model import BlockOps, XARTransformer
from .engine.engine import ModulationTable


class _Graph:
    """One captured call: ``replay()`` reruns its kernels, which leave the result in ``output``."""

    def __init__(self, fn: Callable[[], Tensor], capture: bool, pool):
        if not capture:
            # Off CUDA the same function reruns eagerly on the same buffers: how the bookkeeping is tested.
            self.graph, self.fn, self.output = None, fn, None
            return
        # Warm up on a side stream first, as capture requires: Triton compiles, cuBLAS sets up.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a capture here must not make another thread's CUDA calls fail.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = fn()

    def replay(self) -> Tensor:
        if self.graph is None:
            self.output = self.fn()
        else:
            self.graph.replay()
        return self.output


class _GraphedCalls:
    """Static inputs, cache and graphs for one (model, batch labels, time grid, block ops) setting."""

    def __init__(self, model: XARTransformer, labels: Tensor, times: Sequence[float], ops: BlockOps,
                 capture: bool):
        config, device = model.config, labels.device
        rows = len(labels)
        self.model, self.ops, self.capture = model, ops, capture
        # A moved or re-cast model has new weight tensors, which the graphs would not read.
        self.weight_ptr = model.z_proj.weight.data_ptr()
        self.times = tuple(times)
        self.labels = labels.clone()
        self.cache = model.new_cache(rows)
        cell = (rows, config.tokens_per_cell, config.token_channels)
        self.x = torch.zeros(cell, dtype=model.z_proj.weight.dtype, device=device)
        self.prefix = torch.zeros_like(self.x)
        # The time is read only without a modulation table (the call then computes the modulation).
        self.t = torch.zeros(rows, dtype=torch.float64, device=device)
        # Columns of the modulation table: [time] for a later call, [0, time] for a cell's first call.
        self.time_index = torch.zeros(2, dtype=torch.long, device=device)
        self.table = None
        if ModulationTable.fits(model, rows, len(times)):
            self.table = torch.zeros(config.num_layers, rows, len(times), 6 * config.dim, dtype=self.x.dtype, device=device)
        self.column = {t: i for i, t in enumerate(self.times)}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[tuple[int, bool, int], _Graph] = {}

    def matches(self, model: XARTransformer, labels: Tensor, times: Sequence[float], ops: BlockOps) -> bool:
        weight = model.z_proj.weight
        return (model is self.model and weight.data_ptr() == self.weight_ptr and weight.dtype == self.x.dtype
                and ops is self.ops and tuple(times) == self.times and labels.shape == self.labels.shape
                and labels.device == self.labels.device)

    def refill(self, labels: Tensor) -> None:
        """Start a generation call for ``labels`` (same count as before): new modulations, empty cache."""
        self.labels.copy_(labels)
        if self.table is not None:
            self.table.copy_(torch.stack(ModulationTable(self.model, labels, self.times, self.ops).per_block))
            self.time_index[0].fill_(self.column[0.0])  # a cell's first call also runs the previous cell at t=0
        self.cache.length = 0

    def _graph(self, rows: int, with_prefix: bool) -> _Graph:
        start = self.cache.length
        key = (rows, with_prefix, start)
        if key not in self.graphs:
            def forward() -> Tensor:
                self.cache.length = start  # the model moves it on commit; replays do not run Python
                modulations = None
                if self.table is not None:
                    columns = self.time_index[:2] if with_prefix else self.time_index[1:]
                    modulations = list(self.table[:, :rows].index_select(2, columns).unbind(0))
                return self.model(self.x[:rows], self.labels[:rows], self.t[:rows], self.cache,
                                  prefix=self.prefix[:rows] if with_prefix else None, ops=self.ops,
                                  modulations=modulations)

            self.graphs[key] = _Graph(forward, self.capture, self.pool)
            self.cache.length = start
        return self.graphs[key]

    def __call__(self, x: Tensor, t: float, rows: int, prefix: Tensor | None) -> Tensor:
        """As ``sampling.NetworkCalls.__call__``."""
        # Few launches here: at batch 1 they are what is left of a call's cost besides the replay.
        copies = rows // len(x)
        self.x[:rows].view(copies, *x.shape).copy_(x.expand(copies, *x.shape))
        if prefix is not None:
            self.prefix[:rows].view(copies, *prefix.shape).copy_(prefix.expand(copies, *prefix.shape))
        if self.table is None:
            self.t[:rows].fill_(t)
        else:
            self.time_index[1].fill_(self.column[t])
        start = self.cache.length
        output = self._graph(rows, prefix is not None).replay()
        self.cache.length = start + (0 if prefix is None else prefix.shape[1])
        # The graphs share one memory pool, so the next replay of any of them may overwrite this output.
        return output.clone()


class CUDAGraphs:
    """The captured network calls of one pipeline, kept for its next generation calls.

    ``capture=False`` runs the same static-buffer calls eagerly (the only choice off CUDA); it exists so
    that the bookkeeping can be tested without a GPU.

    Example::

        graphs = CUDAGraphs()
        latent = generate_tokens(model, labels, 25, 3.0, noise, cuda_graphs=graphs)  # captures
        latent = generate_tokens(model, labels, 25, 3.0, noise, cuda_graphs=graphs)  # replays only
    """

    def __init__(self, capture: bool = True):
        self.capture = capture
        self._calls: _GraphedCalls | None = None
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Free every graph and buffer; the next call captures anew."""
        with self._lock:
            self._calls = None

    @property
    def num_graphs(self) -> int:
        return 0 if self._calls is None else len(self._calls.graphs)

    @contextmanager
    def session(self, model: XARTransformer, labels: Tensor, times: Sequence[float],
                ops: BlockOps) -> Iterator[_GraphedCalls]:
        """The network calls of one generation call for the batch ``labels`` (both guidance halves)."""
        if self.capture and labels.device.type != "cuda":
            raise InvalidArgumentError(f"CUDA graphs need the model on a CUDA device, not {labels.device.type}; "
                             "turn them off (pipe.disable_cuda_graphs(), or drop --cuda-graphs)")
        # Another thread's call waits: both would write the same static buffers.
        self._lock.acquire()
        try:
            calls = self._calls
            if calls is None or not calls.matches(model, labels, times, ops):
                self._calls = None  # free the old graphs before capturing new ones
                calls = self._calls = _GraphedCalls(model, labels, times, ops, self.capture)
            calls.refill(labels)
            yield calls
        except BaseException:
            self._calls = None  # a failed capture or an interrupted call leaves nothing to trust
            raise
        finally:
            self._lock.release()
