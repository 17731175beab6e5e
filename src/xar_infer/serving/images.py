"""The bytes the server sends: PNG images, ``.npy`` latents, and previews of images still forming."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from ..pipeline import XARPipeline, to_pil

# Cells not made yet show as mid grey in a preview.
UNMADE_GREY = 0.5


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(latent: torch.Tensor) -> bytes:
    """``np.save`` of the latent as float32 (the model may run in bfloat16, which numpy lacks)."""
    buffer = io.BytesIO()
    np.save(buffer, latent.detach().float().cpu().numpy())
    return buffer.getvalue()


@torch.inference_mode()
def preview(pipe: XARPipeline, latent: torch.Tensor, cells_done: int) -> Image.Image:
    """The image of ``latent`` ([c, h, w], model scale) with its first ``cells_done`` cells made and
    the others grey. Decoded whole, then masked: a VAE spreads each cell's colours over its borders."""
    config = pipe.transformer.config
    image = ((pipe.decode(latent[None].to(pipe.device)) + 1) / 2).clamp(0, 1).cpu()
    per_side = config.grid_size // config.cell_size
    side = image.shape[-1] // per_side
    for cell in range(cells_done, config.num_cells):  # cells in raster order, as tokens_to_latent lays them
        row, column = divmod(cell, per_side)
        image[..., row * side:(row + 1) * side, column * side:(column + 1) * side] = UNMADE_GREY
    return to_pil(image)[0]
