"""Tiled VAE decoding: the up path runs on overlapping windows, so memory is bounded by the window.

The decoder's input convolution and middle block (with its global attention) run untiled, at latent
resolution, where they are cheap; only the up path, whose activations are the memory peak, is tiled.
Each window is a piece of the middle block's output: a core of ``tile`` latent cells plus a halo of
``overlap`` cells on each side (shifted inwards at the image border, so all windows have one size).
Windows are gathered into a batch, decoded, and blended back with weights that ramp linearly across
the halos, then normalised by the sum of weights. A window covering the whole latent gives the
untiled result exactly. GroupNorm statistics stay per window; that, not the blend, is what limits
how close tiled decoding comes to untiled.

The two data-movement steps, ``gather_tiles`` and ``blend_tiles_``, are defined here in PyTorch and
also compiled from ``csrc/`` (the ``xar_infer._vae_tiling`` extension, built by ``setup.py`` when it
can be); ``vae_tiling_backend()`` says which one runs.
"""

from __future__ import annotations

from typing import Callable

import torch

try:
    from . import _vae_tiling as _compiled
except ImportError:  # not built: the PyTorch versions below run instead
    _compiled = None

# Float types the compiled loops handle; others take the PyTorch path.
COMPILED_DTYPES = (torch.float32, torch.float64)


def vae_tiling_backend(device: torch.device | str = "cpu") -> str:
    """Which implementation gathers and blends tiles on ``device``: ``"cuda"``, ``"cpp"`` or ``"torch"``."""
    device = torch.device(device)
    if _compiled is None:
        return "torch"
    if device.type == "cuda":
        return "cuda" if _compiled.has_cuda() else "torch"
    return "cpp" if device.type == "cpu" else "torch"


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start of each window along an axis of ``size`` latent cells; all windows are
    ``window_length(size, tile, overlap)`` long and their cores of ``tile`` cells cover the axis."""
    # Shifted inwards at the far border, two cores can land in one window: decode it once.
    return sorted({window_start(core, size, tile, overlap) for core in range(0, size, tile)})


def window_length(size: int, tile: int, overlap: int) -> int:
    return min(size, tile + 2 * overlap)


def window_start(core: int, size: int, tile: int, overlap: int) -> int:
    """Start of the window decoding the core that starts at ``core``: ``overlap`` cells before it,
    shifted inwards to stay inside the axis."""
    return min(max(core - overlap, 0), size - window_length(size, tile, overlap))


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


def gather_tiles_torch(h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """[B, C, H, W] -> [n * B, C, wh, ww]: window p (top-left ``rows[p], cols[p]``) of image b at p * B + b."""
    return torch.cat([h[:, :, r:r + wh, c:c + ww] for r, c in zip(rows.tolist(), cols.tolist())])


def blend_tiles_torch_(out: torch.Tensor, weight_sum: torch.Tensor, tiles: torch.Tensor, rows: torch.Tensor,
                       cols: torch.Tensor, scale: int, ramp: int) -> None:
    """Add each decoded window (at latent cell ``rows[p], cols[p]``) times its feathered weight into
    ``out`` [B, C, Hs, Ws] and the weight into ``weight_sum`` [Hs, Ws], in place, windows in order."""
    B, Hs, Ws = out.shape[0], out.shape[2], out.shape[3]
    ph, pw = tiles.shape[2:]
    for p, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        top, left = r * scale, c * scale
        weight = (feather(top, ph, Hs, ramp, out.device, out.dtype)[:, None]
                  * feather(left, pw, Ws, ramp, out.device, out.dtype)[None, :])
        out[:, :, top:top + ph, left:left + pw] += tiles[p * B:(p + 1) * B] * weight
        weight_sum[top:top + ph, left:left + pw] += weight


def gather_tiles(h, rows, cols, wh, ww):
    if vae_tiling_backend(h.device) != "torch" and h.dtype in COMPILED_DTYPES:
        return _compiled.gather_tiles(h, rows, cols, wh, ww)
    return gather_tiles_torch(h, rows, cols, wh, ww)


def blend_tiles_(out, weight_sum, tiles, rows, cols, scale, ramp) -> None:
    if vae_tiling_backend(out.device) != "torch" and out.dtype in COMPILED_DTYPES:
        _compiled.blend_tiles_(out, weight_sum, tiles, rows, cols, scale, ramp)
    else:
        blend_tiles_torch_(out, weight_sum, tiles, rows, cols, scale, ramp)


def decode_tiled(h: torch.Tensor, up_path: Callable[[torch.Tensor], torch.Tensor], scale: int, tile: int,
                 overlap: int, windows_per_pass: int = 1) -> torch.Tensor:
    """``up_path`` applied to ``h`` [B, C, H, W] window by window and blended: [B, C_out, H * scale, W * scale].
    ``windows_per_pass`` window positions (for the whole batch) are decoded at once."""
    B, _, H, W = h.shape
    wh, ww = window_length(H, tile, overlap), window_length(W, tile, overlap)
    positions = [(r, c) for r in tile_starts(H, tile, overlap) for c in tile_starts(W, tile, overlap)]
    out = weight_sum = None
    for i in range(0, len(positions), windows_per_pass):
        rows = torch.tensor([r for r, _ in positions[i:i + windows_per_pass]], dtype=torch.int64)
        cols = torch.tensor([c for _, c in positions[i:i + windows_per_pass]], dtype=torch.int64)
        decoded = up_path(gather_tiles(h, rows, cols, wh, ww))
        if out is None:
            out = decoded.new_zeros(B, decoded.shape[1], H * scale, W * scale)
            weight_sum = decoded.new_zeros(H * scale, W * scale)
        blend_tiles_(out, weight_sum, decoded, rows, cols, scale, overlap * scale)
    return out / weight_sum
