"""The xAR transformer, inference only.

One stack (encoder blocks, then decoder blocks) maps noisy cells of tokens, each conditioned on the
class and its own flow time, to their velocity (one cell at a time when sampling, all at once when
training). Finished cells are seen through a :class:`KVCache`
that the caller creates per generation call and passes in; the modules keep no state between calls.
Parameter names equal the released checkpoints' keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import XARConfig


class KVCache:
    """Keys and values of every attention layer, preallocated for a whole image.

    Positions ``[0, length)`` hold the finished cells; a forward pass writes its own tokens after them
    and attends to everything up to its last token. Only a pass given a ``prefix`` moves ``length``.
    """

    def __init__(self, config: XARConfig, batch_size: int, dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, config.num_heads, config.seq_len, config.head_dim)
        # One tensor per layer, so that writing one layer never touches what another layer's autograd saved.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` [B, heads, n, head_dim] after the finished cells; return all keys and values so far.

        ``B`` may be smaller than the cache's batch: the first ``B`` rows are used (the conditional half).
        """
        batch, end = k.shape[0], self.length + k.shape[2]
        self.keys[layer][:batch, :, self.length:end] = k
        self.values[layer][:batch, :, self.length:end] = v
        return self.keys[layer][:batch, :, :end], self.values[layer][:batch, :, :end]


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
# are [B, cells, D] (views into the modulation), broadcast over each cell's tokens without copies.
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
    """Boolean [num_queries, start + num_queries] mask: a token sees every token of its own and earlier cells."""
    # Made on the device (not copied there): a CUDA graph cannot capture a host-to-device copy.
    cell_of = torch.arange(start + num_queries, device=device) // tokens_per_cell
    return cell_of[None, :] <= cell_of[start:, None]


def cached_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int,
                     num_commit: int, tokens_per_cell: int) -> Tensor:
    """Attention of new tokens over the cache's finished cells and, block-causally, over each other.

    ``q, k, v``: [B, N, heads, head_dim], not yet rotated; ``cos, sin``: the RoPE tables of their
    positions. The keys/values of the first ``num_commit`` tokens are the ones meant for the cache (this
    reference writes all N after the finished cells: only ``cache.length`` says what is finished).
    Returns [B, N, heads, head_dim]. The reference for ``xar_infer.kernels.block_causal_attention``.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    start, N = cache.length, q.shape[2]
    k, v = cache.update(layer, k, v)
    # A single cell sees all its keys (the cache holds only earlier cells): no mask needed.
    mask = block_causal_mask(tokens_per_cell, start, N, q.device) if N > tokens_per_cell else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


# attention(q, k, v, cos, sin, cache, layer, num_commit, tokens_per_cell): cached_attention or a kernel.
AttentionFn = Callable[..., Tensor]


@dataclass(frozen=True)
class BlockOps:
    """The ops of a network call that a backend may replace (``xar_infer.backends``): a block's, and
    every linear layer of the network (``linear``). These defaults are the PyTorch references that
    define them."""

    attention: AttentionFn = cached_attention
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
        self.tokens_per_cell = config.tokens_per_cell
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int, num_commit: int,
                ops: BlockOps) -> Tensor:
        B, N, D = x.shape
        q, k, v = ops.linear(x, self.qkv).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        out = ops.attention(q, k, v, cos, sin, cache, layer, num_commit, self.tokens_per_cell)
        return ops.linear(out.reshape(B, N, D), self.proj)


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
                num_commit: int, ops: BlockOps) -> Tensor:
        """``modulation``: ``ada_lin`` of each cell's condition, [B, cells, 6 * dim]."""
        T = self.tokens_per_cell
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation.chunk(6, dim=-1)  # the released order
        h = ops.rms_norm_modulate(x, scale1, shift1, T, self.norm1.eps)
        x = ops.gated_residual(x, self.attn(h, cos, sin, cache, layer, num_commit, ops), gamma1, T)
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

    def reset_rope_tables(self) -> None:
        """Recompute the RoPE tables in fp32 on the weights' device (they are derived, never loaded)."""
        cos, sin = rope_tables(self.config)
        device = self.z_proj.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def _apply(self, fn, recurse=True):
        # Rotations are applied in fp32: keep the tables exact whatever dtype the weights are cast to.
        super()._apply(fn, recurse)
        self.reset_rope_tables()
        return self

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache for ``batch_size`` rows (count both guidance halves), on the model's device and dtype."""
        weight = self.z_proj.weight
        return KVCache(self.config, batch_size, weight.dtype, weight.device)

    @property
    def blocks(self) -> list[Block]:
        return [*self.encoder_blocks, *self.decoder_blocks]

    def modulations(self, labels: Tensor, t: Tensor, ops: BlockOps = TORCH_OPS) -> list[Tensor]:
        """Every block's adaLN modulation [B, k, 6 * dim] for class ``labels`` [B] at flow times ``t`` [B, k].

        The condition is the class embedding plus the embedding of the quantised time. It depends on
        nothing else, so a sampler can compute it for all its (label, time) pairs at once.
        """
        B = len(labels)
        cond = self.time_embed(timestep_index(t.flatten()), ops).view(B, -1, self.config.dim)
        cond = cond + self.class_emb(labels)[:, None, :]
        return [ops.linear(block.ada_lin[0](cond), block.ada_lin[1]) for block in self.blocks]

    def forward(self, x: Tensor, labels: Tensor, t: Tensor, cache: KVCache, prefix: Tensor | None = None,
                ops: BlockOps = TORCH_OPS, modulations: list[Tensor] | None = None) -> Tensor:
        """Velocity of the noisy cells ``x`` that follow the cache's finished cells (and ``prefix``).

        ``x``: [B, k * tokens_per_cell, token_channels], one cell when sampling, every cell when
        training; ``labels`` [B] (``null_class`` for the unconditional branch); ``t``: flow time
        (1 = noise, 0 = data), [B] for one cell or [B, k] per cell. ``prefix``: clean tokens of whole
        finished cells not cached yet (the released sampler passes the previous cell); they run at t=0.
        The input attends block-causally (a cell sees itself and earlier cells); the keys and values of
        ``prefix`` are added to the cache, those of ``x`` are not. ``ops``: the PyTorch references or a
        backend's kernels (``xar_infer.backends``). ``modulations``: ``self.modulations(labels,
        times of [prefix ; x] cells)`` if already computed. Returns [B, k * tokens_per_cell, channels].
        """
        T = self.config.tokens_per_cell
        start, num_noisy = cache.length, x.shape[1]
        if num_noisy % T or (prefix is not None and prefix.shape[1] % T):
            raise ValueError(f"inputs must hold whole cells of {T} tokens, got x {num_noisy}"
                             f"{'' if prefix is None else f' and prefix {prefix.shape[1]}'}")
        cell_times = t.reshape(len(t), -1).expand(-1, num_noisy // T)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
            cell_times = torch.cat([cell_times.new_zeros(len(t), prefix.shape[1] // T), cell_times], dim=1)
        B, N, _ = x.shape
        dtype = self.z_proj.weight.dtype
        x = x.to(dtype)

        if modulations is None:
            modulations = self.modulations(labels, cell_times, ops)

        cos, sin = self.rope_cos[start:start + N], self.rope_sin[start:start + N]
        num_commit = 0 if prefix is None else prefix.shape[1]

        x = ops.linear(x, self.z_proj) + self.encoder_pos_embed_learned[:, start:start + N]
        x = self.z_proj_ln(x)
        for i, block in enumerate(self.encoder_blocks):
            x = block(x, modulations[i], cos, sin, cache, i, num_commit, ops)
        x = self.encoder_norm(x)
        x = ops.linear(x, self.decoder_embed) + self.decoder_pos_embed_learned[:, start:start + N]
        for i, block in enumerate(self.decoder_blocks, start=self.config.encoder_depth):
            x = block(x, modulations[i], cos, sin, cache, i, num_commit, ops)
        x = ops.linear(self.decoder_norm(x), self.pred)

        cache.length += num_commit
        return x[:, -num_noisy:]
