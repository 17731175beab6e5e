"""FLOPs per image. One FLOP is one multiply or one add, so a multiply-add is 2 (the DiT paper's
"118.6 GFLOPs" for DiT-XL/2 counts multiply-adds: 237 GFLOPs here). Only matrix products count:
norms, activations and the sampler's elementwise work are a fraction of a percent.

xAR, per network evaluation of q query tokens against k keys, per layer (D width, H MLP hidden):
    2 q (4 D^2 + 3 D H)        qkv, proj and the gated MLP
  + 4 q k D                    attention scores and weighted sum
  + 2 cells 6 D^2              adaLN modulation, once per cell of the input
  + per evaluation: 2 q D (c + D + c) for z_proj, decoder_embed and pred (c token channels),
    and 2 cells (F D + D^2) for the time-embedding MLP (F sinusoidal frequencies)
Cell s (0-based, T tokens per cell) is evaluated N times; on its first call (s > 0) the previous cell
is run again, clean, to put it in the cache. The released sampler runs every call for both guidance
halves, the first as q = 2T queries against k = (s + 1) T keys (the previous cell's scores against the
noisy cell computed, then masked), and computes the modulation at every call. xar_infer's engine runs
each cell of a call on its own keys (the previous cell: T queries, k = s T; the noisy cell: T queries,
k = (s + 1) T), runs the unconditional half only for what it needs (the noisy cell where the call
guides, the previous cell on a first call when any cell guides), and computes all modulations once
per image (``xar_flops_per_image``).

DiT-XL/2 per forward pass (n = 256 tokens of 1152, 28 blocks, MLP 4D):
    28 [2 n 12 D^2 + 4 n^2 D + 2 (6 D^2 + 256 D + D^2)] + 2 n D (16 + 32) + 2 (2 D^2 + 256 D + D^2)
(patch embedding 2x2x4 -> D and output projection D -> 2x2x8 per token; the final modulation and its
time embedding once per image; diffusers' DiT embeds class and time in every block, hence the
256 D + D^2 term per block). Guidance doubles every step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from xar_infer.config import XARConfig
from xar_infer.settings import cell_guidance_scales, evaluation_times


def xar_evaluation_flops(c: XARConfig, queries: int, keys: int, cells: int, modulation: bool = True) -> float:
    """One network evaluation; ``modulation=False`` when the adaLN modulations come from a table."""
    D, H = c.dim, c.mlp_hidden_dim
    per_layer = 2 * queries * (4 * D * D + 3 * D * H) + 4 * queries * keys * D
    outside = 2 * queries * D * (2 * c.token_channels + D)
    return c.num_layers * per_layer + outside + (modulation_flops(c, cells) if modulation else 0.0)


def modulation_flops(c: XARConfig, conditions: int) -> float:
    """adaLN modulations of every layer, and the time-embedding MLP, for ``conditions`` (label, time) pairs."""
    return conditions * (c.num_layers * 2 * 6 * c.dim * c.dim + 2 * (c.time_frequencies * c.dim + c.dim * c.dim))


def xar_flops_per_image(c: XARConfig, steps: int | list[int], guidance_scale: float, released: bool = False,
                        guidance_interval: tuple[float, float] | None = None, modulation_table: bool = True) -> float:
    """FLOPs of generating one image's latent with the SDE sampler and the linear guidance schedule;
    ``steps``: evaluations per cell (one count, or one per cell). ``released=True``: the released
    sampler's work (every evaluation doubled when guided, the first of a cell as 2T queries over the
    whole context, modulations computed per evaluation). Otherwise xar_infer's engine's, as
    ``engine.generate_latents`` does it: each cell of a call on its own keys, the unconditional half
    only where it guides or adds the previous cell to its context, and with ``modulation_table`` all
    (row, time) modulations computed once up front."""
    T, total = c.tokens_per_cell, 0.0
    counts = steps if isinstance(steps, list) else [steps] * c.num_cells
    scales = cell_guidance_scales(guidance_scale, c.num_cells)
    guided = any(s > 1 for s in scales)
    lo, hi = guidance_interval or (0.0, 1.0)
    per_call_modulation = released or not modulation_table
    times = {0.0}
    for s, n in enumerate(counts):
        for i, t in enumerate(evaluation_times("sde", n)):
            times.add(t)
            with_prefix = i == 0 and s > 0
            if released:
                queries, cells = (2 * T, 2) if with_prefix else (T, 1)
                total += (2 if guided else 1) * xar_evaluation_flops(c, queries, (s + 1) * T, cells, per_call_modulation)
                continue
            noisy = xar_evaluation_flops(c, T, (s + 1) * T, 1, per_call_modulation)
            previous = xar_evaluation_flops(c, T, s * T, 1, per_call_modulation) if with_prefix else 0.0
            guide = scales[s] > 1 and lo <= t <= hi
            total += noisy + previous  # the conditional half
            if guide or (guided and with_prefix):  # the unconditional half, only what it needs
                total += (noisy if guide else 0.0) + previous
    if not per_call_modulation:
        total += modulation_flops(c, (2 if guided else 1) * len(times))
    return total


def dit_xl2_flops_per_forward(n: int = 256, D: int = 1152, depth: int = 28) -> float:
    per_block = 2 * n * 12 * D * D + 4 * n * n * D + 2 * (6 * D * D + 256 * D + D * D)
    return depth * per_block + 2 * n * D * (16 + 32) + 2 * (2 * D * D + 256 * D + D * D)


def _onednn_linear_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """``torch.ops.mkldnn._linear_pointwise`` (``xar_infer.backends.onednn_linear``): x [..., K] @ weight [N, K].T."""
    return 2 * math.prod(x_shape) * weight_shape[0]


def counted_flops(run: Callable[[], object]) -> float:
    """FLOPs that torch's flop counter sees in ``run()`` (matrix products and convolutions), with the
    oneDNN linear layers that xar_infer runs on CPUs, which the counter does not know. Attention runs
    through the math backend so that its products are counted too."""
    custom = {}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        custom[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops  # keyed by the op, not an overload
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        run()
    return float(counter.get_total_flops())
