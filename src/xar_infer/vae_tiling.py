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
also compiled from ``csrc/``: ``xar_infer._vae_tiling`` (C++, CPU) and ``xar_infer._vae_tiling_cuda``,
built by ``setup.py`` when they can be. ``vae_tiling_backend(device)`` says which one runs.
"""

from __future__ import annotations

from typing import Callable

import torch

try:
    from . import _vae_tiling as _compiled
except ImportError:  # not built: the PyTorch versions below run instead
    _compiled = None
try:
    from . import _vae_tiling_cuda as _compiled_cuda
except ImportError:  # built only against a CUDA torch with nvcc present
    _compiled_cuda = None

# Halo of each window, in latent cells, unless the caller picks one: covers most of the up path's
# receptive field at a modest cost (see the README's PSNR figures).
DEFAULT_TILE_OVERLAP = 2

# Float types each compiled version handles; others take the PyTorch path.
COMPILED_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def vae_tiling_backend(device: torch.device | str = "cpu") -> str:
    """Which implementation gathers and blends tiles on ``device``: ``"cuda"``, ``"cpp"`` or ``"torch"``."""
    device = torch.device(device)
    if device.type == "cuda" and _compiled_cuda is not None:
        return "cuda"
    if device.type == "cpu" and _compiled is not None:
        return "cpp"
    return "torch"


def _compiled_for(t: torch.Tensor):
    """The compiled module for ``t``'s device and dtype, or None."""
    if vae_tiling_backend(t.device) == "torch" or t.dtype not in COMPILED_DTYPES[t.device.type]:
        return None
    return _compiled_cuda if t.device.type == "cuda" else _compiled


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


def window_weights(starts: list[int], length: int, size: int, ramp: int, device, dtype) -> torch.Tensor:
    """[n, length]: the ``feather`` weights of windows starting at pixels ``starts`` on an axis of ``size``.
    Made once here, for the PyTorch and the compiled blends alike, so that both multiply the same weights."""
    return torch.stack([feather(start, length, size, ramp, device, dtype) for start in starts])


def gather_tiles_torch(h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """[B, C, H, W] -> [n * B, C, wh, ww]: window p (top-left ``rows[p], cols[p]``) of image b at p * B + b."""
    return torch.cat([h[:, :, r:r + wh, c:c + ww] for r, c in zip(rows.tolist(), cols.tolist())])


def blend_tiles_torch_(out: torch.Tensor, weight_sum: torch.Tensor, tiles: torch.Tensor, rows: torch.Tensor,
                       cols: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor, scale: int) -> None:
    """Add each decoded window p (at latent cell ``rows[p], cols[p]``) times its weights
    ``wy[p, :, None] * wx[p, None, :]`` into ``out`` [B, C, Hs, Ws], and the weights into ``weight_sum``
    [Hs, Ws], in place, windows in order."""
    B = out.shape[0]
    ph, pw = tiles.shape[2:]
    for p, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        top, left = r * scale, c * scale
        weight = wy[p, :, None] * wx[p, None, :]
        out[:, :, top:top + ph, left:left + pw] += tiles[p * B:(p + 1) * B] * weight
        weight_sum[top:top + ph, left:left + pw] += weight


def gather_tiles(h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    compiled = _compiled_for(h)
    return (compiled.gather_tiles if compiled else gather_tiles_torch)(h, rows, cols, wh, ww)


def blend_tiles_(out: torch.Tensor, weight_sum: torch.Tensor, tiles: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor, scale: int, ramp: int) -> None:
    """Blend decoded windows into ``out`` and ``weight_sum`` with weights ramping over ``ramp`` pixels."""
    (_, _, Hs, Ws), (ph, pw) = out.shape, tiles.shape[2:]
    wy = window_weights([r * scale for r in rows.tolist()], ph, Hs, ramp, out.device, out.dtype)
    wx = window_weights([c * scale for c in cols.tolist()], pw, Ws, ramp, out.device, out.dtype)
    compiled = _compiled_for(out)
    (compiled.blend_tiles_ if compiled else blend_tiles_torch_)(out, weight_sum, tiles, rows, cols, wy, wx, scale)


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
