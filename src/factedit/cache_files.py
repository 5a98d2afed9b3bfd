"""Cache files written atomically and read tolerantly: a cache is only ever a shortcut, so a file
that cannot be read (truncated by a crash, written by another version, corrupted on disk) counts as
missing and is recomputed, instead of failing every run until someone deletes it by hand."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def read_cached(path: Path, read: Callable[[Path], T]) -> T | None:
    """read(path), or None when the file is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return read(path)
    except Exception:  # noqa: BLE001 - any failure to read a cache means "not cached"
        return None


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """write(a temporary file beside `path`), then rename it to `path`: readers see the old file or
    the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def file_digest(path: Path) -> str:
    """The file's SHA-256 (16 hex digits): an input file (a corpus, a dataset) is the same when its
    bytes are, whatever its path or modification time, so that a data folder copied or mounted again
    keeps its caches and resumable runs."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
