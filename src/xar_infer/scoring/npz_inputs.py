"""Reading the ``.npz`` files of the ADM evaluation format: image sets and reference statistics.

An image set is ``arr_0``, uint8 [N, H, W, 3] (what ``xar-generate --npz`` writes, and ADM's reference
batches). A 50,000-image set at 256 px is 9.8 GB, so it is read in batches straight out of the zip
member: ``np.load(mmap_mode=...)`` cannot map an array inside a zip, and ``np.load`` without it reads
the whole array. A reference holds statistics (``mu`` [D], ``sigma`` [D, D]: the official
``fid_stats/adm_in256_stats.npz``), images, or both (ADM's ``VIRTUAL_imagenet256_labeled.npz``).

Every problem with a file raises :class:`InvalidArgumentError` naming the file and what is expected.
"""

from __future__ import annotations

import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from ..errors import InvalidArgumentError

IMAGES_MEMBER = "arr_0.npy"
STATISTICS_KEYS = ("mu", "sigma")
EXPECTED_IMAGES = "uint8 images [N, H, W, 3] in arr_0 (the ADM format that xar-generate --npz writes)"


@dataclass(frozen=True)
class ImageArray:
    """The images of an ``.npz``, read a batch at a time: never more than one batch in memory."""

    path: Path
    shape: tuple[int, int, int, int]

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive uint8 [B, H, W, 3] batches of at most ``batch_size`` images, in file order."""
        n, height, width, channels = self.shape
        per_image = height * width * channels
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(IMAGES_MEMBER) as member:
                _read_header(member)
                for start in range(0, n, batch_size):
                    count = min(batch_size, n - start)
                    data = member.read(count * per_image)  # torch wants a writable buffer, hence the bytearray below
                    if len(data) != count * per_image:
                        raise InvalidArgumentError(f"{self.path}: arr_0 ends after {start + len(data) // per_image} of "
                                                   f"its {n} images; the file is truncated")
                    yield np.frombuffer(bytearray(data), dtype=np.uint8).reshape(count, height, width, channels)
        except (zipfile.BadZipFile, EOFError) as exc:  # a damaged member (bad CRC, cut short) shows up while reading
            raise InvalidArgumentError(f"{self.path}: the file is damaged ({exc})") from None


@dataclass(frozen=True)
class Reference:
    """What a reference ``.npz`` holds: FID statistics, images, or both."""

    path: Path
    statistics: dict[str, np.ndarray] | None
    images: ImageArray | None


def open_images(path: str | os.PathLike, role: str) -> ImageArray:
    """The image set ``arr_0`` of ``path``; ``role`` names the file in errors (e.g. ``"SAMPLES"``)."""
    path = Path(path)
    with _open_zip(path, role) as archive:
        if IMAGES_MEMBER not in archive.namelist():
            raise InvalidArgumentError(f"{role} {path} has no arr_0; expected {EXPECTED_IMAGES}")
        with archive.open(IMAGES_MEMBER) as member:
            shape, fortran_order, dtype = _read_header(member, f"{role} {path}")
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran_order:
        layout = " (Fortran order)" if fortran_order else ""
        hint = ("; channels first? transpose to [N, H, W, 3]" if len(shape) == 4 and shape[1] == 3 and shape[3] != 3
                else "; images in [0, 1]? scale to 0-255 and round to uint8" if dtype.kind == "f" else "")
        raise InvalidArgumentError(f"{role} {path}: arr_0 is {dtype} {list(shape)}{layout}; expected "
                                   f"{EXPECTED_IMAGES}{hint}")
    if min(shape[1:3]) < 1:
        raise InvalidArgumentError(f"{role} {path}: arr_0 has empty images {list(shape)}; expected {EXPECTED_IMAGES}")
    return ImageArray(path, tuple(int(d) for d in shape))


def open_reference(path: str | os.PathLike) -> Reference:
    """A reference ``.npz``: ``mu`` and ``sigma``, and/or images in ``arr_0``."""
    path = Path(path)
    with _open_zip(path, "--ref") as archive:
        names = {name.removesuffix(".npy") for name in archive.namelist()}
    statistics = None
    present = [key for key in STATISTICS_KEYS if key in names]
    if present and len(present) != len(STATISTICS_KEYS):
        missing = next(key for key in STATISTICS_KEYS if key not in names)
        raise InvalidArgumentError(f"--ref {path} has {present[0]} but no {missing}; FID statistics need both mu [D] "
                                   "and sigma [D, D]")
    if present:
        try:
            with np.load(path, allow_pickle=False) as data:
                statistics = {key: np.asarray(data[key]) for key in STATISTICS_KEYS}
        except ValueError as exc:  # an object array, which would need unpickling
            raise InvalidArgumentError(f"--ref {path}: cannot read mu and sigma ({exc})") from None
        check_statistics(statistics, f"--ref {path}")
    images = open_images(path, "--ref") if "arr_0" in names else None
    if statistics is None and images is None:
        raise InvalidArgumentError(f"--ref {path} has neither FID statistics (mu, sigma) nor images (arr_0); pass the "
                                   "official fid_stats/adm_in256_stats.npz or ADM's VIRTUAL_imagenet256_labeled.npz")
    return Reference(path, statistics, images)


def check_statistics(statistics: dict[str, np.ndarray], source: str, dims: int | None = None) -> None:
    """Refuse statistics that cannot give a distance: wrong shapes, other dimensions, NaN or inf."""
    mu, sigma = statistics["mu"], statistics["sigma"]
    if mu.dtype.kind != "f" or sigma.dtype.kind != "f":
        raise InvalidArgumentError(f"{source}: mu and sigma must be floating point, got {mu.dtype} and {sigma.dtype}")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InvalidArgumentError(f"{source}: mu {list(mu.shape)} and sigma {list(sigma.shape)} do not match; "
                                   "expected mu [D] and sigma [D, D]")
    if dims is not None and mu.shape[0] != dims:
        raise InvalidArgumentError(f"{source}: statistics of {mu.shape[0]}-d features, but the Inception pool features "
                                   f"are {dims}-d; use statistics made with torch-fidelity's or ADM's InceptionV3")
    for key in STATISTICS_KEYS:
        if not np.isfinite(statistics[key]).all():
            raise InvalidArgumentError(f"{source}: {key} contains NaN or inf")


@contextmanager
def _open_zip(path: Path, role: str) -> Iterator[zipfile.ZipFile]:
    """``zipfile.ZipFile(path)``, with one-line errors for a missing or non-zip file."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise InvalidArgumentError(f"{role} {path} {what}; expected an .npz file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InvalidArgumentError(f"{role} {path} is not an .npz (zip) file; expected {EXPECTED_IMAGES} or "
                                   "FID statistics (mu, sigma)") from None
    with archive:
        yield archive


def _read_header(member: BinaryIO, source: str = "arr_0") -> tuple[tuple[int, ...], bool, np.dtype]:
    """The shape, order and dtype of the ``.npy`` at the start of ``member``, leaving it at the data."""
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(member)
        return np.lib.format.read_array_header_2_0(member)
    except ValueError as exc:
        raise InvalidArgumentError(f"{source}: arr_0 is not a readable .npy array ({exc})") from None
