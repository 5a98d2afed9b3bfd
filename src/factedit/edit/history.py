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
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..cache_files import write_atomic
from ..errors import FacteditError
from ..models import LoadedModel
from .delta import EditDelta, EditStack
from .registry import edit

MANIFEST = "history.json"


class HistoryError(FacteditError, ValueError):
    """A history folder that is malformed, belongs to another model, or is used out of order."""


class EditHistory:
    def __init__(self, lm: LoadedModel, folder: str | Path | None = None):
        """An empty history on `lm` (as it is now). With `folder`, batches already saved there are
        found (see `replay`) and every batch applied from now on is saved there."""
        self.lm = lm
        self.stack = EditStack(lm)
        self.folder = Path(folder) if folder is not None else None
        self._saved: list[str] = self._read_manifest() if self.folder is not None else []

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
        return [self.folder / name for name in self._saved] if self.folder is not None else []

    def apply(self, delta: EditDelta) -> None:
        """Apply one more batch (saved to the folder, if any). Refused while saved batches wait to be
        replayed: a new batch belongs after them."""
        if self.pending:
            raise HistoryError(f"{self.folder} holds {self.pending} saved batch(es) not replayed yet; replay them "
                               "before adding another")
        self.stack.apply(delta)
        if self.folder is not None:
            name = f"batch_{len(self) - 1:05d}.safetensors"
            try:
                delta.save(self.folder / name)
                self._write_manifest(self._saved + [name])
            except BaseException:
                self.stack.revert()  # nothing half-done: the model and the folder agree
                raise
            self._saved.append(name)

    def edit(self, requests, method: str = "rome", settings=None, *, cache_dir: Path | None = None,
             progress=None) -> tuple[EditDelta, list[dict]]:
        """Compute the edit for `requests` on the model as the earlier batches left it, apply it, and
        return it with its diagnostics (factedit.edit.edit), which the batch also keeps in its info
        with the time it took; a failure leaves the history as it was."""
        began = time.perf_counter()
        delta, diagnostics = edit(self.lm, requests, method, settings, cache_dir=cache_dir, progress=progress,
                                  history=self)
        delta.info.setdefault("diagnostics", diagnostics)
        delta.info["edit_seconds"] = time.perf_counter() - began
        self.apply(delta)
        return delta, diagnostics

    def replay(self, count: int | None = None) -> int:
        """Apply the next `count` saved batches (all by default) from the folder; returns how many."""
        todo = self.pending if count is None else min(count, self.pending)
        for name in self._saved[len(self):len(self) + todo]:
            self.stack.apply(EditDelta.load(self.folder / name))
        return todo

    def revert(self) -> EditDelta:
        """Undo the last batch; its keys leave the preserved keys with it (and its file the folder)."""
        if self.pending:
            raise HistoryError("cannot revert while saved batches wait to be replayed")
        removed = self.stack.revert()
        if self.folder is not None:
            name = self._saved.pop()
            self._write_manifest(self._saved)
            (self.folder / name).unlink(missing_ok=True)
        return removed

    def release(self) -> None:
        """Restore the model's weights; the folder keeps the saved batches (open it again to go on)."""
        self.stack.revert_all()

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
    def _read_manifest(self) -> list[str]:
        if not (self.folder / MANIFEST).exists():
            if self.folder.exists() and any(self.folder.glob("*.safetensors")):
                raise HistoryError(f"{self.folder} holds edit files but no {MANIFEST}; not a history folder")
            return []
        manifest = read_manifest(self.folder)
        if manifest.get("model_fingerprint") != self.lm.fingerprint:
            raise HistoryError(f"{self.folder} holds a history of edits made for model {manifest.get('model')} "
                               f"(fingerprint {manifest.get('model_fingerprint')}), not {self.lm.name} "
                               f"({self.lm.fingerprint}); refusing to continue it")
        return list(manifest["batches"])

    def _write_manifest(self, batches: list[str]) -> None:
        _write_manifest(self.folder, self.lm.name, self.lm.fingerprint, batches)

    @classmethod
    def load(cls, lm: LoadedModel, folder: str | Path) -> "EditHistory":
        """The history saved in `folder`, replayed onto `lm`; batches applied later are saved there too."""
        read_manifest(folder)  # refuses a folder that is not a history, before touching the model
        history = cls(lm, folder)
        history.replay()
        return history


def read_manifest(folder: str | Path) -> dict:
    """The manifest of the history in `folder` ({"model", "model_fingerprint", "batches": file names,
    oldest first}), checked to be one and to name only files that are there; no model needed."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise HistoryError(f"{folder} is not a history folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HistoryError(f"{path} is not a readable history manifest: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "factedit-history" \
            or not isinstance(manifest.get("batches"), list):
        raise HistoryError(f"{path} is not a factedit history manifest")
    missing = [name for name in manifest["batches"] if not (Path(folder) / name).is_file()]
    if missing:
        raise HistoryError(f"{folder}: the manifest names {len(missing)} batch file(s) that are missing "
                           f"(first: {missing[0]})")
    return manifest


def remove_last_batches(folder: str | Path, count: int) -> list[str]:
    """Drop the last `count` batches of the history saved in `folder` (the manifest first, then their
    files), without loading the model; returns the removed file names. A model that replays the
    folder afterwards has the weights it had before those batches."""
    manifest = read_manifest(folder)
    batches = manifest["batches"]
    if not 1 <= count <= len(batches):
        raise HistoryError(f"{folder} holds {len(batches)} batch(es); cannot remove the last {count}")
    kept, removed = batches[:len(batches) - count], batches[len(batches) - count:]
    _write_manifest(Path(folder), manifest.get("model"), manifest.get("model_fingerprint"), kept)
    for name in removed:  # after the manifest: a kill in between leaves stray files, never a broken history
        (Path(folder) / name).unlink(missing_ok=True)
    return removed


def _write_manifest(folder: Path, model: str, fingerprint: str, batches: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "factedit-history", "model": model, "model_fingerprint": fingerprint, "batches": batches}
    write_atomic(folder / MANIFEST, lambda partial: partial.write_text(json.dumps(manifest, indent=1)))
