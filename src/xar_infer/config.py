"""Model hyper-parameters, the released presets, and config inference from checkpoint shapes.

Every preset fact (sizes, Hub file, official sampling defaults) is written here once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch

from .checkpoint_io import key_indices, leading_run
from .errors import CheckpointError, InvalidArgumentError

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
        for name in ("dim", "encoder_depth", "decoder_depth", "num_heads", "mlp_hidden_dim", "token_channels",
                     "grid_size", "cell_size", "num_classes", "time_frequencies"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"XARConfig.{name} must be a positive int, got {value!r}")
        for name in ("rope_theta", "latent_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InvalidArgumentError(f"XARConfig.{name} must be a finite number > 0, got {value!r}")
        if not isinstance(self.pixel_space, bool):
            raise InvalidArgumentError(f"XARConfig.pixel_space must be True or False, got {self.pixel_space!r}")
        if self.time_frequencies % 2:
            raise InvalidArgumentError(f"XARConfig.time_frequencies must be even (cos and sin halves), got {self.time_frequencies}")
        if self.dim % self.num_heads:
            raise InvalidArgumentError(f"XARConfig.dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise InvalidArgumentError(f"XARConfig head_dim (dim / num_heads = {self.head_dim}) must be a multiple of 4 "
                                       "for 2D RoPE; change num_heads")
        if self.grid_size % self.cell_size:
            raise InvalidArgumentError(f"XARConfig.grid_size {self.grid_size} is not a multiple of cell_size {self.cell_size}")

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
        if not isinstance(data, Mapping):
            raise InvalidArgumentError(f"an XARConfig is read from a dict of its fields, got {type(data).__name__}")
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


def infer_config(state_dict: Mapping[str, torch.Tensor], **overrides) -> XARConfig:
    """Read an :class:`XARConfig` off a state dict in the released format.

    Heads come from the RoPE table (``attn.rope.freqs_cos`` is ``[seq_len, head_dim]``), cell size from
    the block-causal ``mask``; both are required, since linear weights cannot tell them.
    ``overrides`` win over what the shapes say (e.g. ``num_heads`` for a state dict without RoPE buffers).
    Raises :class:`CheckpointError` when the shapes cannot be those of an xAR model; the result still
    has to pass :func:`check_config_matches` (block indices, the tensors that ``overrides`` concern).
    """
    dim, token_channels = _shape(state_dict, "z_proj.weight", 2)
    seq_len = _shape(state_dict, "encoder_pos_embed_learned", 3)[1]
    grid_size = math.isqrt(seq_len)
    if grid_size**2 != seq_len:
        raise CheckpointError(f"encoder_pos_embed_learned holds {seq_len} positions, not a square grid of tokens")
    values = dict(
        dim=dim,
        token_channels=token_channels,
        grid_size=grid_size,
        # Blocks 0, 1, ... up to the first missing: a gap or a stray index is then named by check_config_matches.
        encoder_depth=leading_run(key_indices(state_dict, "encoder_blocks.").values()),
        decoder_depth=leading_run(key_indices(state_dict, "decoder_blocks.").values()),
        mlp_hidden_dim=_shape(state_dict, "encoder_blocks.0.mlp.fc1_g.weight", 2)[0],
        num_classes=_shape(state_dict, "class_emb.weight", 2)[0] - 1,
        time_frequencies=_shape(state_dict, "time_embed.mlp.0.weight", 2)[1],
    )
    if "num_heads" not in overrides:
        head_dim = _shape(state_dict, "encoder_blocks.0.attn.rope.freqs_cos", 2)[1]
        if head_dim < 1 or dim % head_dim:
            raise CheckpointError(f"the RoPE table's head width {head_dim} does not divide dim {dim}")
        values["num_heads"] = dim // head_dim
    if "cell_size" not in overrides:
        if "mask" not in state_dict:
            raise CheckpointError("cannot infer the cell size: tensor 'mask' is missing; pass cell_size")
        mask = state_dict["mask"]
        if tuple(mask.shape) != (1, 1, seq_len, seq_len):
            raise CheckpointError(f"mask has shape {tuple(mask.shape)}, expected {(1, 1, seq_len, seq_len)}")
        # A row of the additive mask is 0 where attention is allowed: the first row sees cell 0 only.
        tokens_per_cell = int((mask[0, 0, 0] == 0).sum())
        values["cell_size"] = math.isqrt(tokens_per_cell)
        if values["cell_size"] ** 2 != tokens_per_cell:
            raise CheckpointError(f"the mask's first row sees {tokens_per_cell} tokens, not a square cell")
    values.update(overrides)
    try:
        return XARConfig(**values)
    except InvalidArgumentError as exc:
        raise CheckpointError(f"the tensor shapes give an invalid config: {exc}") from None


def check_config_matches(config: XARConfig, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` holds the tensors ``config`` describes.

    Only shapes and key names are compared, so this runs before any module or buffer is made from the
    config: a config (from ``config.json`` or inferred) can never ask for more than the file holds.
    Block indices must be exactly ``0 .. depth-1``; the sizes that set the other tensors' shapes (dim,
    token channels, grid, MLP width, classes, time frequencies, heads and the mask where the file has
    them) must match. Everything else is checked name by name when the weights are loaded.
    """
    for part, depth in (("encoder", config.encoder_depth), ("decoder", config.decoder_depth)):
        found = key_indices(state_dict, f"{part}_blocks.")
        unexpected = sorted(k for k, i in found.items() if i is None or i >= depth)
        if unexpected:
            raise CheckpointError(f"unexpected tensors {_list(unexpected)}: {part} blocks must be numbered 0 to "
                                  f"{depth - 1} ({part}_depth={depth}) without gaps")
        indices = set(found.values())
        if len(indices) < depth:
            first = min(set(range(len(indices) + 1)) - indices)
            raise CheckpointError(f"the config says {part}_depth={depth} but the file holds {len(indices)} {part} "
                                  f"block(s) (no tensors {part}_blocks.{first}.*)")
    c = config
    anchors = {
        "z_proj.weight": ((c.dim, c.token_channels), f"dim={c.dim}, token_channels={c.token_channels}"),
        "encoder_pos_embed_learned": ((1, c.seq_len, c.dim), f"grid_size={c.grid_size}, dim={c.dim}"),
        "class_emb.weight": ((c.num_classes + 1, c.dim), f"num_classes={c.num_classes} (+1 null class), dim={c.dim}"),
        "time_embed.mlp.0.weight": ((c.dim, c.time_frequencies), f"dim={c.dim}, time_frequencies={c.time_frequencies}"),
        "encoder_blocks.0.mlp.fc1_g.weight": ((c.mlp_hidden_dim, c.dim), f"mlp_hidden_dim={c.mlp_hidden_dim}, dim={c.dim}"),
    }
    # Released files also carry derived buffers: they pin the heads and the mask size.
    if "encoder_blocks.0.attn.rope.freqs_cos" in state_dict:
        anchors["encoder_blocks.0.attn.rope.freqs_cos"] = (
            (c.seq_len, c.head_dim), f"grid_size={c.grid_size}, num_heads={c.num_heads} (head width {c.head_dim})")
    if "mask" in state_dict:
        anchors["mask"] = ((1, 1, c.seq_len, c.seq_len), f"grid_size={c.grid_size}")
    for key, (want, fields_) in anchors.items():
        got = _shape(state_dict, key)
        if got != want:
            raise CheckpointError(f"tensor {key} has shape {got}, but the config's {fields_} need {want}")


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, ndim: int | None = None) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"tensor {key!r} is missing")
    shape = tuple(state_dict[key].shape)
    if ndim is not None and len(shape) != ndim:
        raise CheckpointError(f"tensor {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def _list(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")
