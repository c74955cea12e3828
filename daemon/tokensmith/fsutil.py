"""Atomic, crash-safe file replacement, shared by the file sink and the state directory."""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

TEMP_PREFIX = ".tokensmith-"
TEMP_SUFFIX = ".tmp"

# directory -> ((inode, mtime_ns), names of temp files in it): every sink's start-up check used to
# glob its whole directory, O(clients^2) at start-up (~12 s at 5,000 token files in one directory)
_temps_cache: dict[str, tuple[tuple[int, int], list[str]]] = {}
_temps_lock = threading.Lock()


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600, gid: int | None = None,
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
    directory = path.parent
    temp = directory / f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(4)}.tmp"
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


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_names(directory: Path) -> list[str]:
    """The temp-file names in a directory, listed again only when the directory has changed since.
    (A temp file created after the listing is in flight, not stale, and must not be removed anyway.)"""
    key = os.fspath(directory)
    st = os.stat(key)
    signature = (st.st_ino, st.st_mtime_ns)
    with _temps_lock:
        cached = _temps_cache.get(key)
    if cached is not None and cached[0] == signature:
        return cached[1]
    with os.scandir(key) as entries:
        names = [entry.name for entry in entries
                 if entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX)]
    with _temps_lock:
        _temps_cache[key] = (signature, names)
    return names


def remove_stale_temps(directory: Path, name: str | None = None) -> int:
    """Delete temp files a crash left behind (for one target name, or all); returns how many.
    Matches what the glob `TEMP_PREFIX + name + ".*.tmp"` (or `TEMP_PREFIX + "*.tmp"`) matches."""
    directory = Path(directory)
    prefix = f"{TEMP_PREFIX}{name}." if name else TEMP_PREFIX
    shortest = len(prefix) + len(TEMP_SUFFIX)
    try:
        names = _temp_names(directory)
    except OSError:
        return 0
    removed = 0
    for temp in names:
        if temp.startswith(prefix) and temp.endswith(TEMP_SUFFIX) and len(temp) >= shortest:
            try:
                (directory / temp).unlink()
                removed += 1
            except OSError:
                pass
    return removed
