"""Model hyper-parameters, the released presets, and config inference from checkpoint shapes.

Every preset fact (sizes, Hub file, official sampling defaults) is written here once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from .errors import InvalidArgumentError

HUB_REPO_ID = "OliverRen/xAR"


@dataclass(frozen=True)
class XARConfig:
    """Shape of an xAR transformer and of the token grid it generates.

    The image latent is a ``grid_size x grid_size`` grid of tokens with ``token_channels`` each,
    generated one ``cell_size x cell_size`` cell at a time (cells in raster order, tokens in raster
    order inside a cell).
    """

    dim: int = 768
    encoder_depth: int = 8
    decoder_depth: int = 8
    num_heads: int = 12
    mlp_hidden_dim: int = 2048
    token_channels: int = 16
    grid_size: int = 16
    cell_size: int = 8
    num_classes: int = 1000
    time_frequencies: int = 256
    rope_theta: float = 10000.0
    # The model works on latents multiplied by this; decoding divides it back out.
    latent_scale: float = 0.2325
    # True: the tokens are image pixels in [-1, 1] (no VAE); False: VAE latents.
    pixel_space: bool = False

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise InvalidArgumentError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise InvalidArgumentError(f"head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.grid_size % self.cell_size:
            raise InvalidArgumentError(f"grid_size {self.grid_size} is not a multiple of cell_size {self.cell_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def num_layers(self) -> int:
        return self.encoder_depth + self.decoder_depth

    @property
    def seq_len(self) -> int:
        return self.grid_size**2

    @property
    def tokens_per_cell(self) -> int:
        return self.cell_size**2

    @property
    def num_cells(self) -> int:
        return (self.grid_size // self.cell_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "XARConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidArgumentError(f"unknown XARConfig fields {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Preset:
    """A released model: its architecture, where its weights live, and its official sampling settings."""

    config: XARConfig
    num_inference_steps: int
    guidance_scale: float
    hub_filename: str | None = None
    hub_repo_id: str = HUB_REPO_ID
    # Shipped inside the package, under xar_infer/data/<bundled_dir>, instead of on the Hub.
    bundled_dir: str | None = None


def _official_mlp_hidden(dim: int) -> int:
    return int(dim * 4 * 2 / 3)


PRESETS: dict[str, Preset] = {
    "xar-b": Preset(
        XARConfig(dim=768, encoder_depth=8, decoder_depth=8, num_heads=12, mlp_hidden_dim=_official_mlp_hidden(768)),
        num_inference_steps=40, guidance_scale=2.7, hub_filename="xAR-B.pth",
    ),
    "xar-l": Preset(
        XARConfig(dim=1024, encoder_depth=16, decoder_depth=16, num_heads=16, mlp_hidden_dim=_official_mlp_hidden(1024)),
        num_inference_steps=50, guidance_scale=2.3, hub_filename="xAR-L.pth",
    ),
    "xar-h": Preset(
        XARConfig(dim=1280, encoder_depth=20, decoder_depth=20, num_heads=16, mlp_hidden_dim=_official_mlp_hidden(1280)),
        num_inference_steps=50, guidance_scale=2.2, hub_filename="xAR-H.pth",
    ),
    # Our small demo model: handwritten digits (scikit-learn's 8x8 set), pixels, 4 cells of 4x4.
    # Trained by tools/train_demo.py; runs anywhere, offline, in seconds.
    "xar-digits": Preset(
        XARConfig(dim=128, encoder_depth=3, decoder_depth=3, num_heads=4, mlp_hidden_dim=256, token_channels=1,
                  grid_size=8, cell_size=4, num_classes=10, latent_scale=1.0, pixel_space=True),
        num_inference_steps=25, guidance_scale=2.0, bundled_dir="xar-digits",
    ),
}

# Sampling defaults for a checkpoint whose architecture matches no preset.
FALLBACK_NUM_INFERENCE_STEPS = 50
FALLBACK_GUIDANCE_SCALE = 1.0


def find_preset(name: str) -> Preset | None:
    """The preset called ``name`` (case-insensitive, ``xAR-B`` and ``xar_b`` work too), or None."""
    return PRESETS.get(name.lower().replace("_", "-"))


def preset_for_config(config: XARConfig) -> Preset | None:
    """The released preset with exactly this architecture, if any (to pick its sampling defaults)."""
    return next((p for p in PRESETS.values() if p.config == config), None)


def infer_config(state_dict: dict[str, torch.Tensor], **overrides) -> XARConfig:
    """Read an :class:`XARConfig` off a state dict in the released format.

    Heads come from the RoPE table (``attn.rope.freqs_cos`` is ``[seq_len, head_dim]``), cell size from
    the block-causal ``mask``; both are required, since linear weights cannot tell them.
    ``overrides`` win over what the shapes say (e.g. ``num_heads`` for a state dict without RoPE buffers).
    """
    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise KeyError(f"cannot infer the model config: tensor {key!r} is missing from the checkpoint")
        return state_dict[key].shape

    dim, token_channels = shape("z_proj.weight")
    seq_len = shape("encoder_pos_embed_learned")[1]
    grid_size = math.isqrt(seq_len)
    values = dict(
        dim=dim,
        token_channels=token_channels,
        grid_size=grid_size,
        encoder_depth=_count_blocks(state_dict, "encoder_blocks."),
        decoder_depth=_count_blocks(state_dict, "decoder_blocks."),
        mlp_hidden_dim=shape("encoder_blocks.0.mlp.fc1_g.weight")[0],
        num_classes=shape("class_emb.weight")[0] - 1,
        time_frequencies=shape("time_embed.mlp.0.weight")[1],
    )
    if "num_heads" not in overrides:
        values["num_heads"] = dim // shape("encoder_blocks.0.attn.rope.freqs_cos")[1]
    if "cell_size" not in overrides:
        # A row of the additive mask is 0 where attention is allowed: the first row sees cell 0 only.
        tokens_per_cell = int((state_dict["mask"].reshape(seq_len, seq_len)[0] == 0).sum()) if "mask" in state_dict else None
        if tokens_per_cell is None:
            raise KeyError("cannot infer the cell size: tensor 'mask' is missing; pass cell_size")
        values["cell_size"] = math.isqrt(tokens_per_cell)
    values.update(overrides)
    return XARConfig(**values)


def _count_blocks(state_dict: dict, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0
