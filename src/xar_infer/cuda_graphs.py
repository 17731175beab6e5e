"""The engine's network calls replayed from CUDA graphs, so that small calls are not bound by kernel launches.

At a few images per call a network call of xAR-B is a few hundred small kernels, and on a GPU launching
them takes longer than running them. A CUDA graph records the kernels of one call once and replays
them with one launch; but it also records every address and every host-side number it was captured
with. So :class:`GraphedNetwork`, the second implementation of the engine's network-call protocol
(``engine.EagerNetwork`` is the first), owns everything its graphs read and write, at fixed
addresses: the call's tokens, the per-cell metadata of its ``CellBatch`` as device tensors (slots,
cells, row starts, labels, times), each block's modulation, and the KV cache. A call copies its
inputs there, replays a graph, and returns a copy of the graph's output.

Which graph: a call of S cells runs in the smallest *bucket* of cells that holds it (1, 2, 4, then
multiples of 8 up to the 2 cells per slot a call can hold). The cells past S are padding: each sits
at cell index 0 of a scratch slot that the cache has in addition to the engine's, so it writes and
reads nothing of any image, and its rows of the output are dropped. Every layer computes each cell's
rows on their own, so padding changes no value where a kernel computes a row alike whatever rows come
with it (oneDNN on CPU); a GPU's matrix products may round differently at another row count.

The graph's key is the bucket, and whether the graph computes the modulations itself (when the caller
passes none). With an attention that reads the metadata from device tensors
(``kernels.ragged_attention``) one graph per bucket serves any cells.
``model.cached_attention``, the PyTorch reference, loops on the host over the groups of cells at each
cell index, and a capture bakes that loop in: for it the key also holds how many cells sit at each
index (``keys_by_cells``). Same images, more captures.

The buffers and the graphs outlive an engine: :class:`CUDAGraphs` (one per pipeline) hands the same
network to the next engine made for the same model. Its KV cache holds an engine's images between
calls, so two engines alive at once get a network each.
"""

from __future__ import annotations

import gc
import threading
import weakref
from itertools import accumulate, chain, count
from typing import Callable

import torch
from torch import Tensor

from .errors import InvalidArgumentError
from .model import BlockOps, CellBatch, CellGroup, Tokens, XARTransformer, join_tokens


def bucket_sizes(max_cells: int) -> list[int]:
    """The cell counts that calls are padded to: 1, 2, 4, then multiples of 8, the last one >= ``max_cells``.

    Multiples of 8 waste at most 7 padding cells at the sizes where compute dominates; below 8 a call
    is bound by launches anyway, and powers of two keep the graphs of single images few.
    """
    sizes = []
    for size in chain((1, 2, 4), count(8, 8)):
        sizes.append(size)
        if size >= max_cells:
            return sizes


def keys_by_cells(ops: BlockOps) -> bool:
    """Whether a graph of ``ops`` must be keyed by the count of cells at each index, not only by its
    bucket: when its attention runs one attention per cell index of ``CellBatch.groups`` (host data
    that a capture fixes), as ``model.cached_attention`` does. ``kernels.ragged_attention`` reads the
    slots, cells and row starts from device tensors and replays with any cells. A graph keyed by bucket
    alone gets a batch with no groups."""
    return ops.attention_uses_groups


def _weights(model: XARTransformer) -> tuple:
    """What the graphs' addresses depend on. Moving or casting the model replaces every parameter and
    (through ``XARTransformer._apply``) the RoPE tables; loading with ``assign=True`` replaces the weights."""
    weight = model.z_proj.weight
    return weight.device, weight.dtype, weight.data_ptr(), model.rope_cos.data_ptr(), model.rope_sin.data_ptr()


class _Graph:
    """One captured call: ``replay()`` reruns its kernels, which leave the result in ``output``."""

    def __init__(self, fn: Callable[[], Tensor], capture: bool, pool):
        self.replays = 0
        if not capture:
            # Off CUDA the same function reruns eagerly on the same buffers: how the bookkeeping is tested.
            self.graph, self.fn, self.output = None, fn, None
            return
        # Warm up on a side stream first, as capture requires: Triton compiles, cuBLAS sets up. The
        # warm-up writes the cache as the replay will, with the same values.
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
        self.replays += 1
        if self.graph is None:
            self.output = self.fn()
        else:
            self.graph.replay()
        return self.output


class GraphedNetwork:
    """The network-call protocol of ``engine.EagerNetwork``, ``network(x, batch, modulations)`` ->
    velocities [S, T, C], replayed from CUDA graphs on buffers this object owns.

    ``num_slots``: the engine's cache slots; the cache has one more, the scratch slot of padding
    cells. ``capture=False`` runs every "replay" eagerly on the same buffers (the only choice off
    CUDA; it tests the bookkeeping). ``key_by_cells``: see ``keys_by_cells``, which decides when None.
    ``graphs``: the captured calls by key: (bucket, computes the modulations), and when keyed by
    cells, ((cell index, count), ...) in the order of ``CellBatch.groups``, padding counted at cell 0.
    A call of more cells than the largest bucket (no engine makes one) runs eagerly on the same cache.
    """

    def __init__(self, model: XARTransformer, ops: BlockOps, num_slots: int, capture: bool = True,
                 key_by_cells: bool | None = None, lock: threading.Lock | None = None):
        if capture and model.device.type != "cuda":
            raise InvalidArgumentError(f"CUDA graphs need the model on a CUDA device, not {model.device.type}; "
                                       "turn them off (pipe.disable_cuda_graphs(), or drop --cuda-graphs)")
        config, device, dtype = model.config, model.device, model.dtype
        self.model, self.ops, self.capture = model, ops, capture
        self.num_slots = num_slots
        self.key_by_cells = keys_by_cells(ops) if key_by_cells is None else key_by_cells
        self.buckets = bucket_sizes(2 * num_slots)  # a call holds at most two cells of a slot
        size = self.buckets[-1]
        self.cache = model.new_cache(num_slots + 1)
        self.scratch_slot = num_slots
        self.x = torch.zeros(size, config.tokens_per_cell, config.token_channels, dtype=dtype, device=device)
        # Slots, cells, row starts and labels in one tensor, filled by one copy per call. Padding cells
        # are rows of their own at cell 0 of the scratch slot, of the null class at t=0.
        self.metadata = torch.zeros(4, size, dtype=torch.long, device=device)
        self.padding = torch.stack([torch.full((size,), self.scratch_slot), torch.zeros(size, dtype=torch.long),
                                    torch.arange(size), torch.full((size,), model.null_class)]).to(device)
        self.times = torch.zeros(size, dtype=torch.float64, device=device)
        # Keyed by cells: the cells of each group, group after group (cached_attention's index lists).
        self.order = torch.zeros(size, dtype=torch.long, device=device)
        self.modulations = torch.zeros(config.num_layers, size, 1, 6 * config.dim, dtype=dtype, device=device)
        self.graphs: dict[tuple, _Graph] = {}
        # The graphs of one network share a memory pool: they replay one at a time.
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._lock = lock or threading.Lock()
        self._weights = _weights(model)
        self._lease: weakref.ref | None = None
        self._metadata_of: tuple | None = None  # (bucket, CellBatch.key) of what self.metadata holds

    def bucket(self, num_cells: int) -> int | None:
        """The padded size of a call of ``num_cells`` cells; None past the largest bucket."""
        return next((size for size in self.buckets if size >= num_cells), None)

    def _groups(self, batch: CellBatch, bucket: int) -> tuple[tuple[tuple[int, int], ...], list[Tensor]]:
        """((cell index, count), ...) and the index lists of the padded batch: ``batch.groups`` with the
        padding cells joining those at cell 0. Counts come from shapes: no value is read from the device."""
        counts = [(group.cell, len(group.index)) for group in batch.groups]
        parts = [group.index for group in batch.groups]
        padding = bucket - len(batch)
        if padding:
            at = next((i for i, (cell, _) in enumerate(counts) if cell == 0), None)
            if at is None:
                counts.insert(0, (0, padding))
                parts.insert(0, self.padding[2, len(batch):bucket])
            else:
                counts[at] = (0, counts[at][1] + padding)
                parts.insert(at + 1, self.padding[2, len(batch):bucket])
        return tuple(counts), parts

    def __call__(self, tokens: Tokens, batch: CellBatch, modulations: list[Tensor] | None) -> Tensor:
        S = len(batch)
        with self._lock:
            self._check_model()
            bucket = self.bucket(S)
            if bucket is None:
                return self.model(join_tokens(tokens), batch, self.cache, self.ops, modulations)
            computes = modulations is None
            counts, parts = self._groups(batch, bucket) if self.key_by_cells else (None, None)
            key = (bucket, computes) if counts is None else (bucket, computes, counts)
            # Few launches here: at small batches they are what is left of a call's cost besides the replay.
            self._copy_tokens(tokens)
            if self._new_metadata(batch, bucket):
                self.metadata[:, :S].copy_(batch.metadata)
                if bucket > S:
                    self.metadata[:, S:bucket].copy_(self.padding[:, S:bucket])
                if parts is not None:
                    self.order[:bucket].copy_(torch.cat(parts))
            if computes:  # only the modulations read the times
                self.times[:S].copy_(batch.times)
                if bucket > S:
                    self.times[S:bucket].zero_()
            else:
                stacked = modulations if isinstance(modulations, Tensor) else torch.stack(modulations)
                self.modulations[:, :S].copy_(stacked)
            graph = self.graphs.get(key)
            if graph is None:
                graph = self.graphs[key] = _Graph(self._forward(bucket, counts, computes), self.capture, self.pool)
            # The graphs share one memory pool, so the next replay of any of them may overwrite this output.
            return graph.replay()[:S].clone()

    def _copy_tokens(self, tokens: Tokens) -> None:
        """The call's tokens into the input buffer, with no concatenation first: a chunk passed n times
        in a row (a guided image's two halves) is one broadcasting copy."""
        chunks = [tokens] if isinstance(tokens, Tensor) else list(tokens)
        at = i = 0
        while i < len(chunks):
            chunk, n = chunks[i], 1
            while i + n < len(chunks) and chunks[i + n] is chunk:
                n += 1
            rows = len(chunk)
            target = self.x[at:at + n * rows]
            if n == 1:
                target.copy_(chunk)
            else:
                target.view(n, *chunk.shape).copy_(chunk.expand(n, *chunk.shape))
            at, i = at + n * rows, i + n

    def _new_metadata(self, batch: CellBatch, bucket: int) -> bool:
        """Whether the buffers do not hold ``batch``'s cells at this bucket yet. Consecutive calls of a
        job often have the same cells; their metadata is then copied once (compared as host data)."""
        key = None if batch.key is None else (bucket, batch.key)
        if key is not None and key == self._metadata_of:
            return False
        self._metadata_of = key
        return True

    def _forward(self, bucket: int, counts: tuple[tuple[int, int], ...] | None, computes_modulations: bool):
        """The call a graph captures: the model on the first ``bucket`` rows of every buffer."""
        groups = ()
        if counts is not None:
            starts = accumulate((n for _, n in counts), initial=0)
            # Slots are gathered (no slice): a replay's slots are not known at capture.
            groups = tuple(CellGroup(cell, self.order[start:start + n], None)
                           for (cell, n), start in zip(counts, starts))
        batch = CellBatch(self.metadata[:, :bucket], self.times[:bucket], groups)
        x = self.x[:bucket]
        modulations = None if computes_modulations else list(self.modulations[:, :bucket].unbind(0))
        return lambda: self.model(x, batch, self.cache, self.ops, modulations)

    def _check_model(self) -> None:
        now = _weights(self.model)
        if now == self._weights:
            return
        if now[:2] != self._weights[:2]:
            device, dtype = self._weights[:2]
            raise InvalidArgumentError(f"the transformer was moved or cast after this engine was made: its CUDA "
                                       f"graphs and KV cache are for {device} {str(dtype).removeprefix('torch.')}; "
                                       "make a new engine")
        self.graphs.clear()  # new weight tensors in the same place: capture again, keep the cache
        self._weights = now

    def matches(self, model: XARTransformer, ops: BlockOps, num_slots: int) -> bool:
        """Whether an engine of ``num_slots`` slots on ``model`` and ``ops`` can use this network."""
        return (model is self.model and ops is self.ops and num_slots <= self.num_slots
                and _weights(model) == self._weights)

    @property
    def leased(self) -> bool:
        """Whether an engine still holds this network (its KV cache then holds that engine's images)."""
        return self._lease is not None and self._lease() is not None

    def lease(self) -> "_Lease":
        lease = _Lease(self)
        self._lease = weakref.ref(lease)
        return lease


class _Lease:
    """What an engine holds: the network's calls, and the network itself for as long as it lives."""

    def __init__(self, network: GraphedNetwork):
        self.network = network
        self.cache = network.cache

    def __call__(self, tokens: Tokens, batch: CellBatch, modulations: list[Tensor] | None) -> Tensor:
        return self.network(tokens, batch, modulations)


class CUDAGraphs:
    """The graphed networks of one pipeline, kept for its next engines. ``network`` is the factory
    that ``Engine(network=...)`` and ``generate_latents(network=...)`` take.

    An engine holds its network while it lives; the next engine for the same model and ops, with
    no more slots, gets it back with every graph captured so far. An engine made while another
    still holds one gets a network of its own. Making a network frees the ones no engine holds.
    Calls and captures of one ``CUDAGraphs`` take turns (one lock). ``capture=False`` runs the
    same static-buffer calls eagerly (the only choice off CUDA), to test the bookkeeping.

    Example::

        graphs = CUDAGraphs()
        engine = Engine(model, backend, max_rows=16, defaults=(25, 3.0), network=graphs.network)
    """

    def __init__(self, capture: bool = True):
        self.capture = capture
        self._networks: list[GraphedNetwork] = []
        self._lock = threading.Lock()

    def network(self, model: XARTransformer, ops: BlockOps, num_slots: int) -> _Lease:
        """The network for an engine of ``num_slots`` cache slots: a free matching one, or a new one."""
        with self._lock:
            free = self._free(model, ops, num_slots)
            if free is None and any(n.leased for n in self._networks):
                gc.collect()  # an engine gone in a reference cycle (a failed call's traceback) still holds one
                free = self._free(model, ops, num_slots)
            if free is None:
                # Free the old graphs before capturing new ones.
                self._networks = [n for n in self._networks if n.leased]
                free = GraphedNetwork(model, ops, num_slots, self.capture, lock=self._lock)
                self._networks.append(free)
            return free.lease()

    def _free(self, model: XARTransformer, ops: BlockOps, num_slots: int) -> GraphedNetwork | None:
        return next((n for n in self._networks if not n.leased and n.matches(model, ops, num_slots)), None)

    def reset(self) -> None:
        """Free every graph, and the networks no engine holds; the next call captures anew."""
        with self._lock:
            for network in self._networks:
                network.graphs.clear()
            self._networks = [n for n in self._networks if n.leased]

    @property
    def num_graphs(self) -> int:
        return sum(len(n.graphs) for n in self._networks)
