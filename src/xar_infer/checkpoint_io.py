"""Reading and writing weight files safely: `.safetensors`, and anything else (`.pth`, `.ckpt`, ...)
through `torch.load(weights_only=True)`, never full unpickling."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, first_line


def read_state_dict(path: str | os.PathLike, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from ``path`` onto the CPU.

    ``nested_key`` selects a sub-dict of a pickled checkpoint (``"model"`` for MAR's ``kl16.ckpt``);
    a file without that key is read as flat. Whatever the bytes, the result is a dict of tensors that
    the file itself stores, or a :class:`CheckpointError` naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); download or copy it again")
    if path.suffix == ".safetensors":
        try:
            obj = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error_summary(exc)}); re-download it") from None
    else:
        _refuse_compressed_records(path)
        try:
            with warnings.catch_warnings():
                # torch warns about pickle protocols it half supports; the outcome is tensors or our error.
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(_refusal(path, str(exc))) from None
        except Exception as exc:  # torch.load raises many types on garbage bytes (EOFError, KeyError, RuntimeError, ...)
            raise CheckpointError(f"{path} is corrupted or truncated ({error_summary(exc)}); re-download it") from None
    if nested_key is not None and isinstance(obj, dict) and isinstance(obj.get(nested_key), dict):
        obj = obj[nested_key]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} is not a flat state dict of named tensors")
    _refuse_views_beyond_storage(obj, path)
    return obj


def error_summary(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch and numpy append paragraphs of advice), or
    its type where the message is empty."""
    first = first_line(exc)
    return first[:first.index(". ") + 1] if ". " in first else first


def _refusal(path: Path, message: str) -> str:
    """Our words for torch's weights-only refusal: what the file asked for, never torch's advice to
    unpickle it fully."""
    wanted = re.search(r"GLOBAL (\S+)", message)
    if wanted:
        what = f"holds objects other than tensors (unpickling it would call {wanted.group(1)})"
    else:
        detail = message.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in message else ""
        detail = next((line.strip() for line in detail.splitlines() if line.strip()), "not a pickle of tensors")
        what = f"is corrupted or holds objects other than tensors ({detail[:1].lower() + detail[1:]})"
    return (f"{path} {what}; refusing to unpickle it: only plain state dicts of tensors load (re-save the "
            "weights with torch.save(model.state_dict(), ...) or as safetensors)")


def _refuse_compressed_records(path: Path) -> None:
    """torch.save stores zip records uncompressed; a deflated record could expand to ~1000x the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (a legacy torch pickle, or garbage): torch.load decides
    if packed:
        raise CheckpointError(f"{path} has compressed records ({packed[0]}, ...), which torch.save never writes; "
                              "refusing to expand them: re-save the weights with torch.save")


def _view(tensor: torch.Tensor) -> tuple:
    """What a tensor reads: its storage and where and how it looks into it."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype


def _refuse_views_beyond_storage(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """A pickle can describe tensors as views (stride 0, overlapping) far larger than the bytes behind
    them; building or casting them would allocate what the file never held. The same view under
    several names (the released files' shared RoPE tables) counts once."""
    stored = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state_dict.values()}
    views = {_view(t): t.numel() * t.element_size() for t in state_dict.values()}
    if sum(views.values()) > sum(stored.values()):
        raise CheckpointError(f"{path}: its tensors view {sum(views.values())} bytes but the file stores "
                              f"{sum(stored.values())}; only plain state dicts of tensors load")


# Indices in key names (``encoder_blocks.3.``) have at most this many digits: no model has a
# billion blocks, and int() of thousands of digits is refused.
MAX_INDEX_DIGITS = 9


def key_indices(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, int | None]:
    """The index right after ``prefix`` of every key under it (``prefix + "3.norm1.weight"`` -> 3);
    None where it is not written plainly (``01``, ``1e3``, non-ASCII digits) or is implausibly long."""
    found: dict[str, int | None] = {}
    for key in state_dict:
        if key.startswith(prefix):
            text = key[len(prefix):].split(".", 1)[0]
            plain = text.isascii() and text.isdigit() and len(text) <= MAX_INDEX_DIGITS and (text == "0" or text[0] != "0")
            found[key] = int(text) if plain else None
    return found


def leading_run(indices: Iterable[int | None]) -> int:
    """How many of 0, 1, 2, ... are among ``indices``, up to the first one missing."""
    present = set(indices)
    count = 0
    while count in present:
        count += 1
    return count


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise unless the SHA-256 digest of ``path`` is ``expected`` (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.strip().lower():
        raise CheckpointError(f"{path}: SHA-256 is {digest.hexdigest()}, expected {expected}; the file is corrupted or "
                              "not the one meant: delete it and download it again")


def write_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors (made contiguous, shared storage split) to a safetensors file, with ``metadata``
    in its header."""
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, str(path), metadata=metadata)


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
    seen: dict[tuple, str] = {}
    for key, value in sorted(state_dict.items()):
        if value.numel() and seen.setdefault(_view(value), key) != key:
            # Each name would get its own copy when cast or moved: refuse rather than multiply the file.
            raise CheckpointError(f"{source}: tensors {seen[_view(value)]} and {key} are the same data; "
                                  "weights of this model are not shared")
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
