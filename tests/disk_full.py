"""A full disk, simulated at the write call: files opened for writing fail with ENOSPC part-way through a write.

    with disk_full(lambda path: path.name.startswith(".checkpoint.pt."), after=1) as full:
        ...  # the first matching file is written normally, the second fails mid-write

Every write path of the studio goes through `open` (Python's own, PIL's `builtins.open`, pathlib's `io.open`); the
wrapped file hides its descriptor so nothing writes around it (`sendfile`, PIL's direct encoder). `full.failed`
lists the paths whose write failed.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class _FullFile:
    """A file whose first write after the disk fills writes half its bytes, then raises ENOSPC (and so on after)."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: Any) -> int:
        half = len(data) // 2
        if half:
            self._file.write(data[:half])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class DiskFull:
    def __init__(self, match: Callable[[Path], bool], after: int) -> None:
        self.match, self.after, self.seen, self.failed = match, after, 0, []


@contextlib.contextmanager
def disk_full(match: Callable[[Path], bool] = lambda path: True, after: int = 0) -> Iterator[DiskFull]:
    """Writes to files for which `match(path)` holds fail once `after` such files have been opened for writing."""
    state = DiskFull(match, after)
    real_open = builtins.open

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if not isinstance(file, str | os.PathLike) or not any(c in mode for c in "wax"):
            return handle
        path = Path(file)
        if not state.match(path):
            return handle
        state.seen += 1
        if state.seen <= state.after:
            return handle
        state.failed.append(path)
        return _FullFile(handle)

    builtins.open = fake_open
    io.open = fake_open
    try:
        yield state
    finally:
        builtins.open = real_open
        io.open = real_open
