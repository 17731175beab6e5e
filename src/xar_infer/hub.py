"""Our model folder, written and shared: what ``XARPipeline.save_pretrained`` and ``xar-convert``
write and ``push_to_hub`` uploads. ``loading.py`` reads it back.

A folder holds::

    model.safetensors       the transformer's parameters (model.bf16.safetensors: the bf16 variant)
    config.json             its architecture, sampling defaults, and whether the VAE is included
    vae/model.safetensors   the VAE decoder, when the pipeline has one (vae/model.bf16.safetensors)
    README.md               the model card: Hub metadata, usage code, the sampling defaults

Weights are safetensors only: nothing is ever pickled. The README does not depend on the variant, so
a full-precision save and a bf16 save can share a folder (or a Hub repo). We use ``huggingface_hub``
directly rather than its ``PyTorchModelHubMixin``: the mixin's ``from_pretrained`` would take over our
loading of presets and released ``.pth`` files, and its config is the constructor's arguments, where
ours is two modules and the sampling defaults.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData

from .config import XARConfig
from .errors import InvalidArgumentError
from .checkpoint_io import write_safetensors
from .imagenet import IMAGENET_NUM_CLASSES
from .loading import CONFIG_NAME, VAE_FOLDER, VARIANTS, check_variant, load_pretrained, weights_name
from .model import XARTransformer
from .output_files import write_folder
from .vae import AutoencoderKLDecoder, load_vae

CARD_NAME = "README.md"
LIBRARY_NAME = "xar_infer"
# The Hub's task for image generation from no input image or text (a class label is not text).
PIPELINE_TAG = "unconditional-image-generation"
# A placeholder the person sharing the model replaces with the weights' license.
LICENSE_PLACEHOLDER = "other"
# safetensors header metadata that the Hub and other readers expect of PyTorch weights.
SAFETENSORS_METADATA = {"format": "pt"}
OVERWRITE_HINT = "pass overwrite=True (xar-convert: --overwrite) to replace it"


def save_model_folder(folder: str | os.PathLike, transformer: XARTransformer, num_inference_steps: int | Sequence[int],
                      guidance_scale: float, vae: AutoencoderKLDecoder | None = None, *, variant: str | None = None,
                      overwrite: bool = False, repo_id: str | None = None) -> list[str]:
    """Write a model folder (the layout above) and return the names it wrote.

    ``variant=None`` writes the weights in the precision they have, ``"bf16"`` casts them to bfloat16
    (the VAE's too) and names the files ``model.bf16.safetensors``. The files are staged and compared
    before any takes its name (``output_files.write_folder``): files identical to those in the folder
    are kept, and a folder holding a different save is refused unless ``overwrite``. ``repo_id``: the
    name the model card's usage code loads (default: the folder's name).
    """
    check_variant(variant)
    dtype = VARIANTS.get(variant)
    name = weights_name(variant)
    files = {name: _weights_writer(transformer, dtype)}
    if vae is not None:
        files[f"{VAE_FOLDER}/{name}"] = _weights_writer(vae, dtype)
    steps = num_inference_steps if isinstance(num_inference_steps, int) else list(num_inference_steps)
    config = {
        "xar_config": transformer.config.to_dict(),
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "includes_vae": vae is not None,
    }
    files[CONFIG_NAME] = _text_writer(json.dumps(config, indent=2) + "\n")
    card = model_card(transformer.config, steps, guidance_scale, vae is not None, repo_id or Path(folder).name)
    files[CARD_NAME] = _text_writer(card)
    return write_folder(folder, files, overwrite=overwrite, exists_hint=OVERWRITE_HINT)


def _weights_writer(module: torch.nn.Module, dtype: torch.dtype | None):
    def write(path: Path) -> None:
        state = module.state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        write_safetensors(state, path, metadata=SAFETENSORS_METADATA)
    return write


def _text_writer(text: str):
    return lambda path: path.write_bytes(text.encode())


def model_card(config: XARConfig, num_inference_steps: int | list[int], guidance_scale: float, includes_vae: bool,
               where: str) -> str:
    """The README.md of a model folder: Hub metadata (YAML front matter), then usage and the defaults."""
    imagenet = config.num_classes == IMAGENET_NUM_CLASSES
    tags = ["xar", "autoregressive", "flow-matching", "class-conditional", "image-generation"]
    data = ModelCardData(library_name=LIBRARY_NAME, license=LICENSE_PLACEHOLDER, pipeline_tag=PIPELINE_TAG,
                         tags=tags + (["imagenet"] if imagenet else []))
    decodes = includes_vae or config.pixel_space
    labels = '"golden retriever", 88' if imagenet else ", ".join(str(i) for i in range(min(2, config.num_classes)))
    call = f"out = pipe([{labels}], generator=torch.Generator().manual_seed(0)" + \
        ("" if decodes else ', output_type="latent"') + ")"
    result = 'out.images[0].save("sample.png")' if decodes else "latent = out.images  # no VAE here: pass vae= to decode"
    if includes_vae:
        vae_line = f"`{VAE_FOLDER}/`: the VAE decoder, loaded with the model."
    elif config.pixel_space:
        vae_line = "No VAE: the model makes pixels itself."
    else:
        vae_line = "No VAE: pass one to `from_pretrained(..., vae=...)` to decode images."
    tokens = "pixels" if config.pixel_space else "VAE latent tokens"
    grid = (f"It generates a grid of {config.grid_size}x{config.grid_size} {tokens} in {config.num_cells} cells of "
            f"{config.cell_size}x{config.cell_size}, one cell after another, each by flow matching, for "
            f"{config.num_classes} classes.")
    body = f"""
# xAR model

A class-conditional image generator of the xAR family ("Beyond Next-Token: Next-X Prediction for
Autoregressive Visual Generation", [arXiv 2502.20388](https://arxiv.org/abs/2502.20388)), saved by
the `xar_infer` library with `save_pretrained`. {grid}

**License: set it before sharing.** The `license: {LICENSE_PLACEHOLDER}` above is a placeholder; replace
it with the license of these weights.

## Usage

```python
import torch
from xar_infer import XARPipeline

# variant="bf16" loads model.bf16.safetensors where the folder has it; dtype=torch.bfloat16 runs in bf16
pipe = XARPipeline.from_pretrained("{where}")
{call}
{result}
```

## Files

- `model.safetensors` (`model.bf16.safetensors`: the bf16 variant): the transformer, and
  `config.json`: its architecture and sampling defaults.
- {vae_line}

## Sampling defaults

| setting | value |
|---|---|
| `num_inference_steps` (per cell) | {num_inference_steps} |
| `guidance_scale` | {guidance_scale:g} |
| `sampler` | `"sde"` (the released Euler-Maruyama sampler) |
| `guidance_schedule` | `"linear"` |

## Architecture

| field | value |
|---|---|
""" + "".join(f"| `{k}` | {v} |\n" for k, v in config.to_dict().items())
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push_model_folder(repo_id: str, transformer: XARTransformer, num_inference_steps: int | Sequence[int],
                      guidance_scale: float, vae: AutoencoderKLDecoder | None = None, *, variant: str | None = None,
                      token: str | None = None, private: bool | None = None, commit_message: str | None = None):
    """Upload the folder :func:`save_model_folder` writes to the Hub repo ``repo_id`` (made if it does
    not exist; ``private`` applies then). The folder is written to a temporary directory first, so
    nothing is uploaded unless all of it was written. Returns huggingface_hub's ``CommitInfo``."""
    check_variant(variant)
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise InvalidArgumentError(f"repo_id must be a Hub repo name such as 'owner/xar-b', got {repo_id!r}")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xar-push-") as tmp:
        save_model_folder(tmp, transformer, num_inference_steps, guidance_scale, vae, variant=variant,
                          repo_id=repo.repo_id)
        what = "xAR model" if variant is None else f"xAR model ({variant} variant)"
        return api.upload_folder(repo_id=repo.repo_id, folder_path=tmp,
                                 commit_message=commit_message or f"Upload {what} with xar_infer")


def convert_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, *, vae: str | os.PathLike | None = None,
                       variant: str | None = None, overwrite: bool = False) -> Path:
    """Write the model folder of ``source`` (a released ``.pth``, a preset, or anything
    ``XARPipeline.from_pretrained`` loads) into ``out_dir``, with the VAE at ``vae`` (or the one saved
    with the source) and the sampling defaults. The checkpoint is fully validated first (it is loaded
    into a model). ``xar-convert`` is its command line.

    Example::

        convert_checkpoint("xAR-B.pth", "xar-b-hub", vae="kl16.ckpt", variant="bf16")
    """
    check_variant(variant)
    loaded = load_pretrained(source)
    vae_path = vae if vae is not None else loaded.vae_path
    decoder = load_vae(vae_path) if vae_path is not None else None
    save_model_folder(out_dir, loaded.model, loaded.num_inference_steps, loaded.guidance_scale, decoder,
                      variant=variant, overwrite=overwrite)
    return Path(out_dir)
