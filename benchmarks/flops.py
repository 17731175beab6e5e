"""FLOPs per image. One FLOP is one multiply or one add, so a multiply-add is 2 (the DiT paper's
"118.6 GFLOPs" for DiT-XL/2 counts multiply-adds: 237 GFLOPs here). Only matrix products count:
norms, activations and the sampler's elementwise work are a fraction of a percent.

xAR, per evaluation of q query tokens against k keys, per layer (D width, H MLP hidden):
    2 q (4 D^2 + 3 D H)        qkv, proj and the gated MLP
  + 4 q k D                    attention scores and weighted sum (masked entries computed too)
  + 2 cells 6 D^2              adaLN modulation, once per cell of the input
  + per evaluation: 2 q D (c + D + c) for z_proj, decoder_embed and pred (c token channels),
    and 2 cells (F D + D^2) for the time-embedding MLP (F sinusoidal frequencies)
Cell s (0-based, T tokens per cell) is evaluated N times: the first with q = 2T (the previous cell is
re-run) if s > 0, the rest with q = T; keys k = (s + 1) T. Guidance doubles every evaluation.

DiT-XL/2 per forward pass (n = 256 tokens of 1152, 28 blocks, MLP 4D):
    28 [2 n 12 D^2 + 4 n^2 D + 2 (6 D^2 + 256 D + D^2)] + 2 n D (16 + 32) + 2 (2 D^2 + 256 D + D^2)
(patch embedding 2x2x4 -> D and output projection D -> 2x2x8 per token; the final modulation and its
time embedding once per image; diffusers' DiT embeds class and time in every block, hence the
256 D + D^2 term per block). Guidance doubles every step.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from xar_infer.config import XARConfig


def xar_evaluation_flops(c: XARConfig, queries: int, keys: int, cells: int) -> float:
    D, H = c.dim, c.mlp_hidden_dim
    per_layer = 2 * queries * (4 * D * D + 3 * D * H) + 4 * queries * keys * D + 2 * cells * 6 * D * D
    outside = 2 * queries * D * (2 * c.token_channels + D) + 2 * cells * (c.time_frequencies * D + D * D)
    return c.num_layers * per_layer + outside


def xar_flops_per_image(c: XARConfig, steps: int, guided: bool, sampler_evaluations: int | None = None) -> float:
    """FLOPs of generating one image's latent with ``steps`` evaluations per cell."""
    T, total = c.tokens_per_cell, 0.0
    for s in range(c.num_cells):
        keys = (s + 1) * T
        first = xar_evaluation_flops(c, 2 * T if s else T, keys, 2 if s else 1)
        total += first + (steps - 1) * xar_evaluation_flops(c, T, keys, 1)
    return total * (2 if guided else 1)


def dit_xl2_flops_per_forward(n: int = 256, D: int = 1152, depth: int = 28) -> float:
    per_block = 2 * n * 12 * D * D + 4 * n * n * D + 2 * (6 * D * D + 256 * D + D * D)
    return depth * per_block + 2 * n * D * (16 + 32) + 2 * (2 * D * D + 256 * D + D * D)


def counted_flops(run: Callable[[], object]) -> float:
    """FLOPs that torch's flop counter sees in ``run()`` (matrix products and convolutions). Attention
    runs through the math backend so that its products are counted too."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())
