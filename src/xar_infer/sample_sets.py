"""Sample sets for FID: many images in one ``.npz``, written as they are made, resumable, split over processes.

A set is built in a work folder beside the target (``samples.npz.parts/``) that one job holds
exclusively (a lock the operating system releases when the process dies, so a killed run never blocks
the next). The folder holds a manifest of everything that decides the images (the weights' digests,
the labels, the seed, every sampling setting) and one ``.npy`` shard per finished batch. A shard's
name carries a keyed digest of its bytes: a corrupt, truncated, retyped or foreign shard (one from a
job with other settings) fails the check, is named, and its images are made again; it is never
assembled. When every image exists the shards are streamed, in image order, into the ``.npz``
(``arr_0``: uint8 [N, H, W, C], the ADM evaluator's format), which appears under its name only when
complete; then the work folder is removed. Nothing holds the whole set in memory.

Image ``i`` is made from seed ``seed + i`` alone, so the result does not depend on how the work is
split: batches are fixed ranges of image indices, and under ``torchrun`` each process takes every
``world_size``-th batch while process 0 owns the work folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
import torch

from .checkpoint_io import error_summary
from .errors import InvalidArgumentError, ResourceError, SampleSetError
from .memory import format_bytes
from .output_files import is_temporary, require_parent_folder, write_file

MANIFEST_NAME = "manifest.json"
ASSEMBLED_NAME = "assembled.json"  # the digest of the .npz about to be published (finish_interrupted_cleanup)
LOCK_NAME = "lock"
SHARD_PATTERN = re.compile(r"^(\d{8})-(\d{8})\.([0-9a-f]{32})\.npy$")
FORMAT = 2
# Fixed zip timestamps: the same images always give the same file, byte for byte.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
READ_CHUNK = 1 << 24


def fid_labels(num_images: int, num_classes: int) -> np.ndarray:
    """The released evaluation order: class 0 repeated ``ceil(num_images / num_classes)`` times, then
    class 1, ...; 50,000 images of 1000 classes give 50 per class."""
    per_class = -(-num_images // num_classes)
    return np.arange(num_classes, dtype=np.int64).repeat(per_class)[:num_images]


def fid_labels_spread(num_images: int, num_classes: int) -> str | None:
    """How :func:`fid_labels` spreads a count that the classes do not divide (None when they do)."""
    if num_images % num_classes == 0:
        return None
    per_class = -(-num_images // num_classes)
    full, rest = divmod(num_images, per_class)
    parts = [_classes_get(0, full - 1, str(per_class))]
    if rest:
        parts.append(_classes_get(full, full, str(rest)))
    empty = full + (1 if rest else 0)
    if empty < num_classes:
        parts.append(_classes_get(empty, num_classes - 1, "none"))
    return (f"{num_images} images over {num_classes} classes: {', '.join(parts)} (the released order fills each class "
            f"in turn); a multiple of {num_classes} gives every class the same count")


def _classes_get(first: int, last: int, amount: str) -> str:
    if first == last:
        return f"class {first} gets {amount}"
    return f"classes {first}-{last} get {amount}" + (" each" if amount != "none" else "")


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


def labels_digest(labels: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()


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


@dataclass(frozen=True)
class Shard:
    start: int
    end: int
    path: Path


class WorkFolder:
    """The work folder of one sample set (``samples.npz.parts`` beside ``samples.npz``).

    A job claims it (:func:`claim`), opens it with everything that decides its images (:meth:`open`),
    writes shards, and assembles the ``.npz``. The digest of the job keys every shard's digest, so a
    shard proves both its bytes and the job it belongs to.
    """

    def __init__(self, npz_path: str | os.PathLike):
        self.path = Path(npz_path)
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.manifest: dict[str, Any] = {}
        self.key = b""
        self.num_images = 0
        self.image_shape: tuple[int, ...] = ()
        self.shards: list[Shard] = []

    # ---- opening: lock, leftovers, manifest, shards --------------------------------------------------

    def check_target(self, overwrite: bool) -> None:
        """What can be checked before the model is loaded: the name, its folder, an existing result.
        An existing result with a work folder beside it is left to :meth:`lock`, which first finishes
        the cleanup of a run killed just after publishing it."""
        path, parts = self.path, self.parts
        if path.suffix != ".npz":
            raise InvalidArgumentError(f"--npz must name a .npz file, got {path}")
        require_parent_folder(path, "--npz")
        if not os.path.lexists(parts):
            self._refuse_an_existing_result(overwrite)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory; it cannot be replaced by a sample set")
        if parts.is_symlink():
            raise SampleSetError(f"{parts} is a symlink; the work folder must be a real folder beside {path.name}: "
                                 "remove the link")
        if os.path.lexists(parts) and not parts.is_dir():
            raise SampleSetError(f"{parts} exists and is not a folder; remove it")

    def lock(self, overwrite: bool) -> "FolderLock":
        """Take the work folder (creating it), or refuse because another run holds it. Removes what a
        killed run left: temporary files, and a work folder whose result was already published."""
        self.check_target(overwrite)
        self.finish_interrupted_cleanup()
        self._refuse_an_existing_result(overwrite)
        lock = FolderLock.acquire(self.parts)
        try:
            self._remove_temporaries()
            if overwrite:
                self._clear()
        except BaseException:
            lock.release()
            raise
        return lock

    def _refuse_an_existing_result(self, overwrite: bool) -> None:
        if os.path.lexists(self.path) and not overwrite:
            raise FileExistsError(f"{self.path} already exists; pass --overwrite to make the sample set again")

    def finish_interrupted_cleanup(self) -> None:
        """A run killed after publishing the ``.npz`` but before removing its work folder leaves both;
        the folder is removed when its recorded digest shows the ``.npz`` is that run's whole result."""
        record = self.parts / ASSEMBLED_NAME
        if not (self.path.is_file() and self.parts.is_dir() and not self.parts.is_symlink()):
            return
        names = set(os.listdir(self.parts))
        if record.name in names:
            try:
                recorded = json.loads(record.read_text())["sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                return
            if recorded != images_sha256(self.path):
                return
        elif names - {LOCK_NAME} - {n for n in names if n.endswith(".tmp")}:
            return  # a real work folder (shards or a manifest): not ours to remove
        lock = FolderLock.acquire(self.parts)
        try:
            self._remove_temporaries()
            self._remove_folder()
        finally:
            lock.release()

    def _remove_temporaries(self) -> None:
        """The temporary files of the ``.npz`` that killed runs left beside it (call with the lock held)."""
        for entry in os.scandir(self.path.parent):
            if is_temporary(entry.name, self.path.name):
                os.unlink(entry.path)

    def open(self, job: dict[str, Any], image_shape: Sequence[int]) -> np.ndarray:
        """Check the manifest against ``job`` (everything that decides the images, ``num_images``
        included; images are (H, W, C) = ``image_shape``) and every shard against its digest; returns
        which images are done. Call with the folder claimed."""
        self.set_job(job, image_shape)
        return self.rescan()

    def set_job(self, job: dict[str, Any], image_shape: Sequence[int]) -> None:
        """The job whose shards this process writes (processes other than 0 skip :meth:`open`)."""
        self.manifest = {**job, "format": FORMAT, "image_shape": [int(n) for n in image_shape]}
        self.num_images = int(job["num_images"])
        self.image_shape = tuple(self.manifest["image_shape"])
        self.key = hashlib.sha256(json.dumps(self.manifest, sort_keys=True, separators=(",", ":")).encode()).digest()

    def rescan(self) -> np.ndarray:
        """Find and check the shards again (after other processes wrote theirs)."""
        self.shards = []
        stray, candidates = [], []
        for entry in sorted(os.scandir(self.parts), key=lambda e: e.name):
            if entry.name in (LOCK_NAME, MANIFEST_NAME, ASSEMBLED_NAME):
                continue
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                os.unlink(entry.path)  # a killed writer's leftover; no writer of this job runs yet
            elif SHARD_PATTERN.match(entry.name) and entry.is_file(follow_symlinks=False):
                candidates.append(Path(entry.path))
            else:
                stray.append(entry)
        # Any .npy may hold another job's images (an earlier version's shards, say): protect them too.
        self._check_manifest(has_shards=bool(candidates) or any(e.name.endswith(".npy") for e in stray))
        for entry in stray:
            warnings.warn(f"removing {entry.path}: not a shard of this sample set", stacklevel=2)
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
        for path in candidates:
            problem = self.verify(path)
            if problem is None:
                start, end = (int(g) for g in SHARD_PATTERN.match(path.name).groups()[:2])
                self.shards.append(Shard(start, end, path))
            else:
                warnings.warn(f"{path} {problem}; its images will be made again", stacklevel=2)
                path.unlink()
        self.check_space()
        return self.finished()

    def check_space(self) -> None:
        """Refuse a set that cannot fit on its disk: the missing shards and the ``.npz``, which exist side
        by side until the end."""
        image_bytes = int(np.prod(self.image_shape))
        needed = (int((~self.finished()).sum()) + self.num_images) * image_bytes
        free = shutil.disk_usage(self.parts).free
        if needed > free:
            raise ResourceError(f"{self.path}: the sample set needs about {format_bytes(needed)} of disk (its shards and "
                                f"the .npz), but {self.parts.parent} has {format_bytes(free)} free; free some space or "
                                "choose another folder")

    def _check_manifest(self, has_shards: bool) -> None:
        manifest = self.parts / MANIFEST_NAME
        saved = None
        if manifest.exists():
            try:
                saved = json.loads(manifest.read_text())
            except (OSError, ValueError):
                saved = None
        if saved == self.manifest:
            return
        if has_shards:
            if saved is None:
                raise SampleSetError(f"{self.parts} holds shards but no readable {MANIFEST_NAME}, so nothing says which "
                                     "job made them; pass --overwrite to start over, or delete the folder")
            changed = sorted(k for k in saved.keys() | self.manifest.keys() if saved.get(k) != self.manifest.get(k))
            raise SampleSetError(f"{self.parts} holds images of a job with other settings ({', '.join(changed)}); rerun "
                                 "with the same options and weights to resume it, or pass --overwrite to start over")
        # No image exists yet: nothing to protect, so a corrected command simply takes the folder over.
        write_file(manifest, lambda f: f.write(json.dumps(self.manifest, indent=1, sort_keys=True).encode()),
                   overwrite=True)

    # ---- shards -------------------------------------------------------------------------------------

    def shard_digest(self, data: bytes | memoryview) -> str:
        return hashlib.blake2b(data, key=self.key, digest_size=16).hexdigest()

    def verify(self, path: Path) -> str | None:
        """None if ``path`` is a whole shard of this job, else what is wrong with it."""
        start, end, digest = SHARD_PATTERN.match(path.name).groups()
        start, end = int(start), int(end)
        if not 0 <= start < end <= self.num_images:
            return f"covers images {start}-{end}, outside this set of {self.num_images}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if self.shard_digest(data) != digest:
            return "does not match its digest (corrupt, truncated, or made by another job)"
        return None

    def write(self, start: int, images: np.ndarray) -> None:
        """Store images ``start .. start + len(images) - 1`` (uint8 [n, H, W, C]) as one shard."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.shape[1:] != self.image_shape:
            raise ValueError(f"images of shape {images.shape[1:]} for a set of {self.image_shape}")
        header = _npy_header(images.shape)
        digest = hashlib.blake2b(key=self.key, digest_size=16)
        digest.update(header)
        digest.update(memoryview(images).cast("B"))
        name = f"{start:08d}-{start + len(images):08d}.{digest.hexdigest()}.npy"

        def fill(f: BinaryIO) -> None:
            f.write(header)
            f.write(memoryview(images).cast("B"))

        write_file(self.parts / name, fill, overwrite=True)  # the same name holds the same bytes
        self.shards.append(Shard(start, start + len(images), self.parts / name))

    def finished(self) -> np.ndarray:
        """Boolean [num_images]: which images are in a verified shard."""
        done = np.zeros(self.num_images, dtype=bool)
        for shard in self.shards:
            done[shard.start:shard.end] = True
        return done

    # ---- the result ---------------------------------------------------------------------------------

    def assemble(self, overwrite: bool) -> list[range]:
        """Stream the shards, checking each against its digest, into the ``.npz`` and publish it.

        Returns the image ranges of shards that failed the check (they are removed and nothing is
        published): make those images again and call again. Returns ``[]`` once the file exists."""
        shards = sorted(self.shards, key=lambda s: (s.start, -s.end))
        done = self.finished()
        if not done.all():
            missing = np.flatnonzero(~done)
            raise SampleSetError(f"{self.parts}: {len(missing)} images are missing (first {missing[:5].tolist()}); "
                                 "rerun the same command to make them")
        bad: list[Shard] = []
        content = hashlib.sha256()  # of the images' bytes, recorded to recognise the result later
        row = int(np.prod(self.image_shape))

        def write_npz(f: BinaryIO) -> None:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                entry = zipfile.ZipInfo("arr_0.npy", date_time=ZIP_DATE)
                with archive.open(entry, "w", force_zip64=True) as member:
                    member.write(_npy_header((self.num_images, *self.image_shape)))
                    position = 0
                    for shard in shards:  # sorted by start; overlaps (a resumed, re-split job) skipped
                        if shard.end <= position:
                            continue
                        data = shard.path.read_bytes()
                        if self.shard_digest(data) != SHARD_PATTERN.match(shard.path.name)[3]:
                            bad.append(shard)
                            raise _ShardChanged
                        offset = len(_npy_header((shard.end - shard.start, *self.image_shape)))
                        images = memoryview(data)[offset + (position - shard.start) * row:]
                        content.update(images)
                        member.write(images)
                        position = shard.end
            # Complete: record what it holds before it takes its name (see finish_interrupted_cleanup).
            self._record(content.hexdigest())

        try:
            write_file(self.path, write_npz, overwrite=overwrite, exists_hint="pass --overwrite to replace it")
        except _ShardChanged:
            for shard in bad:
                warnings.warn(f"{shard.path} changed after it was checked; its images will be made again", stacklevel=2)
                shard.path.unlink(missing_ok=True)
                self.shards.remove(shard)
            return [range(s.start, s.end) for s in bad]
        self._remove_folder()
        return []

    def _record(self, digest: str) -> None:
        write_file(self.parts / ASSEMBLED_NAME, lambda f: f.write(json.dumps({"sha256": digest}).encode()),
                   overwrite=True)

    def release_after_failure(self) -> None:
        """After a failed run: a work folder that holds no image yet is removed, so that nothing it
        recorded (a manifest of the failed settings) stands in the way of the corrected command."""
        if self.parts.is_dir() and not any(SHARD_PATTERN.match(n) for n in os.listdir(self.parts)):
            self._remove_folder()

    def _clear(self) -> None:
        for entry in os.scandir(self.parts):
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)

    def _remove_folder(self) -> None:
        # Shards first, then the manifest, the record of the result, the lock: a run killed half way
        # through leaves a folder that the next run still recognises (finish_interrupted_cleanup).
        last = {MANIFEST_NAME: 1, ASSEMBLED_NAME: 2, LOCK_NAME: 3}
        for name in sorted(os.listdir(self.parts), key=lambda n: (last.get(n, 0), n)):
            path = self.parts / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        try:
            self.parts.rmdir()
        except OSError:  # another run has just taken the name for a new job of its own
            pass


class _ShardChanged(Exception):
    pass


def _npy_header(shape: Sequence[int]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered uint8 array of ``shape``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def images_sha256(npz_path: Path) -> str | None:
    """The digest of the image bytes of ``arr_0`` in a sample set's ``.npz`` (None if it has none)."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(npz_path) as archive, archive.open("arr_0.npy") as member:
            if np.lib.format.read_magic(member) == (1, 0):
                np.lib.format.read_array_header_1_0(member)
            else:
                np.lib.format.read_array_header_2_0(member)
            for chunk in iter(lambda: member.read(READ_CHUNK), b""):
                digest.update(chunk)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return digest.hexdigest()


class FolderLock:
    """An exclusive lock on a work folder: ``flock`` on a file inside it, which the operating system
    releases when the process ends, however it ends."""

    def __init__(self, fd: int, folder: Path):
        self.fd, self.folder = fd, folder

    @classmethod
    def acquire(cls, folder: Path) -> "FolderLock":
        try:
            import fcntl
        except ImportError:
            raise SampleSetError("sample sets need POSIX file locks (Linux or macOS); on Windows use WSL") from None
        for _ in range(10):  # another run may remove the folder between our steps; then start again
            try:
                folder.mkdir(exist_ok=True)
                if folder.is_symlink() or not folder.is_dir():
                    raise SampleSetError(f"{folder} is not a real folder; remove it")
                fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SampleSetError(f"another run is writing this sample set (it holds {folder}); wait for it to "
                                     "finish, or choose another --npz") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(folder / LOCK_NAME, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                return cls(fd, folder)
            os.close(fd)  # we locked a file that a finishing run had already removed
        raise SampleSetError(f"could not take {folder}: it keeps disappearing; is another run removing it?")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------------------------------
# Processes (torchrun) and the whole job
# --------------------------------------------------------------------------------------------------

@dataclass
class ProcessGroup:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one), and the device it uses."""

    rank: int
    world_size: int
    device: torch.device

    def on_rank0(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on rank 0 and give its result, or its error, to every process."""
        outcome: list[Any] = [None]
        if self.rank == 0:
            try:
                outcome = [("ok", action())]
            except (OSError, SampleSetError, InvalidArgumentError) as exc:
                if self.world_size == 1:
                    raise
                outcome = [("error", str(exc))]
        if self.world_size > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(outcome, src=0)
        status, value = outcome[0]
        if status == "error":
            raise SampleSetError(value)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


@contextmanager
def process_group(device: torch.device) -> Iterator[ProcessGroup]:
    """Join the ``torchrun`` job this process belongs to, if any (NCCL on GPUs, one per process; gloo
    on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield ProcessGroup(0, 1, device)
        return
    import torch.distributed as dist

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield ProcessGroup(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


@contextmanager
def claim(npz_path: str | os.PathLike, overwrite: bool, group: ProcessGroup) -> Iterator[WorkFolder]:
    """Hold the work folder of ``npz_path`` for one job (process 0 takes the lock for all). A second
    run refuses at once. If the job fails before its first image, the folder is removed, so that
    nothing it recorded stands in the way of the corrected command."""
    folder = WorkFolder(npz_path)
    locks: list[FolderLock] = []  # rank 0's
    group.on_rank0(lambda: locks.append(folder.lock(overwrite)))
    succeeded = False
    try:
        yield folder
        succeeded = True
    finally:
        for lock in locks:
            if not succeeded and folder.parts.is_dir():
                folder.release_after_failure()
            lock.release()


@dataclass(frozen=True)
class SampleSetJob:
    """What to write: ``labels[i]`` with seed ``seed + i`` for every image ``i``, in batches of
    ``batch_size``; ``make_images(labels, generators)`` returns uint8 [n, H, W, C] with
    ``image_shape`` (H, W, C); ``identity`` is everything else that decides the images (the weights'
    digests, the sampling settings)."""

    labels: np.ndarray
    seed: int
    batch_size: int
    image_shape: tuple[int, ...]
    identity: dict[str, Any]
    make_images: Callable[[list[int], list[torch.Generator]], np.ndarray]

    def manifest(self) -> dict[str, Any]:
        return {**self.identity, "num_images": len(self.labels), "labels_sha256": labels_digest(self.labels),
                "seed": self.seed}


def write_sample_set(folder: WorkFolder, job: SampleSetJob, group: ProcessGroup, *, overwrite: bool,
                     report: Callable[[str], None] = lambda message: None,
                     progress: Callable[[int, int], None] = lambda number, total: None) -> None:
    """Make every missing image of ``job`` in the claimed ``folder`` and assemble the ``.npz``."""
    done = group.on_rank0(lambda: folder.open(job.manifest(), job.image_shape))
    if group.rank == 0 and done.any():
        report(f"resuming {folder.path}: {int(done.sum())} of {len(done)} images already done")
    if group.rank != 0:
        folder.set_job(job.manifest(), job.image_shape)
    _make(job, folder, pending_batches(done, job.batch_size)[group.rank::group.world_size], progress)
    group.barrier()
    if group.rank != 0:
        return
    folder.rescan()  # every process's shards, checked
    for _ in range(3):
        bad = folder.assemble(overwrite)
        if not bad:
            return
        _make(job, folder, [range(start, min(start + job.batch_size, r.stop))
                            for r in bad for start in range(r.start, r.stop, job.batch_size)], progress)
    raise SampleSetError(f"shards in {folder.parts} keep changing after they are written; is another program "
                         "writing there?")


def _make(job: SampleSetJob, folder: WorkFolder, batches: list[range], progress: Callable[[int, int], None]) -> None:
    for number, batch in enumerate(batches, 1):
        progress(number, len(batches))
        generators = [torch.Generator().manual_seed(job.seed + i) for i in batch]
        folder.write(batch.start, job.make_images(job.labels[batch.start:batch.stop].tolist(), generators))
