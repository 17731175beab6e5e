"""Decoder half of MAR's KL-16 VAE (an LDM-style AutoencoderKL), which turns xAR latents into images.

Only what decoding needs is built; parameter names follow the released ``kl16.ckpt`` so its weights
load without renaming.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint_io import key_indices, leading_run, load_strict, read_state_dict
from .errors import CheckpointError, InvalidArgumentError
from .vae_tiling import DEFAULT_TILE_OVERLAP, decode_tiled

# Keys the released checkpoint carries that decoding never uses: the encoder side of the autoencoder
# and, in training snapshots, the loss networks (discriminator / LPIPS).
IGNORED_PREFIXES = ("encoder.", "quant_conv.", "loss.")
GROUP_NORM_GROUPS = 32


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the KL VAE decoder; the defaults are MAR's KL-16 (16 latent channels, stride 16)."""

    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    out_channels: int = 3

    def __post_init__(self):
        for name in ("embed_dim", "ch", "num_res_blocks", "out_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_res_blocks" else 1):
                raise InvalidArgumentError(f"VAEConfig.{name} must be a {'non-negative' if name == 'num_res_blocks' else 'positive'} "
                                           f"int, got {value!r}")
        if self.ch % GROUP_NORM_GROUPS:
            raise InvalidArgumentError(f"VAEConfig.ch must be a multiple of {GROUP_NORM_GROUPS} (the group norm's groups), got {self.ch}")
        if not isinstance(self.ch_mult, tuple) or not self.ch_mult or \
                any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise InvalidArgumentError(f"VAEConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}")

    @property
    def stride(self) -> int:
        """Image pixels per latent cell along each side."""
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, H*W tokens, C]; SDPA's default scale is 1/sqrt(C)
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, num_blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(num_blocks))
        if upsample:
            self.upsample = Upsample(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.embed_dim, widths[-1], 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(widths[-1], widths[-1])
        self.mid.attn_1 = AttnBlock(widths[-1])
        self.mid.block_2 = ResnetBlock(widths[-1], widths[-1])
        # up[i] works at resolution level i (0 = full image size) and is run from the last to the first;
        # each level takes the width of the level below it (the deepest one takes its own width)
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1, upsample=i > 0)
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up_path(self.trunk(z))

    def trunk(self, z: torch.Tensor) -> torch.Tensor:
        """Input convolution and middle block (global attention), at latent resolution."""
        h = self.conv_in(z)
        return self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))

    def up_path(self, h: torch.Tensor) -> torch.Tensor:
        """Upsampling levels and output layers: the memory peak, and the part that can be tiled."""
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKLDecoder(nn.Module):
    """The decoding half of MAR's ``AutoencoderKL``: ``post_quant_conv`` followed by the decoder.

    Example::

        vae = AutoencoderKLDecoder(VAEConfig())          # or load_vae("kl16.ckpt")
        img = vae.decode(torch.randn(1, 16, 16, 16))     # -> [1, 3, 256, 256], roughly in [-1, 1]
    """

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)
        self.decoder = Decoder(cfg)

    def decode(self, z: torch.Tensor, tile_size: int | None = None, tile_overlap: int = DEFAULT_TILE_OVERLAP) -> torch.Tensor:
        """Latents ``[B, embed_dim, h, w]`` -> images ``[B, 3, h*stride, w*stride]`` in about [-1, 1].

        ``z`` is taken as is: undoing xAR's latent scaling (dividing by 0.2325) is the caller's job.
        ``tile_size``: decode the up path in windows of that many latent cells per side plus a halo of
        ``tile_overlap`` cells, blended (see ``vae_tiling``); bounds memory by the tile. None: untiled.
        """
        h = self.decoder.trunk(self.post_quant_conv(z))
        if tile_size is None:
            return self.decoder.up_path(h)
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1 \
                or isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or tile_overlap < 0:
            raise InvalidArgumentError(f"tile_size must be a positive and tile_overlap a non-negative number of latent cells, "
                             f"got {tile_size!r} and {tile_overlap!r}")
        return decode_tiled(h, self.decoder.up_path, self.config.stride, tile_size, tile_overlap)

    forward = decode


def _need(sd: dict[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"not a KL VAE decoder checkpoint: key {key!r} is missing")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"not a KL VAE decoder checkpoint: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def _contiguous(found: dict[str, int | None], what: str) -> int:
    """How many indices run 0, 1, ...; raises naming a key outside that run (a gap or a stray index)."""
    count = leading_run(found.values())
    stray = sorted(k for k, i in found.items() if i is None or i >= count)
    if stray:
        raise CheckpointError(f"not a KL VAE decoder checkpoint: unexpected tensor {stray[0]} ({what} must be numbered "
                              f"0 to {count - 1} without gaps)")
    return count


def infer_vae_config(state_dict: dict[str, torch.Tensor]) -> VAEConfig:
    """Read the decoder's shape from tensor shapes (keys as in ``kl16.ckpt``, without a ``model.`` prefix).

    Level and block indices must run 0, 1, ... without gaps, the same blocks in every level, so the
    config can describe no more modules than the file has tensors for.

    Example::

        cfg = infer_vae_config(vae.state_dict())   # VAEConfig(embed_dim=16, ch=128, ch_mult=(1, 1, 2, 2, 4), ...)
    """
    out_channels, ch = _need(state_dict, "decoder.conv_out.weight", 4)[:2]
    embed_dim = _need(state_dict, "post_quant_conv.weight", 4)[0]
    num_levels = _contiguous(key_indices(state_dict, "decoder.up."), "decoder.up levels")
    if num_levels == 0:
        raise CheckpointError("not a KL VAE decoder checkpoint: it has no decoder.up levels")
    num_blocks = None
    ch_mult = []
    for i in range(num_levels):
        blocks = _contiguous(key_indices(state_dict, f"decoder.up.{i}.block."), f"decoder.up.{i}.block entries")
        if blocks == 0 or blocks != (num_blocks or blocks):
            raise CheckpointError(f"not a KL VAE decoder checkpoint: decoder.up.{i} has {blocks} blocks"
                                  + (f", decoder.up.0 has {num_blocks}" if i else "") + "; every level needs the same number, at least 1")
        num_blocks = blocks
        width = _need(state_dict, f"decoder.up.{i}.block.0.conv2.weight", 4)[0]
        if ch < 1 or width % ch or width == 0:
            raise CheckpointError(f"decoder.up.{i} has {width} channels, not a positive multiple of ch={ch}")
        ch_mult.append(width // ch)
    try:
        return VAEConfig(embed_dim=embed_dim, ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_blocks - 1,
                         out_channels=out_channels)
    except InvalidArgumentError as exc:
        raise CheckpointError(f"not a KL VAE decoder checkpoint: its shapes give an invalid config: {exc}") from None


def load_vae(
    path: str | os.PathLike,
    ch_mult: tuple[int, ...] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AutoencoderKLDecoder:
    """Load the KL VAE decoder from MAR's ``kl16.ckpt`` (or a ``.safetensors`` export of it).

    The architecture is read from the tensor shapes; pass ``ch_mult`` only to assert what you expect.
    Encoder weights are skipped; any other missing, extra or misshapen tensor raises ``CheckpointError``.
    Returns the module in eval mode with gradients off.

    Example::

        vae = load_vae("pretrained/vae/kl16.ckpt")
        images = vae.decode(tokens / 0.2325)   # [B, 16, 16, 16] -> [B, 3, 256, 256]
    """
    raw = read_state_dict(path, nested_key="model")
    # Flat exports keep the model under "model."; anything beside it (e.g. test data) is not weights.
    if any(k.startswith("model.") for k in raw):
        raw = {k.removeprefix("model."): v for k, v in raw.items() if k.startswith("model.")}
    sd = {k: v for k, v in raw.items() if not k.startswith(IGNORED_PREFIXES)}

    try:
        cfg = infer_vae_config(sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if ch_mult is not None and tuple(ch_mult) != cfg.ch_mult:
        raise CheckpointError(
            f"{path}: ch_mult={tuple(ch_mult)} was asked for but the checkpoint's shapes say "
            f"ch_mult={cfg.ch_mult}; pass the matching value or leave ch_mult out"
        )

    # Built on the meta device: every parameter is about to be replaced by the checkpoint's tensor.
    with torch.device("meta"):
        model = AutoencoderKLDecoder(cfg)
    load_strict(model, sd, f"{path} (VAE decoder, {cfg})", device=device, dtype=dtype)
    return model.eval().requires_grad_(False)
