"""Edits as artifacts: weight changes that can be applied, reverted bit-exactly, composed and shared.

An EditDelta holds, per weight matrix, either low-rank factors (Delta W = up @ down, as ROME's
rank-one update and MEMIT's batched update are) or a dense change (fine-tuning). Weights are
always described in nn.Linear orientation (d_out x d_in); GPT-2's transposed Conv1D is handled
when applying. Files are .safetensors (no pickle) with JSON metadata naming the method, settings,
requests and the fingerprint of the model the edit was made for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..arch import linear_dims
from ..models import LoadedModel

FORMAT_VERSION = 1


class EditFileError(ValueError):
    """An edit file that is malformed or made for another model."""


@dataclass
class EditDelta:
    method: str
    model_fingerprint: str
    changes: dict[str, dict[str, torch.Tensor]]  # module name -> {"up", "down"} or {"dense"}
    settings: dict = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def weight_change(self, module_name: str) -> torch.Tensor:
        """Delta W in (d_out, d_in) orientation, float32."""
        change = self.changes[module_name]
        if "dense" in change:
            return change["dense"].float()
        return change["up"].float() @ change["down"].float()

    def compose(self, other: "EditDelta") -> "EditDelta":
        """One delta doing both: factors are concatenated (ranks add), dense changes summed."""
        if other.model_fingerprint != self.model_fingerprint:
            raise EditFileError("cannot compose edits made for different models")
        changes = {name: dict(change) for name, change in self.changes.items()}
        for name, change in other.changes.items():
            mine = changes.get(name)
            if mine is None:
                changes[name] = dict(change)
            elif "dense" in mine or "dense" in change:
                changes[name] = {"dense": self.weight_change(name) + other.weight_change(name)}
            else:
                changes[name] = {"up": torch.cat([mine["up"], change["up"]], 1),
                                 "down": torch.cat([mine["down"], change["down"]], 0)}
        method = self.method if self.method == other.method else f"{self.method}+{other.method}"
        return EditDelta(method, self.model_fingerprint, changes, self.settings, self.requests + other.requests,
                         {"composed": True})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {f"{name}::{part}": t.detach().contiguous().cpu() for name, change in self.changes.items()
                   for part, t in change.items()}
        metadata = {"format": "factedit-edit", "version": str(FORMAT_VERSION), "method": self.method,
                    "model_fingerprint": self.model_fingerprint, "settings": json.dumps(self.settings),
                    "requests": json.dumps(self.requests), "info": json.dumps(self.info)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EditDelta":
        path = Path(path)
        if not path.is_file():
            raise EditFileError(f"edit file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as err:  # safetensors raises several error types for a bad header
            raise EditFileError(f"{path} is not a valid .safetensors edit file: {err}") from err
        if metadata.get("format") != "factedit-edit":
            raise EditFileError(f"{path} is a safetensors file but not a factedit edit (no 'format' metadata)")
        changes: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            name, _, part = key.rpartition("::")
            if part not in ("up", "down", "dense") or not name:
                raise EditFileError(f"{path}: unexpected tensor {key!r}")
            changes.setdefault(name, {})[part] = tensor
        for name, change in changes.items():
            if set(change) not in ({"up", "down"}, {"dense"}):
                raise EditFileError(f"{path}: {name} needs either up+down factors or a dense change")
        try:
            return cls(metadata["method"], metadata["model_fingerprint"], changes, json.loads(metadata["settings"]),
                       json.loads(metadata["requests"]), json.loads(metadata.get("info", "{}")))
        except (KeyError, json.JSONDecodeError) as err:
            raise EditFileError(f"{path}: malformed metadata ({err})") from err


def _weight(lm: LoadedModel, module_name: str) -> tuple[torch.nn.Parameter, bool]:
    """The module's weight and whether it is stored transposed (Conv1D: d_in x d_out)."""
    try:
        module = lm.model.get_submodule(module_name)
    except AttributeError:
        raise EditFileError(f"the model has no module {module_name!r}") from None
    dims = linear_dims(module)
    if dims is None:
        raise EditFileError(f"{module_name} is not a linear layer")
    return module.weight, not isinstance(module, torch.nn.Linear)


class EditStack:
    """The edits applied to one model, each revertible on its own, bit-exactly.

    The original weights of every touched matrix are kept; reverting an edit restores them and
    re-applies the remaining edits in order, so the result never depends on floating-point
    subtraction."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.applied: list[EditDelta] = []
        self._originals: dict[str, torch.Tensor] = {}

    def check(self, delta: EditDelta) -> None:
        if delta.model_fingerprint != self.lm.fingerprint:
            raise EditFileError(f"this edit was made for the model with fingerprint {delta.model_fingerprint}, "
                                f"not {self.lm.name} ({self.lm.fingerprint}); refusing to apply it")
        for name, change in delta.changes.items():
            weight, transposed = _weight(self.lm, name)
            shape = tuple(weight.shape[::-1] if transposed else weight.shape)
            got = tuple(change["dense"].shape) if "dense" in change else (change["up"].shape[0], change["down"].shape[1])
            if got != shape:
                raise EditFileError(f"{name}: edit has shape {got}, the model's weight {shape}")

    @torch.no_grad()
    def _add(self, delta: EditDelta) -> None:
        new_values = {}
        for name in delta.changes:  # compute everything first: a failure leaves the model untouched
            weight, transposed = _weight(self.lm, name)
            change = delta.weight_change(name).to(weight.device)
            new_values[name] = (weight, (weight.float() + (change.T if transposed else change)).to(weight.dtype))
        for weight, value in new_values.values():
            weight.copy_(value)

    @torch.no_grad()
    def apply(self, delta: EditDelta) -> int:
        """Apply an edit; returns its index for `revert`."""
        self.check(delta)
        for name in delta.changes:
            if name not in self._originals:
                self._originals[name] = _weight(self.lm, name)[0].detach().clone()
        self._add(delta)
        self.applied.append(delta)
        return len(self.applied) - 1

    @torch.no_grad()
    def revert(self, index: int = -1) -> EditDelta:
        """Undo one edit (the last by default)."""
        if not self.applied:
            raise IndexError("no edit to revert")
        removed = self.applied.pop(index)
        for name, original in self._originals.items():
            _weight(self.lm, name)[0].copy_(original)
        for delta in self.applied:
            self._add(delta)
        return removed

    def revert_all(self) -> None:
        while self.applied:
            self.revert()
        self._originals.clear()
