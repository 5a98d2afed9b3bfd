"""An editing history: batches of edits applied one after another to one model.

The one loop for editing on top of earlier edits. `EditHistory.edit` computes a batch on the model
as the earlier batches left it and applies it; editors that must leave earlier edits alone
(AlphaEdit) read the keys those edits wrote (`preserved_keys`, carried by each EditDelta), so what
they preserve is part of the history and leaves it when a batch is reverted.

Bound to a folder, a history writes each batch as an edit file as it is applied (and removes it
when reverted), with a manifest naming the model and the order. A history opened on a folder
replays the saved batches onto the freshly loaded model (`replay`), which then has the same
weights and the same preserved keys as the one that wrote them: a sequence continued tomorrow, or a
run resumed after a kill, goes on exactly where it stopped.

A history folder is shared and long-lived, so it is guarded (manifest.py says how it is checked):
- one writer at a time: a batch is saved or removed only under the folder's lock (folder_lock.py),
  after checking that the manifest is still the one this history read. Two processes that both
  replayed batch N-1 can never both save batch N: the second is refused with a message, nothing of
  the first is lost. `EditHistory(..., lock=True)` takes the lock at once (the command line and the
  sequential runner do), so that the second writer is refused before it computes anything;
- the manifest names only files the code writes (batch_NNNNN.safetensors in the folder, in order)
  with each file's SHA-256, and every batch records its index: reordered, duplicated, swapped or
  altered batches are refused instead of replayed;
- a batch file the manifest does not name is the debris of a write interrupted between the batch
  file and the manifest: it is ignored, and said so (`ignored`, and a HistoryWarning).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..folder_lock import FolderLock
from ..models import LoadedModel
from .delta import EditDelta, EditStack, check_health, probe_logits
from .manifest import (LOCK_FILE, BatchEntry, HistoryError, HistoryWarning, Manifest, batch_entry, batch_file_name,
                       load_batch, read_manifest, stray_batch_files, write_manifest)
from .registry import edit

__all__ = ["EditHistory", "HistoryError", "HistoryWarning", "read_manifest", "remove_last_batches"]


class EditHistory:
    def __init__(self, lm: LoadedModel, folder: str | Path | None = None, *, lock: bool = False):
        """An empty history on `lm` (as it is now). With `folder`, batches already saved there are
        found (see `replay`) and every batch applied from now on is saved there. `lock=True` takes the
        folder's writer lock now (else at the first save or removal) and refuses a folder another
        process is writing."""
        self.lm = lm
        self.stack = EditStack(lm)
        self.folder = Path(folder) if folder is not None else None
        self._lock = FolderLock(self.folder, LOCK_FILE, "history folder") if self.folder is not None else None
        self._saved: list[BatchEntry] = []
        self.ignored: list[str] = []  # batch files the manifest does not name (debris of an interrupted write)
        if self.folder is not None:
            if lock:
                self._lock.acquire()
            try:
                self._open()
            except BaseException:
                self._lock.release()
                raise

    # ------------------------------------------------------------------ the batches
    @property
    def batches(self) -> list[EditDelta]:
        """The applied batches, oldest first."""
        return self.stack.applied

    def __len__(self) -> int:
        return len(self.stack.applied)

    @property
    def pending(self) -> int:
        """Saved batches not replayed yet (none without a folder)."""
        return len(self._saved) - len(self) if self.folder is not None else 0

    @property
    def saved_files(self) -> list[Path]:
        """The folder's batch files, oldest first (none without a folder)."""
        return [self.folder / entry.file for entry in self._saved] if self.folder is not None else []

    def apply(self, delta: EditDelta, *, check: Callable[[EditDelta], None] | None = None) -> None:
        """Apply one more batch (saved to the folder, if any). Refused while saved batches wait to be
        replayed (a new batch belongs after them), and when another process holds the folder or has
        changed it since this history read it. `check(delta)` runs on the model with the batch
        applied, before it is saved: if it raises, the batch is reverted and nothing is saved (a
        guard, evaluate.guard)."""
        if self.pending:
            raise HistoryError(f"{self.folder} holds {self.pending} saved batch(es) not replayed yet; replay them "
                               "before adding another")
        if self.folder is not None:
            self._check_writable()
        self.stack.apply(delta)
        if check is not None:
            try:
                check(delta)
            except BaseException:
                self.stack.revert()
                raise
        if self.folder is not None:
            index = len(self) - 1
            delta.info["history_index"] = index  # a batch file knows its place: a swapped file is refused
            try:
                path = delta.save(self.folder / batch_file_name(index))
                self._saved = self._write(self._saved + [batch_entry(path, index)])
            except BaseException:
                self.stack.revert()  # nothing half-done: the model and the folder agree
                raise

    def edit(self, requests, method: str = "rome", settings=None, *, cache_dir: Path | None = None,
             progress=None, check: Callable[[EditDelta], None] | None = None) -> tuple[EditDelta, list[dict]]:
        """Compute the edit for `requests` on the model as the earlier batches left it, apply it, and
        return it with its diagnostics (factedit.edit.edit), which the batch also keeps in its info
        with the time it took; a failure (or a `check` that refuses it, see apply) leaves the history
        as it was."""
        began = time.perf_counter()
        delta, diagnostics = edit(self.lm, requests, method, settings, cache_dir=cache_dir, progress=progress,
                                  history=self)
        delta.info.setdefault("diagnostics", diagnostics)
        delta.info["edit_seconds"] = time.perf_counter() - began
        self.apply(delta, check=check)
        return delta, diagnostics

    def replay(self, count: int | None = None) -> int:
        """Apply the next `count` saved batches (all by default) from the folder; returns how many.
        Each file is checked against the manifest (name, index, SHA-256) before it is applied, and
        the model must still give finite, non-uniform predictions afterwards; a batch that fails
        leaves the model as it was before this call."""
        todo = self.pending if count is None else min(count, self.pending)
        if not todo:
            return 0
        before = probe_logits(self.lm)
        applied = 0
        try:
            for entry in self._saved[len(self):len(self) + todo]:
                self.stack.apply(load_batch(self.folder, entry))
                applied += 1
            check_health(self.lm, before, f"the history {self.folder}")
        except BaseException:
            for _ in range(applied):
                self.stack.revert()
            raise
        return todo

    def revert(self) -> EditDelta:
        """Undo the last batch; its keys leave the preserved keys with it (and its file the folder)."""
        if self.pending:
            raise HistoryError("cannot revert while saved batches wait to be replayed")
        if not self.stack.applied:
            raise HistoryError("no batch to revert")
        if self.folder is not None:
            self._check_writable()
            entry = self._saved[-1]
            self._saved = self._write(self._saved[:-1])  # the manifest first: a kill in between leaves debris
            (self.folder / entry.file).unlink(missing_ok=True)
        return self.stack.revert()

    def release(self) -> None:
        """Restore the model's weights and let other processes write the folder; the folder keeps the
        saved batches (open it again to go on)."""
        self.stack.revert_all()
        if self._lock is not None:
            self._lock.release()

    def close(self) -> None:
        """The same as `release`."""
        self.release()

    def __enter__(self) -> "EditHistory":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ what later edits preserve
    def key_modules(self) -> set[str]:
        return {name for delta in self.batches for name in delta.keys}

    def preserved_keys(self, module_name: str) -> torch.Tensor | None:
        """(d_in, n) float64: the keys every applied batch wrote into `module_name`, oldest first."""
        keys = [delta.keys[module_name].double() for delta in self.batches if module_name in delta.keys]
        return torch.cat(keys, 1) if keys else None

    def key_moment(self, module_name: str, dim: int) -> torch.Tensor:
        """H = K_p K_p^T (dim x dim, float64, on the CPU) over the preserved keys; zeros without any.
        Recomputed from the keys, so that it never drifts from what is applied."""
        keys = self.preserved_keys(module_name)
        if keys is None:
            return torch.zeros(dim, dim, dtype=torch.float64)
        return keys @ keys.T

    # ------------------------------------------------------------------ the folder
    def _open(self) -> None:
        manifest = read_manifest(self.folder, missing_ok=True)
        if manifest is not None and manifest.model_fingerprint != self.lm.fingerprint:
            raise HistoryError(f"{self.folder} holds a history of edits made for model {manifest.model} "
                               f"(fingerprint {manifest.model_fingerprint}), not {self.lm.name} "
                               f"({self.lm.fingerprint}); refusing to continue it")
        self._saved = list(manifest.batches) if manifest is not None else []
        self.ignored = stray_batch_files(self.folder, self._saved)
        if self.ignored:
            warnings.warn(HistoryWarning(
                f"{self.folder}: ignoring {', '.join(self.ignored)}, not named in the manifest (left by a write "
                "that was interrupted before the manifest named it)"), stacklevel=3)

    def _check_writable(self) -> None:
        """Take the folder's lock and make sure the manifest is still the one this history read."""
        self._lock.acquire()
        on_disk = read_manifest(self.folder, missing_ok=True)
        if (on_disk.batches if on_disk is not None else []) != self._saved:
            count = len(on_disk.batches) if on_disk is not None else 0
            raise HistoryError(f"{self.folder} was changed by another process since this history read it (it "
                               f"now holds {count} batch(es), not {len(self._saved)}); open it again to go on "
                               "from what it holds now")

    def _write(self, batches: list[BatchEntry]) -> list[BatchEntry]:
        return write_manifest(self.folder, Manifest(self.lm.name, self.lm.fingerprint, batches)).batches

    @classmethod
    def load(cls, lm: LoadedModel, folder: str | Path, *, lock: bool = False) -> "EditHistory":
        """The history saved in `folder`, replayed onto `lm`; batches applied later are saved there too."""
        read_manifest(folder)  # refuses a folder that is not a history, before touching the model
        history = cls(lm, folder, lock=lock)
        try:
            history.replay()
        except BaseException:
            history.release()
            raise
        return history


def remove_last_batches(folder: str | Path, count: int) -> list[str]:
    """Drop the last `count` batches of the history saved in `folder` (the manifest first, then their
    files), under the folder's lock, without loading the model; returns the removed file names. A
    model that replays the folder afterwards has the weights it had before those batches."""
    with FolderLock(folder, LOCK_FILE, "history folder"):
        manifest = read_manifest(folder)
        batches = manifest.batches
        if not 1 <= count <= len(batches):
            raise HistoryError(f"{folder} holds {len(batches)} batch(es); cannot remove the last {count}")
        kept, removed = batches[:len(batches) - count], batches[len(batches) - count:]
        write_manifest(Path(folder), Manifest(manifest.model, manifest.model_fingerprint, kept))
        for entry in removed:  # after the manifest: a kill in between leaves debris, never a broken history
            (Path(folder) / entry.file).unlink(missing_ok=True)
    return [entry.file for entry in removed]
