"""Durable file writes: one rule for every file echonode and train keep.

The rule, everywhere: write to a temporary file in the destination's own
folder (``<name>.<random>.part``), flush and fsync it, give it its final
mode, rename it over the destination (atomic within one file system), then
fsync the folder so that the rename itself survives a power cut. After a
crash at any point the destination holds either its old content or the whole
new content, never a mix; a write that fails (a full disk, an exception in
the caller's writer) removes its temporary file, so a half-written file never
holds disk space until the next start. Leftover ``*.part`` files from a kill
are the only debris, and the store's start-up sweep removes them.

``durable=False`` keeps the atomic rename but skips both fsyncs: for caches
that can be rebuilt (a crash may then lose the last write, never corrupt it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FILE_MODE",
    "PART_SUFFIX",
    "fsync_dir",
    "fsync_file",
    "move_into_place",
    "publish_folder",
    "replace_symlink",
    "replacing",
    "write_bytes",
    "write_json",
    "write_text",
    "write_with",
]

#: Files the node writes hold patient data: owner-only by default.
FILE_MODE = 0o600
#: Suffix of every temporary file this module makes (swept at start-up).
PART_SUFFIX = ".part"


def fsync_file(path: Path | str) -> None:
    """Flush ``path``'s content to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    """Make a creation, rename or removal in the folder ``path`` durable.

    Some file systems refuse to fsync a folder (EINVAL); their renames are
    then as durable as they can be made, which is not an error.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _part_path(dest: Path) -> Path:
    # Unique per writer, so that two processes writing one file never share
    # a temporary file; in the destination's folder, so the rename is atomic.
    return dest.with_name(f"{dest.name}.{secrets.token_hex(4)}{PART_SUFFIX}")


@contextlib.contextmanager
def replacing(path: Path | str, *, mode: int = FILE_MODE, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that becomes ``path`` on a clean exit.

    For writers that want a file name (``np.save``, ``torch.save``,
    ``Dataset.save_as``).

    Parameters
    ----------
    path : Path or str
        The destination; its folder must exist.
    mode : int
        Permission bits the file gets before it is renamed into place.
    durable : bool
        False skips the fsyncs (the rename stays atomic).

    Yields
    ------
    Path
        Where to write. An exception inside the block removes it and leaves
        ``path`` untouched.
    """
    dest = Path(path)
    tmp = _part_path(dest)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(dest.parent)


def write_with(
    path: Path | str, writer: Callable[[IO[bytes]], Any], *, mode: int = FILE_MODE, durable: bool = True
) -> None:
    """Write ``path`` through ``writer(handle)`` (an open binary file) under the durable rule."""
    with replacing(path, mode=mode, durable=durable) as tmp, open(tmp, "wb") as handle:
        writer(handle)


def write_bytes(path: Path | str, data: bytes, *, mode: int = FILE_MODE, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` under the durable rule."""
    write_with(path, lambda handle: handle.write(data), mode=mode, durable=durable)


def write_text(path: Path | str, text: str, *, mode: int = FILE_MODE, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` (UTF-8) under the durable rule."""
    write_bytes(path, text.encode("utf-8"), mode=mode, durable=durable)


def write_json(path: Path | str, obj: object, *, mode: int = FILE_MODE, durable: bool = True) -> None:
    """Replace ``path`` with ``obj`` as indented, key-sorted JSON and a final newline."""
    write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n", mode=mode, durable=durable)


def move_into_place(src: Path | str, dest: Path | str, *, mode: int = FILE_MODE) -> None:
    """Move a finished file ``src`` to ``dest`` under the durable rule.

    ``src`` may be on another file system (a TMPDIR outside the storage
    folder): it is then copied beside ``dest`` first, so the final step is
    still one rename (and ``src`` stays where it was, its owner's to remove).
    """
    src, dest = Path(src), Path(dest)
    fsync_file(src)
    os.chmod(src, mode)
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with replacing(dest, mode=mode) as tmp:
            shutil.copyfile(src, tmp)
    fsync_dir(dest.parent)


def publish_folder(staging: Path | str, target: Path | str) -> None:
    """Make the finished folder ``staging`` become ``target`` under the durable rule.

    Every file in ``staging`` (recursively) and every folder is fsynced, then
    the folder is renamed into place; an existing ``target`` is renamed
    aside first and removed afterwards, so that a reader sees the old or the
    new folder whole, never a mix. ``staging`` must be a sibling of
    ``target`` (one file system).
    """
    staging, target = Path(staging), Path(target)
    for folder, _dirs, files in os.walk(staging):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        retired.rmdir()
        os.rename(target, retired)
        os.rename(staging, target)
        fsync_dir(target.parent)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, target)
        fsync_dir(target.parent)


def replace_symlink(link: Path | str, target: Path | str) -> None:
    """Point the symbolic link ``link`` at ``target`` in one atomic, durable step."""
    link = Path(link)
    tmp = _part_path(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
