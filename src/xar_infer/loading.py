"""Loading xAR transformers: released ``.pth`` files, our safetensors format, presets on the Hub.

Released checkpoints are flat state dicts that also carry derived buffers (the block-causal ``mask``
and every layer's RoPE tables). We recompute those from the config and check the stored ones against
them, so a checkpoint made for another geometry fails loudly instead of generating garbage.
Our format is the folder ``XARPipeline.save_pretrained`` writes (``hub.py``): ``model.safetensors``
(parameters only; ``model.bf16.safetensors`` for the bf16 variant), ``config.json``, and the VAE in
``vae/`` when the config says it includes one.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import CheckpointError, InvalidArgumentError
from .checkpoint_io import error_summary, load_strict, read_state_dict, verify_sha256
from .config import (
    FALLBACK_GUIDANCE_SCALE,
    FALLBACK_NUM_INFERENCE_STEPS,
    PRESETS,
    XARConfig,
    check_config_matches,
    find_preset,
    infer_config,
    preset_for_config,
)
from .model import XARTransformer, block_causal_mask, rope_frequencies, rope_tables
from .settings import SamplingSettings

WEIGHTS_NAME = "model.safetensors"
# A missing path with one of these endings is a mistyped file, not a Hub repo id.
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
CONFIG_NAME = "config.json"
# The subfolder of a model folder that holds its VAE decoder's weights (named like the transformer's).
VAE_FOLDER = "vae"
# Weight files in a lower precision, beside or instead of the full one: model.<variant>.safetensors.
VARIANTS = {"bf16": torch.bfloat16}


def check_variant(variant: str | None) -> None:
    if variant is not None and variant not in VARIANTS:
        raise InvalidArgumentError(f"variant must be None (full precision) or one of {tuple(VARIANTS)}, got {variant!r}")


def weights_name(variant: str | None = None) -> str:
    """``model.safetensors``, or ``model.<variant>.safetensors``."""
    check_variant(variant)
    return WEIGHTS_NAME if variant is None else WEIGHTS_NAME.replace(".safetensors", f".{variant}.safetensors")

# A stored RoPE table may differ from ours by float rounding (another libm's cos); beyond
# ROPE_WARN_TOLERANCE it was computed differently and we say so; beyond ROPE_ERROR_TOLERANCE it
# is a different embedding (theta, grid or channel order) that this model cannot reproduce.
ROPE_WARN_TOLERANCE = 1e-6
ROPE_ERROR_TOLERANCE = 1e-2


@dataclass(frozen=True)
class LoadedModel:
    model: XARTransformer
    num_inference_steps: int
    guidance_scale: float
    source: str
    # The VAE weights saved with the model (its folder's vae/), if any.
    vae_path: Path | None = None


@dataclass(frozen=True)
class ModelFolderConfig:
    """What a model folder's ``config.json`` holds."""

    config: XARConfig
    num_inference_steps: int | list[int] | None
    guidance_scale: float | None
    includes_vae: bool


def released_buffers(config: XARConfig) -> dict[str, torch.Tensor]:
    """The derived buffers a released checkpoint stores, as the released code computes them."""
    mask = torch.zeros(config.seq_len, config.seq_len)
    mask.masked_fill_(~block_causal_mask(config.tokens_per_cell, 0, config.seq_len), float("-inf"))
    buffers = {"mask": mask[None, None]}
    cos, sin = rope_tables(config)
    freqs = rope_frequencies(config)
    for part, depth in (("encoder_blocks", config.encoder_depth), ("decoder_blocks", config.decoder_depth)):
        for i in range(depth):
            prefix = f"{part}.{i}.attn.rope."
            buffers.update({prefix + "freqs": freqs, prefix + "freqs_cos": cos, prefix + "freqs_sin": sin})
    return buffers


def check_released_buffers(stored: dict[str, torch.Tensor], config: XARConfig, source: str) -> None:
    """Compare a checkpoint's derived buffers with ours; all must be present, none may be foreign."""
    expected = released_buffers(config)
    missing = sorted(expected.keys() - stored.keys())
    if missing:
        raise CheckpointError(f"{source}: missing buffer(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                              "of the released format; the file is incomplete")
    for key, want in expected.items():
        got = stored[key]
        if got.shape != want.shape:
            raise CheckpointError(f"{source}: buffer {key} has shape {tuple(got.shape)}, expected {tuple(want.shape)} "
                                  f"for {config}")
        if key == "mask":
            if not torch.equal(got.float(), want):
                raise CheckpointError(f"{source}: the attention mask is not block-causal over {config.cell_size}x"
                                      f"{config.cell_size} cells; the checkpoint was made for another cell layout")
            continue
        diff = (got.float() - want).abs().max().item()
        if diff > ROPE_ERROR_TOLERANCE:
            raise CheckpointError(f"{source}: buffer {key} differs from xAR's 2D RoPE by up to {diff:.3g}; the model "
                                  "used another rotary embedding, which this implementation does not support")
        if diff > ROPE_WARN_TOLERANCE:
            warnings.warn(f"{source}: buffer {key} differs from the computed RoPE table by up to {diff:.3g} (more than "
                          "float rounding); using the computed table", stacklevel=3)


def _is_released_buffer(key: str) -> bool:
    return key == "mask" or ".attn.rope." in key


def _split_buffers(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    params = {k: v for k, v in state_dict.items() if not _is_released_buffer(k)}
    buffers = {k: v for k, v in state_dict.items() if _is_released_buffer(k)}
    return params, buffers


def build_model(state_dict: dict[str, torch.Tensor], source: str, config: XARConfig | None = None, *,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> XARTransformer:
    """An inference-only :class:`XARTransformer` from a state dict (released or ours), strictly checked.

    The config (given, or read off the shapes) is checked against the tensors before anything is
    built from it, so a hostile config or key cannot make us allocate more than the file holds.
    """
    inferred = config is None
    try:
        if inferred:
            config = infer_config(state_dict)
        check_config_matches(config, state_dict)
    except CheckpointError as exc:
        hint = "is this an xAR checkpoint?" if inferred else f"does the {CONFIG_NAME} belong to these weights?"
        raise CheckpointError(f"{source}: {exc}; {hint}") from None
    params, buffers = _split_buffers(state_dict)
    if buffers:
        check_released_buffers(buffers, config, source)
    with torch.device("meta"):
        model = XARTransformer(config)
    load_strict(model, params, source, device=device, dtype=dtype)
    model.reset_rope_tables()
    return model.eval().requires_grad_(False)


def _defaults_for(config: XARConfig) -> tuple[int, float]:
    preset = preset_for_config(config)
    if preset is None:
        return FALLBACK_NUM_INFERENCE_STEPS, FALLBACK_GUIDANCE_SCALE
    return preset.num_inference_steps, preset.guidance_scale


def read_folder_config(path: Path) -> ModelFolderConfig:
    """A model folder's ``config.json``, checked (architecture, sampling defaults, whether it has a VAE)."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "xar_config" not in data:
            raise InvalidArgumentError("it has no 'xar_config' object")
        config = XARConfig.from_dict(data["xar_config"])
        steps, scale = data.get("num_inference_steps"), data.get("guidance_scale")
        SamplingSettings.build(config.num_cells, 1 if steps is None else steps, 1.0 if scale is None else scale)
        includes_vae = data.get("includes_vae", False)  # absent in folders written before the VAE was saved too
        if not isinstance(includes_vae, bool):
            raise InvalidArgumentError(f"includes_vae must be true or false, got {includes_vae!r}")
    # RecursionError: JSON nested too deeply to parse.
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a valid xar_infer config ({error_summary(exc)}); save the model "
                              "again (save_pretrained or xar-convert)") from None
    return ModelFolderConfig(config, steps, scale, includes_vae)


def _folder_weights(folder: Path, variant: str | None) -> Path:
    """The transformer's weights file of a model folder; when it is missing but another variant is there,
    an error that names what the folder holds."""
    weights = folder / weights_name(variant)
    if weights.is_file():
        return weights
    held = [f"variant={v!r} ({weights_name(v)})" if v else f"the full-precision {WEIGHTS_NAME} (variant=None)"
            for v in (None, *VARIANTS) if v != variant and (folder / weights_name(v)).is_file()]
    if not held:
        return weights  # reading it names the missing file
    raise CheckpointError(f"{folder} has no {weights.name}" + (f" (variant={variant!r})" if variant else "")
                          + f"; it holds {', '.join(held)}: pass that variant")


def load_local(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", sha256: str | None = None, variant: str | None = None) -> LoadedModel:
    """Load a released ``.pth``, a ``.safetensors`` file (config from ``config.json`` beside it or
    from the shapes), or a folder written by ``save_pretrained`` / ``xar-convert`` (``variant``
    picks its ``model.<variant>.safetensors``; the weights are cast to ``dtype`` whatever their file's
    precision). ``sha256``: the expected digest of the weights file, checked before it is read."""
    path = Path(path)
    check_variant(variant)
    weights, config_file = path, None
    if path.is_dir():
        config_file = path / CONFIG_NAME
    elif variant is not None:
        raise InvalidArgumentError(f"variant={variant!r} picks a weights file of a model folder, but {path} is a file: "
                                   "pass the folder, or leave variant out")
    elif path.suffix == ".safetensors" and (path.parent / CONFIG_NAME).is_file():
        config_file = path.parent / CONFIG_NAME
    folder = None
    if config_file is not None:
        if not config_file.is_file():
            raise CheckpointError(f"{path} has no {CONFIG_NAME}; a model folder needs {WEIGHTS_NAME} and {CONFIG_NAME}")
        folder = read_folder_config(config_file)
    if path.is_dir():
        weights = _folder_weights(path, variant)
    vae_path = None
    if path.is_dir() and folder.includes_vae:
        vae_path = path / VAE_FOLDER / weights_name(variant)
        if not vae_path.is_file():
            raise CheckpointError(f"{config_file} says the folder includes a VAE, but {vae_path} is missing; save the "
                                  "model again")
    if sha256 is not None:
        verify_sha256(weights, sha256)
    model = build_model(read_state_dict(weights), str(weights), folder and folder.config, dtype=dtype, device=device)
    steps, scale = _defaults_for(model.config)
    if folder is not None:  # config.json's defaults win where it has them
        steps = steps if folder.num_inference_steps is None else folder.num_inference_steps
        scale = scale if folder.guidance_scale is None else folder.guidance_scale
    return LoadedModel(model, steps, scale, str(weights), vae_path)


def hub_download(repo_id: str, filename: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                 local_files_only: bool = False, token: str | bool | None = None, force_download: bool = False) -> Path:
    """Path of ``filename`` from a Hugging Face repo, downloaded or from the local cache (``token``:
    for private repos, else huggingface_hub's login; ``force_download``: fetch it again even if cached).

    One metadata request first (huggingface_hub's own, without retries, its ``HF_HUB_ETAG_TIMEOUT``)
    tells whether the Hub answers. If it does not, the cached copy is used, or one
    :class:`CheckpointError` says what to do: huggingface_hub alone would retry with backoff, about
    25 s and a dozen log lines when there is no network.
    """
    if local_files_only and force_download:
        raise InvalidArgumentError("force_download=True fetches the files again, which local_files_only=True forbids: "
                                   "pass one of them")
    unreachable = None if local_files_only else _hub_unreachable(repo_id, filename, revision, token)
    if unreachable is not None and force_download:
        raise CheckpointError(f"cannot download {filename} of {repo_id} again (force_download=True): the Hub cannot be "
                              f"reached: {unreachable}; try later, or leave force_download out to use the cached copy")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token,
                                    local_files_only=local_files_only or unreachable is not None,
                                    force_download=force_download))
    except LocalEntryNotFoundError:
        why = "local_files_only is set" if unreachable is None else f"the Hub cannot be reached: {unreachable}"
        raise CheckpointError(
            f"{filename} of {repo_id} is not in the Hugging Face cache and cannot be downloaded ({why}). "
            f"Download it where you are online (`hf download {repo_id} {filename}`), or pass the local file: "
            f"XARPipeline.from_pretrained('/path/to/{filename}') or xar-generate --checkpoint /path/to/file"
            + ("" if unreachable is None else f"; on a slow connection raise HF_HUB_ETAG_TIMEOUT (now "
               f"{hub_constants.HF_HUB_ETAG_TIMEOUT} s)")
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise _not_on_hub(repo_id, filename, revision, exc) from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"downloading {filename} from {repo_id} failed: {error_summary(exc)}") from None


def _hub_unreachable(repo_id: str, filename: str, revision: str | None, token: str | bool | None = None) -> str | None:
    """Why the Hub gives no metadata for the file right now (no network, offline mode, a server error),
    or None when it answers. An answer that the file does not exist raises."""
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), token=token,
                             timeout=hub_constants.HF_HUB_ETAG_TIMEOUT)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise _not_on_hub(repo_id, filename, revision, exc) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status is not None and (status >= 500 or status in (408, 429)):  # what huggingface_hub would retry
            return f"HTTP {status}"
        raise CheckpointError(f"downloading {filename} from {repo_id} failed: {error_summary(exc)}") from None
    # The HTTP client's own errors (requests, httpx or httpx2, by huggingface_hub version) and its
    # OfflineModeIsEnabled: no route, refused, timed out, HF_HUB_OFFLINE set.
    except Exception as exc:
        return f"{type(exc).__name__}: {error_summary(exc)}"
    return None


def _not_on_hub(repo_id: str, filename: str, revision: str | None, exc: Exception) -> CheckpointError:
    return CheckpointError(f"cannot fetch {filename} from Hub repo {repo_id} at revision {revision or 'main'}: "
                           f"{type(exc).__name__}; check the name and revision")


def load_pretrained(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                    sha256: str | None = None, variant: str | None = None, token: str | bool | None = None,
                    force_download: bool = False) -> LoadedModel:
    """Resolve a local path, a preset name (``xar-b`` from the Hub, ``xar-digits`` shipped with the
    package), or a Hub repo id in our format, and load it (checking the weights' ``sha256`` if given).
    ``variant`` picks the weights of a model folder (local or on the Hub); ``token`` and
    ``force_download`` concern Hub downloads."""
    check_variant(variant)
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
               force_download=force_download)
    if Path(name_or_path).exists():  # a local file wins over a preset or repo id of the same name
        return load_local(name_or_path, dtype=dtype, device=device, sha256=sha256, variant=variant)
    preset = find_preset(str(name_or_path))
    if preset is not None:
        if variant is not None:
            raise InvalidArgumentError(f"variant={variant!r} picks a weights file of a folder made by save_pretrained; "
                                       f"the preset {name_or_path} has one set of weights: leave variant out (dtype= "
                                       "sets the precision it runs in)")
        if preset.bundled_dir is not None:
            path = Path(str(files("xar_infer") / "data" / preset.bundled_dir))
        else:
            path = hub_download(preset.hub_repo_id, preset.hub_filename, **hub)
        loaded = load_local(path, dtype=dtype, device=device, sha256=sha256)
        return LoadedModel(loaded.model, preset.num_inference_steps, preset.guidance_scale, loaded.source)
    name = str(name_or_path)
    if name.count("/") == 1 and not name.endswith(CHECKPOINT_SUFFIXES):
        config_path = hub_download(name, CONFIG_NAME, **hub)
        hub_download(name, weights_name(variant), **hub)
        if read_folder_config(config_path).includes_vae:
            hub_download(name, f"{VAE_FOLDER}/{weights_name(variant)}", **hub)
        return load_local(config_path.parent, dtype=dtype, device=device, sha256=sha256, variant=variant)
    raise CheckpointError(f"{name!r} is not a preset ({', '.join(PRESETS)}), an existing file or directory, "
                          "or a Hub repo id (owner/name)")
