"""Atomic file writes: write a temporary file beside the target, flush it to disk, then rename over the target.

A reader sees either the old file or the whole new one, never a partial write, even if the process is killed.
A full disk (ENOSPC, or a quota: EDQUOT) while writing leaves the old file as it was and raises `DiskFull`, a
StudioError that names the file, the free space and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from studio.errors import DiskFull
from studio.sizes import human


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def free_space(path: str | os.PathLike[str]) -> int:
    """Free bytes on the disk that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def disk_full(target: Any, what: str | None = None, then: str = "run the command again") -> DiskFull:
    """The error for a write of `target` that ran out of space: `what` happened (default: it was not written), and
    what to do once space is freed."""
    target = Path(target)
    kept = "; the previous file is unchanged" if target.exists() else ""
    what = what or f"{target} was not written{kept}"
    return DiskFull(f"the disk is full ({human(free_space(target))} free): {what}; free some space and {then}",
                    path=target)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    tmp_path = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())  # a delayed allocation can report the full disk only here
        os.replace(tmp_path, target)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(target) from None
        raise
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def atomic_write(target: str | os.PathLike[str], writer: Callable[[Path], object]) -> Path:
    """Call `writer(tmp_path)` and atomically move the result to `target`."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically write `data` to `path`."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_text(path, text)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_path` (created if missing) for the duration of the block; the lock is
    released by the kernel if the process dies, so a killed writer never leaves the library locked."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
