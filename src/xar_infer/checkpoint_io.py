"""Reading and writing weight files safely: `.safetensors`, and anything else (`.pth`, `.ckpt`, ...)
through `torch.load(weights_only=True)`, never full unpickling."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError


def read_state_dict(path: str | os.PathLike, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from ``path`` onto the CPU.

    ``nested_key`` selects a sub-dict of a pickled checkpoint (``"model"`` for MAR's ``kl16.ckpt``);
    a file without that key is read as flat.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-download it") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds objects other than tensors, or is corrupted; refusing to unpickle it "
            f"(only plain state dicts load). Details: {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:  # torch.load raises many types on garbage bytes (IndexError, KeyError, ...)
        raise CheckpointError(f"{path} is corrupted or truncated ({str(exc).splitlines()[0]}); re-download it") from exc
    if nested_key is not None and isinstance(obj, dict) and isinstance(obj.get(nested_key), dict):
        obj = obj[nested_key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a flat state dict of tensors")
    return obj


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise unless the SHA-256 digest of ``path`` is ``expected`` (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.strip().lower():
        raise CheckpointError(f"{path}: SHA-256 is {digest.hexdigest()}, expected {expected}; the file is corrupted or "
                              "not the one meant: delete it and download it again")


def write_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write tensors (made contiguous, shared storage split) to a safetensors file."""
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, str(path))


def _list_keys(keys: list[str], limit: int = 8) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, *,
                device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
    """Load ``state_dict`` into ``module`` (usually built on the meta device) with every key and shape
    checked first; the error names the offending tensors.

    Tensors are moved to ``device`` and, when floating point, cast to ``dtype``.
    """
    expected = module.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    if missing:
        raise CheckpointError(f"{source}: missing tensors {_list_keys(missing)}; the file is incomplete or of another model")
    unexpected = sorted(state_dict.keys() - expected.keys())
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {_list_keys(unexpected)}; the file is of another model or architecture")
    bad = [f"{k} (expected {tuple(expected[k].shape)}, got {tuple(v.shape)})"
           for k, v in sorted(state_dict.items()) if v.shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{source}: wrongly shaped tensors {_list_keys(bad)}; the file does not match this configuration")
    module.load_state_dict(
        {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
         for k, v in state_dict.items()},
        assign=True,
    )


def state_dict_sha256(module: torch.nn.Module) -> str:
    """A digest of a module's weights (names, dtypes, shapes and values), whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{str(tensor.dtype).removeprefix('torch.')}:{list(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
