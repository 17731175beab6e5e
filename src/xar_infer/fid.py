"""Sample sets for FID: many images into one ``.npz``, written as they are made, resumable, shardable.

The set is built in a work directory beside the target (``samples.npz.parts/``): a manifest of the
settings, then one ``.npy`` shard per finished batch, each written to a temporary name and renamed,
so a shard either exists whole or not at all, whatever kills the process. Rerunning the same job
skips the images already on disk. When every image exists, the shards are streamed, in image order,
into the final ``.npz`` (``arr_0``: uint8 [N, H, W, C], the ADM evaluator's format), itself written
under a temporary name and renamed. Nothing holds the whole set in memory.

Image ``i`` is made from seed ``seed + i`` alone, so the result does not depend on how the work is
split: batches are fixed ranges of image indices, and under ``torchrun`` each process takes every
``world_size``-th batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .checkpoint_io import error_summary
from .errors import InvalidArgumentError

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = re.compile(r"^(\d{8})-(\d{8})\.npy$")
# Fixed zip timestamps: the same images always give the same file, byte for byte.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def fid_labels(num_images: int, num_classes: int) -> np.ndarray:
    """The released evaluation order: class 0 repeated ``ceil(num_images / num_classes)`` times, then
    class 1, ...; 50,000 images of 1000 classes give 50 per class."""
    per_class = -(-num_images // num_classes)
    return np.arange(num_classes, dtype=np.int64).repeat(per_class)[:num_images]


def read_labels_file(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """Class ids from a ``.npy`` array or a text file (whitespace or comma separated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    try:
        # mmap_mode: a header promising more data than the file holds fails here instead of being allocated.
        labels = np.load(path, allow_pickle=False, mmap_mode="r") if path.suffix == ".npy" else \
            np.array(path.read_text().replace(",", " ").split(), dtype=np.int64)
    except OverflowError:
        raise InvalidArgumentError(f"{path}: a class id is beyond the int64 range; ids must be in [0, {num_classes})") from None
    except (ValueError, EOFError) as exc:  # first sentence only: numpy goes on to suggest allow_pickle
        raise InvalidArgumentError(f"{path}: expected integer class ids, or the file is truncated ({error_summary(exc)})") from None
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidArgumentError(f"{path}: expected a non-empty list of integer class ids")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InvalidArgumentError(f"{path}: class ids must be in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


class SampleSet:
    """The shards of one job and their assembly into the final ``.npz``."""

    def __init__(self, npz_path: str | os.PathLike, settings: dict):
        self.path = Path(npz_path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.settings = dict(settings)
        self.num_images = int(settings["num_images"])

    def prepare(self, overwrite: bool = False) -> None:
        """Create the work directory, or check that an existing one belongs to the same job.

        Run by one process (rank 0) before the others look at the shards."""
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists; pass --overwrite to replace it")
        manifest = self.parts / MANIFEST_NAME
        if overwrite and self.parts.exists():
            shutil.rmtree(self.parts)
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            if saved != self.settings:
                changed = sorted(k for k in saved.keys() | self.settings.keys() if saved.get(k) != self.settings.get(k))
                raise InvalidArgumentError(f"{self.parts} holds a job with other settings ({', '.join(changed)}); rerun with "
                                 "the same options to resume it, or pass --overwrite to start over")
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        _write_atomically(manifest, lambda f: f.write(json.dumps(self.settings, indent=1, sort_keys=True).encode()))

    def finished(self) -> np.ndarray:
        """Boolean [num_images]: which images are in a complete shard."""
        done = np.zeros(self.num_images, dtype=bool)
        for start, end, _ in self._shards():
            done[start:end] = True
        return done

    def write(self, start: int, images: np.ndarray) -> None:
        """Store images ``start .. start + len(images) - 1`` (uint8 [n, H, W, C])."""
        name = f"{start:08d}-{start + len(images):08d}.npy"
        _write_atomically(self.parts / name, lambda f: np.save(f, np.ascontiguousarray(images, dtype=np.uint8)))

    def assemble(self) -> Path:
        """Stream the shards, in order, into the ``.npz``; then remove the work directory."""
        shards = self._shards()
        covered = np.zeros(self.num_images, dtype=np.int64)
        for start, end, _ in shards:
            covered[start:end] += 1
        if not (covered >= 1).all():
            raise RuntimeError(f"{self.parts}: images {np.flatnonzero(covered == 0)[:5].tolist()}... are missing")
        first = np.load(shards[0][2], mmap_mode="r")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.num_images, *first.shape[1:])}

        def write_npz(f) -> None:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                entry = zipfile.ZipInfo("arr_0.npy", date_time=ZIP_DATE)
                with archive.open(entry, "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(member, header)
                    position = 0
                    for start, end, path in shards:  # sorted by start; overlaps (a resumed, re-split job) skipped
                        if end <= position:
                            continue
                        member.write(np.load(path, mmap_mode="r")[position - start:].tobytes())
                        position = end

        _write_atomically(self.path, write_npz)
        shutil.rmtree(self.parts)
        return self.path

    def _shards(self) -> list[tuple[int, int, Path]]:
        if not self.parts.is_dir():
            return []
        found = [(int(m[1]), int(m[2]), self.parts / m[0]) for m in map(SHARD_PATTERN.match, os.listdir(self.parts)) if m]
        return sorted(found)


def _write_atomically(path: Path, write: Callable) -> None:
    """Write through a temporary file in the same directory, flushed to disk, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def pending_batches(done: np.ndarray, batch_size: int) -> list[range]:
    """The unfinished images in batches of consecutive indices, at most ``batch_size`` each, aligned to
    multiples of ``batch_size`` (so that every process computes the same list)."""
    batches = []
    for start in range(0, len(done), batch_size):
        todo = np.flatnonzero(~done[start:start + batch_size]) + start
        if len(todo):
            # Split at gaps so that each batch is a run of consecutive indices (one shard).
            for run in np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1):
                batches.append(range(int(run[0]), int(run[-1]) + 1))
    return batches


def labels_digest(labels: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()
