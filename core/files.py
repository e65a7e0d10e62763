"""Atomic file writes: a reader (another process, or a resume after kill -9) sees the old
file or the new one, never half of one. And the bound of a cache folder (``evict_lru``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(
    path: str | Path, write: Callable[[IO[bytes]], None], *, fsync: bool = True
) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it over ``path``.

    ``fsync`` makes the content durable before the rename (what a checkpoint needs); the
    temporary file is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """``atomic_write`` of a UTF-8 string."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), fsync=fsync)


def append_durably(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` and fsync it, and a new file's folder too: when this
    returns, the lines survive a crash (spools whose lines are the only copy of points)."""
    path = Path(path)
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict_lru(
    folder: str | Path, pattern: str, max_bytes: int, *, keep: Path | None = None
) -> list[Path]:
    """Delete the least recently used files matching ``pattern`` in ``folder`` until those
    left total at most ``max_bytes``; the deleted paths. ``keep`` (just written) stays.

    "Used" is the modification time: readers of a cached file ``touch`` it (atime is not
    kept reliably, e.g. relatime). A file another process is reading survives its unlink
    on POSIX; one that vanished meanwhile is skipped.
    """
    files = []
    for path in Path(folder).glob(pattern):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        files.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in files)
    evicted: list[Path] = []
    for _, size, path in sorted(files, key=lambda f: f[0]):
        if total <= max_bytes:
            break
        if keep is not None and path == Path(keep):
            continue
        path.unlink(missing_ok=True)
        total -= size
        evicted.append(path)
    return evicted


def touch(path: str | Path) -> None:
    """Mark a cached file as just used (for ``evict_lru``); a vanished file is ignored."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)
