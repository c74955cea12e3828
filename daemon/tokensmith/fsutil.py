"""Atomic, crash-safe file replacement, shared by the file sink and the state directory."""

from __future__ import annotations

import errno
import os
from pathlib import Path

TEMP_PREFIX = ".tokensmith-"
TEMP_SUFFIX = ".tmp"

def atomic_write(path: str | os.PathLike, data: bytes, *, mode: int = 0o600, gid: int | None = None,
                 sync_dir: bool = True) -> os.stat_result:
    """Replace `path` with `data` so a reader sees the old file or the new one, never a part.

    The temp file is created with its final mode (never briefly wider), in the same directory so
    the rename is atomic, fsynced before the rename and the directory fsynced after it. A symlink
    at `path` is replaced, never written through.

    sync_dir=False skips the directory fsync: the file's content is still durable before the
    rename, so after a crash the path holds the old complete file or the new complete one; only
    *which* one is left open (for writes where either is correct, see StateStore.save).

    Returns the new file's stat (inode, size, mtime), which tells a later reader whether it changed.
    """
    # plain strings, not pathlib: this runs three times per refresh, thousands of times a minute
    directory, name = os.path.split(os.fspath(path))
    directory = directory or "."
    temp = os.path.join(directory, f"{TEMP_PREFIX}{name}.{os.urandom(4).hex()}{TEMP_SUFFIX}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)  # the umask may have narrowed it; it can never have widened it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            written = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        fsync_dir(directory)
    return written


def make_dirs(path: str | os.PathLike, mode: int = 0o700, parent_mode: int = 0o755) -> bool:
    """Create `path` with `mode` and its missing parents with `parent_mode`, whatever the umask
    (under umask 000 os.makedirs would leave them 0777). Existing directories are left as they
    are. True when `path` itself was created."""
    path = os.fspath(path).rstrip("/") or "/"
    if os.path.isdir(path):
        return False
    parent = os.path.dirname(path)
    if parent and parent != path:
        make_dirs(parent, parent_mode, parent_mode)
    try:
        os.mkdir(path, mode & 0o700)  # never wider than the owner's bits until the chmod below
    except FileExistsError:
        if os.path.isdir(path):
            return False
        # a file where a directory belongs: say so, not "File exists" about a path the user never named
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path) from None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


def fsync_dir(directory: str | os.PathLike) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def holds(path: str | os.PathLike, data: bytes) -> bool:
    """True when the regular file at `path` (not a symlink) has exactly `data`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.read(fd, len(data) + 1) == data
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path, targets: set[str] | None = None) -> int:
    """Delete the temp files a crash left behind in one directory: those of the given target file
    names, or all of ours. One listing per directory; returns how many were removed. Call it only
    when nothing else can be writing there (at daemon start-up)."""
    removed = 0
    try:
        entries = [entry.name for entry in os.scandir(directory)]
    except OSError:
        return 0
    for name in entries:
        if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
            continue
        target = name[len(TEMP_PREFIX):-len(TEMP_SUFFIX)].rpartition(".")[0]  # <target>.<random hex>
        if targets is None or target in targets:
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except OSError:
                pass
    return removed
