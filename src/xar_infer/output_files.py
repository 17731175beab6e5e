"""Writing files so that none is ever half-written or silently replaced.

Every file xar_infer writes (images, grids, latents, sample sets and their shards)
goes through :func:`write_file`: the bytes go to a new temporary file in the target's folder, are
flushed to disk, and only then is the file given its final name. Without ``overwrite`` that last step
is a hard link, which the operating system refuses when anything (a file, a folder, a symlink) holds
the name, so a file that appeared after our start-up checks is never replaced. With ``overwrite`` it
is a rename, which replaces a symlink itself instead of writing through it. A failure removes the
temporary file and names the target and the cause. A saved model's folder, several files that
belong together, goes through :func:`write_folder`, which stages them all before placing any.
"""

from __future__ import annotations

import errno
import filecmp
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

# Why a write failed, in words a user acts on.
_CAUSES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit, see ulimit -f, or the file system's)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# Hard links are not supported here: fall back to a rename after checking the name is free.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}


class WriteError(OSError):
    """Writing an output file failed; nothing was left under its name or a temporary one."""


def _os_error(cls: type[OSError], code: int, message: str) -> OSError:
    """An OSError whose text is ``message`` alone (not "[Errno N] ..."), with its ``errno`` kept."""
    error = cls(message)
    error.errno = code
    return error


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path``; ``is_temporary`` recognises it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def is_temporary(name: str, of: str) -> bool:
    """Whether ``name`` is a temporary file made for the target named ``of``."""
    return name.startswith(f".{of}.") and name.endswith(".tmp") and len(name) == len(of) + 18


def write_file(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, overwrite: bool = False,
               exists_hint: str = "") -> None:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temporary file, which then takes the name.

    Without ``overwrite`` an existing entry at ``path`` raises ``FileExistsError`` (at the moment of
    writing, not only when the run started); ``exists_hint`` is appended to its message. The new
    file's mode follows the umask, like any file a program creates.
    """
    def fill(tmp: Path) -> None:
        with open(os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    _write_through_temporary(Path(path), fill, overwrite, exists_hint)


def write_file_by_path(path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False,
                       exists_hint: str = "") -> None:
    """:func:`write_file` for writers that take a file name (e.g. safetensors' ``save_file``), which may
    replace the temporary file with one of their own: its mode is set back to what a new file gets here."""
    def fill(tmp: Path) -> None:
        mode = tmp.stat().st_mode & 0o777  # 0o666 less the umask, read without changing the process's umask
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    _write_through_temporary(Path(path), fill, overwrite, exists_hint)


def write_folder(folder: str | os.PathLike, files: Mapping[str, Callable[[Path], None]], *, overwrite: bool = False,
                 exists_hint: str = "") -> list[str]:
    """Write several files into ``folder`` (made if missing) as one save: ``files`` maps each name
    (``"vae/model.safetensors"`` makes the subfolder) to a writer that takes a path.

    Every file is first written whole into a hidden staging folder inside ``folder``. Then each is
    compared with what ``folder`` holds under its name: an identical file is kept as it is, and a
    different one raises ``FileExistsError`` unless ``overwrite``, before any file is moved, so a
    refused save changes nothing. Then the files take their names one by one, in the order given
    (each whole, as with :func:`write_file`). Returns the names that were written (not kept).
    """
    folder = Path(folder)
    staging = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging.", suffix=".tmp", dir=folder))
        for name, write in files.items():
            staged = staging / name
            staged.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            mode = staged.stat().st_mode & 0o777  # the umask's mode, as write_file_by_path keeps it
            write(staged)
            os.chmod(staged, mode)
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
        changed = []
        for name in files:
            target = folder / name
            if target.is_dir() and not target.is_symlink():
                raise _os_error(IsADirectoryError, errno.EISDIR, f"{target} is a directory; it cannot be replaced by a file")
            if not os.path.lexists(target):
                changed.append(name)
            elif target.is_symlink() or not filecmp.cmp(staging / name, target, shallow=False):
                if not overwrite:
                    raise _os_error(FileExistsError, errno.EEXIST, f"{target} already exists and differs from the "
                                    f"file this save writes" + (f"; {exists_hint}" if exists_hint else ""))
                changed.append(name)
        for name in changed:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            _publish(staging / name, folder / name, overwrite, exists_hint)
        return changed
    except (FileExistsError, IsADirectoryError):
        raise
    except OSError as exc:
        raise _os_error(WriteError, exc.errno, f"{describe_os_error(exc)} writing {folder}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _write_through_temporary(path: Path, fill: Callable[[Path], None], overwrite: bool, exists_hint: str) -> None:
    tmp = temporary_name(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        fill(tmp)
        _publish(tmp, path, overwrite, exists_hint)
    except (FileExistsError, IsADirectoryError):
        raise
    except OSError as exc:
        raise _os_error(WriteError, exc.errno, f"{describe_os_error(exc)} writing {path}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path, overwrite: bool, exists_hint: str) -> None:
    if overwrite:
        if path.is_dir() and not path.is_symlink():
            raise _os_error(IsADirectoryError, errno.EISDIR, f"{path} is a directory; it cannot be replaced by a file")
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _os_error(FileExistsError, errno.EEXIST, _exists(path, exists_hint)) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # No hard links on this file system (FAT, some network shares): a check, then a rename.
        if os.path.lexists(path):
            raise _os_error(FileExistsError, errno.EEXIST, _exists(path, exists_hint)) from None
        os.replace(tmp, path)


def _exists(path: Path, hint: str) -> str:
    return f"{path} already exists" + (f"; {hint}" if hint else "")


def describe_os_error(exc: OSError) -> str:
    """The cause of an OS error in a few words ("disk full")."""
    return _CAUSES.get(exc.errno) or exc.strerror or type(exc).__name__


def require_parent_folder(path: str | os.PathLike, option: str) -> None:
    """Refuse an output whose folder does not exist, rather than create folders at random depths."""
    parent = Path(path).absolute().parent
    if os.path.lexists(parent) and not parent.is_dir():
        raise _os_error(NotADirectoryError, errno.ENOTDIR, f"{option} {path}: {parent} is not a directory")
    if not parent.is_dir():
        raise _os_error(FileNotFoundError, errno.ENOENT, f"{option} {path}: folder {parent} does not exist; create it first")
