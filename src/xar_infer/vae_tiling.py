"""Tiled VAE decoding: the up path runs on overlapping windows, so memory is bounded by the window.

The decoder's input convolution and middle block (with its global attention) run untiled, at latent
resolution, where they are cheap; only the up path, whose activations are the memory peak, is tiled.
Each window is a piece of the middle block's output: a core of ``tile`` latent cells plus a halo of
``overlap`` cells on each side (shifted inwards at the image border, so all windows have one size).
Windows are decoded one position at a time (for the whole batch) and accumulated with weights that
ramp linearly across the halos, then normalised by the sum of weights. A window covering the whole
latent gives the untiled result exactly. GroupNorm statistics stay per window; that, not blending,
is what limits how close tiled decoding comes to untiled.
"""

from __future__ import annotations

from typing import Callable

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start of each window along an axis of ``size`` latent cells; all windows are
    ``window_length(size, tile, overlap)`` long and their cores of ``tile`` cells cover the axis."""
    window = window_length(size, tile, overlap)
    # Shifted inwards at the far border, two cores can land in one window: decode it once.
    return sorted({min(max(core - overlap, 0), size - window) for core in range(0, size, tile)})


def window_length(size: int, tile: int, overlap: int) -> int:
    return min(size, tile + 2 * overlap)


def feather(start: int, length: int, size: int, ramp: int, device, dtype) -> torch.Tensor:
    """1-D weights of a window of ``length`` pixels at ``start`` on an axis of ``size``: rising over
    ``ramp`` pixels from each edge that lies inside the image, 1 elsewhere (never 0)."""
    x = torch.arange(length, device=device, dtype=dtype)
    w = torch.ones(length, device=device, dtype=dtype)
    if ramp > 0:
        if start > 0:
            w = torch.minimum(w, (x + 0.5) / ramp)
        if start + length < size:
            w = torch.minimum(w, (length - x - 0.5) / ramp)
    return w


def decode_tiled(h: torch.Tensor, up_path: Callable[[torch.Tensor], torch.Tensor], scale: int, tile: int,
                 overlap: int) -> torch.Tensor:
    """``up_path`` applied to ``h`` [B, C, H, W] window by window and blended: [B, C_out, H * scale, W * scale]."""
    B, _, H, W = h.shape
    wh, ww = window_length(H, tile, overlap), window_length(W, tile, overlap)
    out = total = None
    for r in tile_starts(H, tile, overlap):
        for c in tile_starts(W, tile, overlap):
            decoded = up_path(h[:, :, r:r + wh, c:c + ww])
            if out is None:
                out = decoded.new_zeros(B, decoded.shape[1], H * scale, W * scale)
                total = decoded.new_zeros(1, 1, H * scale, W * scale)
            ph, pw = decoded.shape[2:]
            weight = (feather(r * scale, ph, H * scale, overlap * scale, decoded.device, decoded.dtype)[:, None]
                      * feather(c * scale, pw, W * scale, overlap * scale, decoded.device, decoded.dtype)[None, :])
            out[:, :, r * scale:r * scale + ph, c * scale:c * scale + pw] += decoded * weight
            total[:, :, r * scale:r * scale + ph, c * scale:c * scale + pw] += weight
    return out / total
