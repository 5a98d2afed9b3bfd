"""The manifest of a history folder (history.py): which batch files, in which order, with which bytes.

history.json names the model and, oldest first, each batch as {"file", "index", "sha256"}. It is
checked whenever it is read, because a history folder is meant to be shared: a manifest names only
files the code itself writes (batch_NNNNN.safetensors, in the folder, the N-th at position N), so
that replaying or reverting a folder never reads or deletes anything else ("../x", "/etc/x", a
symlink); each batch file must have the SHA-256 the manifest recorded, and records its own index, so
that reordered, duplicated, swapped or altered batches are refused instead of replayed. Manifests
written before the hashes (version 1: a list of file names) are read with the same name rules and
gain hashes when next written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..cache_files import file_sha256, write_atomic
from ..errors import FacteditError, FacteditWarning, json_type
from .delta import EditDelta

MANIFEST = "history.json"
LOCK_FILE = "history.lock"
FORMAT = "factedit-history"
VERSION = 2  # 1: "batches" is a list of file names; 2: a list of {"file", "index", "sha256"}
STRAY_BATCH = re.compile(r"batch_[0-9]{5,}\.safetensors")
SHA256 = re.compile(r"[0-9a-f]{64}")


class HistoryError(FacteditError, ValueError):
    """A history folder that is malformed, belongs to another model, or is used out of order."""


class HistoryWarning(FacteditWarning):
    """Something in a history folder was ignored (an unnamed batch file left by an interrupted write)."""


@dataclass(frozen=True)
class BatchEntry:
    file: str  # always batch_file_name(index)
    index: int
    sha256: str | None  # None only when read from a version-1 manifest


@dataclass(frozen=True)
class Manifest:
    model: str
    model_fingerprint: str
    batches: list[BatchEntry] = field(default_factory=list)


def batch_file_name(index: int) -> str:
    return f"batch_{index:05d}.safetensors"


def batch_entry(path: Path, index: int) -> BatchEntry:
    """The manifest entry of the batch file just written at `path`."""
    return BatchEntry(Path(path).name, index, file_sha256(path))


def read_manifest(folder: str | Path, *, missing_ok: bool = False) -> Manifest | None:
    """The manifest of the history in `folder`, checked (see the module docstring); no model needed.
    Without a manifest: None with `missing_ok` (a new history; refused if the folder holds other edit
    files), else a HistoryError."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if not missing_ok:
            raise HistoryError(f"{folder} is not a history folder (no {MANIFEST})")
        if folder.exists() and not folder.is_dir():
            raise HistoryError(f"{folder} is not a folder")
        others = [p.name for p in folder.glob("*.safetensors")] if folder.is_dir() else []
        if [name for name in others if not STRAY_BATCH.fullmatch(name)]:
            raise HistoryError(f"{folder} holds edit files but no {MANIFEST}; not a history folder")
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise HistoryError(f"{path} is not a readable history manifest: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise HistoryError(f"{path} is not a factedit history manifest")
    version = data.get("version", 1)
    if version not in (1, 2) or isinstance(version, bool):
        raise HistoryError(f"{path}: manifest version {version!r} is not supported; this factedit reads versions "
                           f"1 and {VERSION}")
    for key in ("model", "model_fingerprint"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise HistoryError(f"{path}: {key!r} must be a non-empty string, not {json_type(data.get(key))}")
    if not isinstance(data.get("batches"), list):
        raise HistoryError(f"{path}: 'batches' must be a list, not {json_type(data.get('batches'))}")
    batches = [_entry(item, position, version, path) for position, item in enumerate(data["batches"])]
    for entry in batches:
        batch = folder / entry.file
        if batch.is_symlink() or not batch.is_file():
            what = "a symbolic link" if batch.is_symlink() else "missing" if not batch.exists() else "not a file"
            raise HistoryError(f"{folder}: the manifest names {entry.file}, which is {what}")
    return Manifest(data["model"], data["model_fingerprint"], batches)


def _entry(item, position: int, version: int, path: Path) -> BatchEntry:
    """One manifest entry, checked: the code's own file name for its position, and (version 2) that
    position as its index and a SHA-256."""
    where = f"{path}: batches[{position}]"
    if version == 1:
        name, index, digest = item, position, None
    else:
        if not isinstance(item, dict) or set(item) != {"file", "index", "sha256"}:
            raise HistoryError(f"{where} must be an object with the fields file, index and sha256, not "
                               f"{json_type(item) if not isinstance(item, dict) else 'one with ' + repr(sorted(item))}")
        name, index, digest = item["file"], item["index"], item["sha256"]
        if not isinstance(index, int) or isinstance(index, bool) or index != position:
            raise HistoryError(f"{where} has index {index!r}; the batches must be listed in order, each once "
                               f"(expected {position})")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise HistoryError(f"{where}: 'sha256' must be 64 lowercase hexadecimal digits")
    if not isinstance(name, str):
        raise HistoryError(f"{where}: the file name must be a string, not {json_type(name)}")
    if name != batch_file_name(position):
        raise HistoryError(f"{where} names {name!r}, but batch {position} of a history is the file "
                           f"{batch_file_name(position)!r} in its folder; refusing the manifest (reordered, "
                           "duplicated or outside the folder)")
    return BatchEntry(name, index, digest)


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Write `manifest` atomically (entries of a version-1 manifest gain their hashes); returns it as
    written."""
    batches = [entry if entry.sha256 else batch_entry(Path(folder) / entry.file, entry.index)
               for entry in manifest.batches]
    written = Manifest(manifest.model, manifest.model_fingerprint, batches)
    data = {"format": FORMAT, "version": VERSION, "model": written.model,
            "model_fingerprint": written.model_fingerprint,
            "batches": [{"file": e.file, "index": e.index, "sha256": e.sha256} for e in batches]}
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(folder) / MANIFEST, lambda partial: partial.write_text(json.dumps(data, indent=1)))
    return written


def load_batch(folder: Path, entry: BatchEntry) -> EditDelta:
    """The batch `entry` names, refused unless its bytes have the recorded SHA-256 and it records the
    same index (when it records one)."""
    path = Path(folder) / entry.file
    if path.is_symlink() or not path.is_file():
        raise HistoryError(f"{folder}: {entry.file} is missing or not a regular file")
    if entry.sha256 is not None and file_sha256(path) != entry.sha256:
        raise HistoryError(f"{folder}: {entry.file} is not the file the manifest recorded (its SHA-256 differs: "
                           "altered, swapped or replaced); refusing to replay the history")
    delta = EditDelta.load(path)
    recorded = delta.info.get("history_index")
    if recorded is not None and recorded != entry.index:
        raise HistoryError(f"{folder}: {entry.file} was saved as batch {recorded} of a history, not batch "
                           f"{entry.index}; refusing to replay it out of order")
    return delta


def stray_batch_files(folder: Path, batches: list[BatchEntry]) -> list[str]:
    """Batch files in `folder` that the manifest does not name: what a kill between writing a batch
    and writing the manifest leaves. Ignored (the next batch of that number replaces it)."""
    if not Path(folder).is_dir():
        return []
    named = {entry.file for entry in batches}
    return sorted(p.name for p in Path(folder).iterdir() if STRAY_BATCH.fullmatch(p.name) and p.name not in named)
