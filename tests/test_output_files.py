"""output_files.write_file and write_folder: whole or nothing, never replacing without being asked, never
through a symlink, modes from the umask, and failures that name the file and the cause."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xar_infer.output_files import (WriteError, is_temporary, require_parent_folder, temporary_name, write_file,
                                    write_file_by_path, write_folder)


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def test_a_file_appears_whole_with_the_mode_the_umask_gives(tmp_path):
    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        target = tmp_path / f"m{mask:o}.bin"
        with umask(mask):
            write_file(target, lambda f: f.write(b"payload"))
        assert target.read_bytes() == b"payload"
        assert target.stat().st_mode & 0o777 == mode
    assert all(not name.endswith(".tmp") for name in _listing(tmp_path))


def test_files_written_by_name_also_follow_the_umask(tmp_path):
    """safetensors' save_file makes its own 0600 temporary file and renames it over ours."""
    target = tmp_path / "t.safetensors"
    with umask(0o022):
        write_file_by_path(target, lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)))
    assert target.stat().st_mode & 0o777 == 0o644
    assert _listing(tmp_path) == ["t.safetensors"]


@pytest.mark.parametrize("kind", ["file", "folder", "symlink", "dangling symlink"])
def test_nothing_in_the_way_is_replaced_without_overwrite(tmp_path, kind):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    target = tmp_path / "out.png"
    if kind == "file":
        target.write_bytes(b"precious")
    elif kind == "folder":
        target.mkdir()
    elif kind == "symlink":
        target.symlink_to(outside)
    else:
        target.symlink_to(tmp_path / "nowhere")
    before = _listing(tmp_path)
    with pytest.raises(FileExistsError, match=r"^.*out\.png already exists; pass --overwrite$"):
        write_file(target, lambda f: f.write(b"new"), exists_hint="pass --overwrite")
    assert _listing(tmp_path) == before and outside.read_bytes() == b"precious"
    if kind == "file":
        assert target.read_bytes() == b"precious"


def test_overwrite_replaces_a_symlink_itself_and_never_a_folder(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    target = tmp_path / "out.png"
    target.symlink_to(outside)
    write_file(target, lambda f: f.write(b"new"), overwrite=True)
    assert not target.is_symlink() and target.read_bytes() == b"new" and outside.read_bytes() == b"precious"
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        write_file(tmp_path / "folder", lambda f: f.write(b"new"), overwrite=True)
    assert _listing(tmp_path) == ["folder", "out.png", "outside.txt"]


def test_a_failed_write_leaves_nothing_and_names_the_file_and_the_cause(tmp_path):
    def disk_full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "00004_7.png"
    with pytest.raises(WriteError, match=rf"^disk full writing {target}$") as raised:
        write_file(target, disk_full)
    assert raised.value.errno == errno.ENOSPC
    assert _listing(tmp_path) == []

    def bug(f):
        raise ZeroDivisionError("a bug in the writer")

    with pytest.raises(ZeroDivisionError):  # not an OS error: not dressed up as one
        write_file(target, bug)
    assert _listing(tmp_path) == []


FILE_SIZE_LIMIT = """
import resource, sys
from xar_infer.output_files import write_file
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    write_file(sys.argv[1], lambda f: f.write(bytes(5000)))
except OSError as exc:
    print(exc)
"""


def test_a_file_size_limit_is_named_and_leaves_nothing(tmp_path):
    """EFBIG from a real limit (ulimit -f), in a process of its own."""
    target = tmp_path / "big.png"
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(target)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"file too large (a file-size limit, see ulimit -f, or the file system's) writing {target}"
    assert _listing(tmp_path) == []


def test_without_hard_links_a_free_name_is_checked_then_renamed(tmp_path, monkeypatch):
    """Some file systems (FAT, network shares) refuse hard links: the write still happens, and an
    existing file is still refused."""
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "a.png"
    write_file(target, lambda f: f.write(b"one"))
    assert target.read_bytes() == b"one"
    with pytest.raises(FileExistsError):
        write_file(target, lambda f: f.write(b"two"))
    assert target.read_bytes() == b"one" and _listing(tmp_path) == ["a.png"]


def test_temporary_names_are_recognised():
    name = temporary_name(Path("out/s.npz")).name
    assert name.startswith(".s.npz.") and is_temporary(name, "s.npz")
    assert not is_temporary(name, "t.npz") and not is_temporary(".s.npz.x.tmp", "s.npz")


def test_a_missing_or_misplaced_parent_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^--grid .*g\.png: folder .*missing does not exist; create it first$"):
        require_parent_folder(tmp_path / "missing" / "g.png", "--grid")
    (tmp_path / "a_file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"a_file is not a directory$"):
        require_parent_folder(tmp_path / "a_file" / "g.png", "--grid")
    require_parent_folder(tmp_path / "g.png", "--grid")
    assert _listing(tmp_path) == ["a_file"]


def _bytes(data: bytes):
    return lambda path: path.write_bytes(data)


def test_a_folder_is_staged_then_placed_with_umask_modes(tmp_path):
    folder = tmp_path / "model"
    with umask(0o027):
        written = write_folder(folder, {"w.safetensors": lambda p: save_file({"x": torch.ones(2)}, str(p)),
                                        "vae/w.safetensors": _bytes(b"vae"), "config.json": _bytes(b"{}")})
    assert written == ["w.safetensors", "vae/w.safetensors", "config.json"]
    assert _listing(folder) == ["config.json", "vae", "w.safetensors"] and _listing(folder / "vae") == ["w.safetensors"]
    assert {p.stat().st_mode & 0o777 for p in folder.rglob("*") if p.is_file()} == {0o640}


def test_identical_files_are_kept_and_a_different_save_is_refused_before_any_move(tmp_path):
    folder = tmp_path / "model"
    write_folder(folder, {"a.bin": _bytes(b"a"), "config.json": _bytes(b"one")})
    inode = (folder / "a.bin").stat().st_ino
    assert write_folder(folder, {"a.bin": _bytes(b"a"), "b.bin": _bytes(b"b")}) == ["b.bin"]
    assert (folder / "a.bin").stat().st_ino == inode  # kept, not rewritten
    with pytest.raises(FileExistsError, match=r"config.json already exists and differs from the file this save "
                                              r"writes; pass overwrite=True$"):
        write_folder(folder, {"c.bin": _bytes(b"c"), "config.json": _bytes(b"two")}, exists_hint="pass overwrite=True")
    assert _listing(folder) == ["a.bin", "b.bin", "config.json"]  # c.bin, though new, was not placed
    assert (folder / "config.json").read_bytes() == b"one"
    assert write_folder(folder, {"c.bin": _bytes(b"c"), "config.json": _bytes(b"two")}, overwrite=True) == [
        "c.bin", "config.json"]
    assert (folder / "config.json").read_bytes() == b"two"


def test_a_symlink_or_folder_in_the_way_is_not_taken_for_an_identical_file(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside").write_bytes(b"same")
    (folder / "link.bin").symlink_to(tmp_path / "outside")
    with pytest.raises(FileExistsError, match="link.bin already exists and differs"):
        write_folder(folder, {"link.bin": _bytes(b"same")})
    (folder / "sub").mkdir()
    with pytest.raises(IsADirectoryError, match="sub is a directory"):
        write_folder(folder, {"sub": _bytes(b"x")}, overwrite=True)
    write_folder(folder, {"link.bin": _bytes(b"same")}, overwrite=True)
    assert not (folder / "link.bin").is_symlink() and (tmp_path / "outside").read_bytes() == b"same"


def test_a_failed_folder_write_places_nothing_and_leaves_no_staging(tmp_path):
    def disk_full(path):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    folder = tmp_path / "model"
    with pytest.raises(WriteError, match=rf"^disk full writing {folder}$"):
        write_folder(folder, {"a.bin": _bytes(b"a"), "b.bin": disk_full})
    assert _listing(folder) == []
