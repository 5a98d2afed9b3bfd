"""Cache files written atomically and read tolerantly: a cache is only ever a shortcut, so a file
that cannot be read (truncated by a crash, written by another version, corrupted on disk) counts as
missing and is recomputed, instead of failing every run until someone deletes it by hand.

The same rule for the append-only JSON-lines logs of resumable runs (append_jsonl, read_jsonl): a
record lost to a kill is only work to do again. And output paths are checked before the work
(check_output_file, check_output_folder), not after it."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import FacteditWarning, InputError

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


def file_sha256(path: Path) -> str:
    """The file's SHA-256, all 64 hex digits, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """The file's SHA-256 (16 hex digits): an input file (a corpus, a dataset) is the same when its
    bytes are, whatever its path or modification time, so that a data folder copied or mounted again
    keeps its caches and resumable runs."""
    return file_sha256(path)[:16]


# ------------------------------------------------------------------------------ append-only JSON lines

class DamagedLines(FacteditWarning):
    """Lines of a JSON-lines log that could not be read (cut off by a kill, or damaged) were skipped:
    the work they recorded is done again."""


def append_jsonl(path: Path, record: Any) -> None:
    """Append `record` as one JSON line. A last line without its line break (the write a kill cut
    off) would swallow the new record into an unreadable line; it is dropped first (reported as
    DamagedLines), or, where it is a whole record after all, ended with the line break."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:  # appends go to the end whatever the read position
        start, tail = _unterminated_tail(f)
        prefix = b""
        if tail is not None:
            try:
                json.loads(tail)
                prefix = b"\n"
            except ValueError:
                f.truncate(start)
                warnings.warn(DamagedLines(f"{path}: dropped its last line, cut off at {len(tail)} bytes "
                                           f"(an interrupted write); its work is done again"), stacklevel=2)
        f.write(prefix + json.dumps(record).encode() + b"\n")  # one write: a kill leaves all or a cut-off line
        f.flush()
        os.fsync(f.fileno())


def _unterminated_tail(f) -> tuple[int, bytes | None]:
    """(offset, bytes) of the file's last line when it lacks its line break, else (size, None)."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return 0, None
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return size, None
    start = end = size
    while start > 0:  # back to the line break before the last line, a block at a time
        begin = max(0, start - (1 << 16))
        f.seek(begin)
        found = f.read(start - begin).rfind(b"\n")
        if found >= 0:
            start = begin + found + 1
            break
        start = begin
    f.seek(start)
    return start, f.read(end - start)


def read_jsonl(path: Path) -> list[Any]:
    """The records of a JSON-lines log, in order; none when the file is absent. Lines that are not
    JSON (a last line cut off by a kill, a damaged disk block) are skipped and reported together as
    one DamagedLines warning: the caller does their work again instead of failing every run."""
    path = Path(path)
    if not path.is_file():
        return []
    records, damaged = [], []
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
                damaged.append(number)
    if damaged:
        lines = ", ".join(map(str, damaged[:5])) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        warnings.warn(DamagedLines(f"{path}: skipped unreadable line(s) {lines} (cut off by an interrupted "
                                   "write, or damaged); their work is done again"), stacklevel=2)
    return records


# ------------------------------------------------------------------------------------- output paths

def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_output_file(path: Path, action: str = "write to") -> None:
    """Fail now, with the reason, where a file could not be written to `path` later (after a model
    loaded and the work ran). An existing path must be a regular file, not a folder, a device such as
    /dev/null, a FIFO or a symbolic link (writing replaces the path: the link, not what it points
    to); the file's folder, or the nearest existing folder above it where the rest will be created,
    must accept a new file. `action` begins the message: "cannot {action} {path}: ..."."""
    path = Path(path)
    try:
        mode = path.lstat().st_mode
    except OSError:  # absent, or below a file: the check of its folder says which
        mode = None
    if mode is not None:
        if not stat.S_ISREG(mode):
            extra = f" (to {os.readlink(path)}); give the path it points to" if stat.S_ISLNK(mode) else ""
            raise InputError(f"cannot {action} {path}: it is {_kind_of(mode)}{extra}; writing would replace it")
        if not os.access(path, os.W_OK):
            raise InputError(f"cannot {action} {path}: the file exists and is not writable")
    _check_can_create_in(_nearest_existing(path.parent), path, action)


def check_output_folder(path: Path, action: str = "write to") -> None:
    """Fail now, with the reason, where files could not be written into the folder `path` later: an
    existing path must be a folder (or a link to one) that accepts new files; a missing one is
    created under the nearest existing folder above it, which must accept new files."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            mode = path.lstat().st_mode
            kind = "a file" if stat.S_ISREG(mode) else _kind_of(mode)
            raise InputError(f"cannot {action} {path}: it is {kind}, not a folder")
        _check_can_create_in(path, path, action)
    else:
        _check_can_create_in(_nearest_existing(path.parent), path, action)


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_can_create_in(folder: Path, path: Path, action: str) -> None:
    """A real temporary file in `folder`: catches read-only mounts and permissions os.access misreads."""
    if not folder.is_dir():
        raise InputError(f"cannot {action} {path}: {folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InputError(f"cannot {action} {path}: cannot create files in {folder} ({err.strerror or err})") from None
