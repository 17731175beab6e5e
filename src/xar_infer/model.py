"""The xAR transformer, inference only.

One stack (encoder blocks, then decoder blocks) maps noisy cells of tokens, each conditioned on the
class and its own flow time, to their velocity. A network call computes a :class:`CellBatch`: cells of
``tokens_per_cell`` tokens from any images, packed one after another with no padding, each with its
own position, class, time and slot of the :class:`KVCache`. A cell attends to the earlier cells of
its slot and to itself, so an image's previous cell and its current one, or cells of images at
different stages, share one call. The caller owns the cache and decides which cells are finished;
the modules keep no state between calls. Parameter names equal the released checkpoints' keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import XARConfig


class KVCache:
    """Keys and values of every attention layer, for ``num_slots`` slots of a whole image each.

    A slot holds one image's sequence (one guidance half of it): a cell's keys and values sit at its
    own positions. A network call writes the keys and values of every cell it computes; which cells of
    a slot are finished is the owner's bookkeeping (the engine's), never the model's.
    """

    def __init__(self, config: XARConfig, num_slots: int, dtype: torch.dtype, device: torch.device | str):
        shape = (num_slots, config.num_heads, config.seq_len, config.head_dim)
        # One tensor per layer, so that writing one layer never touches what another layer's autograd saved.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @property
    def num_slots(self) -> int:
        return self.keys[0].shape[0]


class CellGroup(NamedTuple):
    """The cells of a batch at one index: where they are in the batch (``index``, and ``rows``: the
    same as a slice when they are evenly spaced, so that they are read as a view), and their cache
    slots as a slice when those are consecutive (the cache is then read as a view, not gathered)."""

    cell: int
    index: Tensor
    slots: slice | None
    rows: slice | None = None


# A network call's tokens: one tensor [cells, tokens_per_cell, channels], or its chunks in packing
# order (a guided image's two halves pass the same chunk twice, which a CUDA graph's input copy fills
# at once instead of concatenating first).
Tokens = Tensor | Sequence[Tensor]


def join_tokens(tokens: Tokens) -> Tensor:
    if isinstance(tokens, Tensor):
        return tokens
    return tokens[0] if len(tokens) == 1 else torch.cat(list(tokens))


def to_device(host: Tensor, device: torch.device | str) -> Tensor:
    """``host`` (a CPU tensor) on ``device``. To a GPU the copy is asynchronous, from pinned memory: a
    plain copy from pageable memory makes the host wait until the GPU has run everything queued."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class CellBatch:
    """The cells one network call computes, in packing order: ``len(slots)`` cells of the same size.

    ``metadata`` [4, cells]: each cell's cache slot, index in its image (its position), first cell of
    its row, and class (``null_class`` for an unconditional half); read them as ``slots``, ``cells``,
    ``row_starts`` and ``labels``. ``times``: each cell's flow time (0 for a clean cell). Cells of one
    slot are consecutive and at consecutive indices (a row). ``groups``: the cells of each index in
    increasing order, for attention by index (host data: a CUDA graph's capture fixes them).
    """

    metadata: Tensor
    times: Tensor
    groups: tuple[CellGroup, ...]
    # The metadata as host data, when built from host lists: CUDA graphs compare it to skip a copy.
    key: tuple | None = None

    @staticmethod
    def build(slots: Sequence[int], cells: Sequence[int], labels: Sequence[int] | Tensor, times: Sequence[float] | Tensor,
              device: torch.device | str) -> "CellBatch":
        """From per-cell lists (rows are the runs of one slot). The integers reach the device in one copy."""
        S = len(slots)
        row_starts = [0] * S
        for i in range(1, S):
            same_row = slots[i] == slots[i - 1] and cells[i] == cells[i - 1] + 1
            row_starts[i] = row_starts[i - 1] if same_row else i
        by_cell: dict[int, list[int]] = {}
        for i, c in enumerate(cells):
            by_cell.setdefault(int(c), []).append(i)
        groups = sorted(by_cell.items())
        labels = labels.tolist() if isinstance(labels, Tensor) else list(labels)
        host = torch.tensor([*slots, *cells, *row_starts, *labels, *(i for _, index in groups for i in index)],
                            dtype=torch.long)
        packed = to_device(host, device)
        times = torch.as_tensor(times, dtype=torch.float64)  # a list, or a tensor already on its device
        if times.device.type == "cpu":
            times = to_device(times, device)

        def slot_range(index: list[int]) -> slice | None:
            first = slots[index[0]]
            consecutive = all(slots[i] == first + n for n, i in enumerate(index))
            return slice(first, first + len(index)) if consecutive else None

        def row_range(index: list[int]) -> slice | None:
            step = index[1] - index[0] if len(index) > 1 else 1
            evenly_spaced = all(b - a == step for a, b in zip(index, index[1:]))
            return slice(index[0], index[-1] + 1, step) if evenly_spaced else None

        starts = accumulate((len(index) for _, index in groups), initial=4 * S)
        return CellBatch(packed[:4 * S].view(4, S), times,
                         tuple(CellGroup(c, packed[start:start + len(index)], slot_range(index), row_range(index))
                               for (c, index), start in zip(groups, starts)), (tuple(slots), tuple(cells), tuple(labels)))

    @staticmethod
    def whole_images(labels: Tensor, times: Tensor) -> "CellBatch":
        """Every cell of ``len(labels)`` images at once (slot i is image i), at ``times`` [B, cells]: training."""
        B, k = times.shape
        slots = [b for b in range(B) for _ in range(k)]
        return CellBatch.build(slots, list(range(k)) * B, labels.repeat_interleave(k), times.flatten(), labels.device)

    @property
    def slots(self) -> Tensor:
        return self.metadata[0]

    @property
    def cells(self) -> Tensor:
        return self.metadata[1]

    @property
    def row_starts(self) -> Tensor:
        return self.metadata[2]

    @property
    def labels(self) -> Tensor:
        return self.metadata[3]

    def __len__(self) -> int:
        return self.metadata.shape[1]

    def positions(self, tokens_per_cell: int) -> Tensor:
        """[cells, tokens_per_cell]: each token's position in its image's sequence."""
        return self.cells[:, None] * tokens_per_cell + torch.arange(tokens_per_cell, device=self.cells.device)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the released blocks use it without a weight."""

    def __init__(self, dim: int, eps: float = 1e-6, weight: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: Tensor) -> Tensor:
        out = rms_norm(x, self.eps)
        return out if self.weight is None else out * self.weight


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """``x / rms(x)`` over the last dimension, computed in fp32, returned in ``x``'s dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


# The elementwise steps of a block, each condition applied per cell: ``scale``, ``shift`` and ``gamma``
# are [B, cells, D] (views into the modulation), broadcast over each cell's tokens without copies. The
# network calls them with B = the call's cells and one cell each.
# They are the references for the fused kernels of ``xar_infer.kernels.adaln``.

def rms_norm_modulate(x: Tensor, scale: Tensor, shift: Tensor, tokens_per_cell: int, eps: float) -> Tensor:
    """``rms_norm(x) * (1 + scale) + shift`` for ``x`` [B, N, D], in ``x``'s dtype."""
    B, N, D = x.shape
    h = rms_norm(x, eps).view(B, -1, tokens_per_cell, D)
    return (h * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).view(B, N, D)


def gated_residual(x: Tensor, h: Tensor, gamma: Tensor, tokens_per_cell: int) -> Tensor:
    """``x + h * gamma``: a branch's output ``h`` [B, N, D] added to the residual stream ``x``."""
    B, N, D = x.shape
    return x + (h.view(B, -1, tokens_per_cell, D) * gamma.unsqueeze(2)).view(B, N, D)


def linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """``layer(x)``; a backend may run the product elsewhere (``backends.onednn_linear`` on CPUs)."""
    return F.linear(x, layer.weight, layer.bias)


def gelu_mul(gate: Tensor, value: Tensor) -> Tensor:
    """``gelu(gate) * value`` with exact (erf) GELU: the gated MLP's hidden activation."""
    return F.gelu(gate) * value


def rope_frequencies(config: XARConfig) -> Tensor:
    """The head_dim / 4 rotation frequencies per axis ("language" spacing, base ``rope_theta``)."""
    half = config.head_dim // 2
    return 1.0 / (config.rope_theta ** (torch.arange(0, half, 2).float() / half))


def rope_tables(config: XARConfig) -> tuple[Tensor, Tensor]:
    """cos and sin tables [seq_len, head_dim] of the 2D rotary embedding, rows in cell order.

    The first half of a head's channels rotates with the token's row, the second half with its column,
    each as interleaved channel pairs with language-model frequencies.
    """
    half = config.head_dim // 2
    angles = (torch.arange(config.grid_size).float()[:, None] * rope_frequencies(config)[None]).repeat_interleave(2, dim=-1)
    g = config.grid_size
    table = torch.cat([angles[:, None, :].expand(g, g, half), angles[None, :, :].expand(g, g, half)], dim=-1)
    n, c = g // config.cell_size, config.cell_size
    table = table.reshape(n, c, n, c, config.head_dim).permute(0, 2, 1, 3, 4).reshape(g * g, config.head_dim)
    return table.cos(), table.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x`` [..., n, head_dim] by the angles of ``cos``/``sin`` [n, head_dim]."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).type_as(x)


def block_causal_mask(tokens_per_cell: int, start: int, num_queries: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean [num_queries, start + num_queries] mask: a token sees every token of its own and earlier cells
    (the released code's attention mask, which the cell-wise attention below makes unnecessary)."""
    cell_of = torch.arange(start + num_queries, device=device) // tokens_per_cell
    return cell_of[None, :] <= cell_of[start:, None]


def cached_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int,
                     batch: CellBatch) -> Tensor:
    """Attention of the batch's cells, each over its slot's earlier cells and itself.

    ``q, k, v``: [cells, tokens_per_cell, heads, head_dim], not yet rotated; ``cos, sin``: the RoPE
    tables of the whole sequence. Every cell is rotated at once, by its own positions. Then cells are
    taken index by index, in increasing order: each group's keys and values are written at its
    positions of its slots, then it attends over the positions up to its own end, which earlier
    groups of this call (the previous cell of a row) or earlier calls have written. A cell sees all
    of its own tokens: no mask. Returns [cells, tokens_per_cell, heads, head_dim]. The reference for
    ``xar_infer.kernels.ragged_attention``.
    """
    S, T = q.shape[:2]
    if len(batch.groups) == 1:  # every cell at one index: the tables' rows as a view
        span = slice(batch.groups[0].cell * T, (batch.groups[0].cell + 1) * T)
        cos, sin = cos[span], sin[span]
    else:
        positions = batch.positions(T)
        cos, sin = cos[positions][:, None], sin[positions][:, None]
    q = apply_rope(q.transpose(1, 2), cos, sin)
    k = apply_rope(k.transpose(1, 2), cos, sin)
    v = v.transpose(1, 2)
    keys, values = cache.keys[layer], cache.values[layer]
    out = torch.empty_like(q)
    for cell, index, slot_range, row_range in batch.groups:
        rows = index if row_range is None else row_range
        span = slice(cell * T, (cell + 1) * T)
        slots = batch.slots[index] if slot_range is None else slot_range
        keys[slots, :, span] = k[rows]
        values[slots, :, span] = v[rows]
        seen_k, seen_v = keys[slots, :, :span.stop], values[slots, :, :span.stop]
        if slot_range is not None and torch.is_grad_enabled():
            # Training: a later group writes into the tensor these views show, which would change what
            # the backward pass saved; a copy keeps it (and its backward stays a plain slice).
            seen_k, seen_v = seen_k.clone(), seen_v.clone()
        out[rows] = F.scaled_dot_product_attention(q[rows], seen_k, seen_v)
    return out.transpose(1, 2)


# attention(q, k, v, cos, sin, cache, layer, batch): cached_attention or a kernel.
AttentionFn = Callable[..., Tensor]


@dataclass(frozen=True)
class BlockOps:
    """The ops of a network call that a backend may replace (``xar_infer.backends``): a block's, and
    every linear layer of the network (``linear``). These defaults are the PyTorch references that
    define them."""

    attention: AttentionFn = cached_attention
    # Whether ``attention`` reads ``CellBatch.groups`` (host data, fixed into a captured CUDA graph), as
    # the reference does; a kernel that reads only the batch's device tensors replays with other cells.
    attention_uses_groups: bool = True
    linear: Callable[[Tensor, nn.Linear], Tensor] = linear
    rms_norm_modulate: Callable[..., Tensor] = rms_norm_modulate
    gated_residual: Callable[..., Tensor] = gated_residual
    gelu_mul: Callable[..., Tensor] = gelu_mul


TORCH_OPS = BlockOps()


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of an integer timestep (cos then sin), followed by a 2-layer MLP."""

    def __init__(self, dim: int, frequencies: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequencies = frequencies
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timesteps: Tensor, ops: BlockOps = TORCH_OPS) -> Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
        args = timesteps[:, None].float() * freqs[None]
        h = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype)
        return ops.linear(self.mlp[1](ops.linear(h, self.mlp[0])), self.mlp[2])


def timestep_index(t: Tensor) -> Tensor:
    """The integer timestep the network was trained on: ``floor(1000 * t)`` with ``t`` in fp32, as released."""
    return (t.to(torch.float32) * 1000).long()


class Attention(nn.Module):
    def __init__(self, config: XARConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int, batch: CellBatch,
                ops: BlockOps) -> Tensor:
        S, T, D = x.shape
        q, k, v = ops.linear(x, self.qkv).view(S, T, 3, self.num_heads, self.head_dim).unbind(2)
        out = ops.attention(q, k, v, cos, sin, cache, layer, batch)
        return ops.linear(out.reshape(S, T, D), self.proj)


# Tensor cores need rows of a multiple of 8 elements (16 bytes in bf16). xAR-L's and xAR-H's MLP widths
# (2730, 3413) are not, and cuBLAS then falls back to an older kernel: on an H100 it took 62% of xAR-L's
# time at batch 256 (benchmarks/results/h100-profile-xar-l-b256-triton.md).
MLP_WIDTH_MULTIPLE = 8


class GatedMLP(nn.Module):
    """``fc2(gelu(fc1_g(x)) * fc1_x(x))`` with exact (erf) GELU.

    The hidden width is padded to a multiple of ``MLP_WIDTH_MULTIPLE`` with units whose weights are
    zero: their gelu(0) * 0 = 0 meets zero columns of fc2, so the outputs are those of the released
    width. State dicts keep the released shapes: loading pads, saving trims.
    """

    def __init__(self, config: XARConfig):
        super().__init__()
        self.hidden_dim = config.mlp_hidden_dim
        padded = -(-self.hidden_dim // MLP_WIDTH_MULTIPLE) * MLP_WIDTH_MULTIPLE
        self.fc1_g = nn.Linear(config.dim, padded)
        self.fc1_x = nn.Linear(config.dim, padded)
        self.fc2 = nn.Linear(padded, config.dim)
        if padded != self.hidden_dim:
            with torch.no_grad():
                for t in (self.fc1_g.weight, self.fc1_g.bias, self.fc1_x.weight, self.fc1_x.bias):
                    t[self.hidden_dim:] = 0
                self.fc2.weight[:, self.hidden_dim:] = 0
            self.register_load_state_dict_pre_hook(self._pad_loaded)
            self.register_state_dict_post_hook(self._trim_saved)

    @staticmethod
    def _pad_loaded(module, state_dict, prefix, *args) -> None:
        """Released-width tensors in ``state_dict`` get the zero units appended."""
        extra = module.fc2.in_features - module.hidden_dim
        for name in ("fc1_g.weight", "fc1_g.bias", "fc1_x.weight", "fc1_x.bias", "fc2.weight"):
            t = state_dict.get(prefix + name)
            dim = -1 if name == "fc2.weight" else 0
            if t is not None and t.shape[dim] == module.hidden_dim:
                pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [0, extra]  # F.pad lists the last dimension first
                state_dict[prefix + name] = F.pad(t, pad)

    @staticmethod
    def _trim_saved(module, state_dict, prefix, local_metadata) -> None:
        """The zero units are not part of the released format."""
        for name in ("fc1_g.weight", "fc1_g.bias", "fc1_x.weight", "fc1_x.bias"):
            state_dict[prefix + name] = state_dict[prefix + name][:module.hidden_dim]
        state_dict[prefix + "fc2.weight"] = state_dict[prefix + "fc2.weight"][:, :module.hidden_dim].contiguous()

    def forward(self, x: Tensor, ops: BlockOps = TORCH_OPS) -> Tensor:
        return ops.linear(ops.gelu_mul(ops.linear(x, self.fc1_g), ops.linear(x, self.fc1_x)), self.fc2)


class Block(nn.Module):
    """Pre-norm transformer block with adaLN modulation and gated residuals, one condition per cell."""

    def __init__(self, config: XARConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.dim)
        self.attn = Attention(config)
        self.norm2 = RMSNorm(config.dim)
        self.mlp = GatedMLP(config)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(config.dim, 6 * config.dim))
        self.tokens_per_cell = config.tokens_per_cell

    def forward(self, x: Tensor, modulation: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int,
                batch: CellBatch, ops: BlockOps) -> Tensor:
        """``x``: [cells, tokens_per_cell, dim]; ``modulation``: ``ada_lin`` of each cell's condition, [cells, 1, 6 * dim]."""
        T = self.tokens_per_cell
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation.chunk(6, dim=-1)  # the released order
        h = ops.rms_norm_modulate(x, scale1, shift1, T, self.norm1.eps)
        x = ops.gated_residual(x, self.attn(h, cos, sin, cache, layer, batch, ops), gamma1, T)
        h = ops.rms_norm_modulate(x, scale2, shift2, T, self.norm2.eps)
        return ops.gated_residual(x, self.mlp(h, ops), gamma2, T)


class XARTransformer(nn.Module):
    """The xAR network: velocity of one noisy cell, given the class, its time and the finished cells."""

    def __init__(self, config: XARConfig):
        super().__init__()
        self.config = config
        c = config
        self.class_emb = nn.Embedding(c.num_classes + 1, c.dim)  # the last row is the null class
        self.time_embed = TimestepEmbedder(c.dim, c.time_frequencies)
        self.z_proj = nn.Linear(c.token_channels, c.dim)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, c.seq_len, c.dim))
        self.z_proj_ln = RMSNorm(c.dim, weight=True)
        self.encoder_blocks = nn.ModuleList(Block(c) for _ in range(c.encoder_depth))
        self.encoder_norm = RMSNorm(c.dim, weight=True)
        self.decoder_embed = nn.Linear(c.dim, c.dim)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, c.seq_len, c.dim))
        self.decoder_blocks = nn.ModuleList(Block(c) for _ in range(c.decoder_depth))
        self.decoder_norm = RMSNorm(c.dim, weight=True)
        self.pred = nn.Linear(c.dim, c.token_channels)
        cos, sin = rope_tables(c)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, in which the network computes."""
        return self.z_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.z_proj.weight.device

    def reset_rope_tables(self) -> None:
        """Recompute the RoPE tables in fp32 on the weights' device (they are derived, never loaded)."""
        cos, sin = rope_tables(self.config)
        self.rope_cos, self.rope_sin = cos.to(self.device), sin.to(self.device)

    def _apply(self, fn, recurse=True):
        # Rotations are applied in fp32: keep the tables exact whatever dtype the weights are cast to.
        super()._apply(fn, recurse)
        self.reset_rope_tables()
        return self

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def new_cache(self, num_slots: int) -> KVCache:
        """An empty KV cache of ``num_slots`` slots (one per image and guidance half), on the model's device and dtype."""
        return KVCache(self.config, num_slots, self.dtype, self.device)

    @property
    def blocks(self) -> list[Block]:
        return [*self.encoder_blocks, *self.decoder_blocks]

    def modulations(self, labels: Tensor, t: Tensor, ops: BlockOps = TORCH_OPS) -> list[Tensor]:
        """Every block's adaLN modulation [B, k, 6 * dim] for class ``labels`` [B] at flow times ``t`` [B, k].

        The condition is the class embedding plus the embedding of the quantised time. It depends on
        nothing else, so it can be computed once for every (label, time) pair a generation will need.
        """
        B = len(labels)
        cond = self.time_embed(timestep_index(t.flatten()), ops).view(B, -1, self.config.dim)
        cond = cond + self.class_emb(labels)[:, None, :]
        return [ops.linear(block.ada_lin[0](cond), block.ada_lin[1]) for block in self.blocks]

    def forward(self, x: Tensor, batch: CellBatch, cache: KVCache, ops: BlockOps = TORCH_OPS,
                modulations: list[Tensor] | Tensor | None = None) -> Tensor:
        """Velocity of each cell of ``batch``: ``x`` [cells, tokens_per_cell, token_channels] -> the same shape.

        Each cell attends to the cells before it in its slot of ``cache`` and to itself; its keys and
        values are written to its positions there (a clean cell at t=0 so becomes part of its image's
        context for later calls). ``ops``: the PyTorch references or a backend's kernels
        (``xar_infer.backends``). ``modulations``: per block, [cells, 1, 6 * dim] (a list, or one
        tensor [blocks, cells, 1, 6 * dim]), if already known (``self.modulations(batch.labels,
        batch.times[:, None])``).
        """
        c = self.config
        if x.dim() != 3 or list(x.shape) != [len(batch), c.tokens_per_cell, c.token_channels]:
            raise ValueError(f"x must be [cells, tokens_per_cell, token_channels] = [{len(batch)}, "
                             f"{c.tokens_per_cell}, {c.token_channels}] for this batch, got {list(x.shape)}")
        S, T, _ = x.shape
        if modulations is None:
            modulations = self.modulations(batch.labels, batch.times[:, None], ops)
        if len(batch.groups) == 1:  # every cell at one index: the position tables are read as views
            positions = slice(batch.groups[0].cell * T, (batch.groups[0].cell + 1) * T)
        else:
            positions = batch.positions(T)
        cos, sin = self.rope_cos, self.rope_sin

        x = ops.linear(x.to(self.dtype), self.z_proj) + self.encoder_pos_embed_learned[0, positions]
        x = self.z_proj_ln(x)
        for i, block in enumerate(self.encoder_blocks):
            x = block(x, modulations[i], cos, sin, cache, i, batch, ops)
        x = self.encoder_norm(x)
        x = ops.linear(x, self.decoder_embed) + self.decoder_pos_embed_learned[0, positions]
        for i, block in enumerate(self.decoder_blocks, start=self.config.encoder_depth):
            x = block(x, modulations[i], cos, sin, cache, i, batch, ops)
        return ops.linear(self.decoder_norm(x), self.pred)
