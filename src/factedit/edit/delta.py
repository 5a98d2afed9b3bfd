"""Edits as artifacts: weight changes that can be applied, reverted bit-exactly, composed and shared.

An EditDelta holds, per weight matrix, either low-rank factors (Delta W = up @ down, as ROME's
rank-one update and MEMIT's batched update are) or a dense change (fine-tuning). Weights are
always described in nn.Linear orientation (d_out x d_in); GPT-2's transposed Conv1D is handled
when applying. An edit may also carry, per module, the keys it wrote (d_in x n): editors that
preserve earlier edits (AlphaEdit) read them from the edits applied before (history.py). An edit
with keys and no change asks those editors to leave facts alone (alphaedit.protection). Files are
.safetensors (no pickle) with JSON metadata naming the method, settings, requests and the
fingerprint of the model the edit was made for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..arch import linear_dims
from ..cache_files import write_atomic
from ..errors import FacteditError, json_type
from ..models import LoadedModel
from ..placement import read_weight, write_weight

FORMAT_VERSION = 1
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REQUEST_FIELDS = ("prompt", "subject", "target_new")  # strings; "target_true" is a string or null


class EditFileError(FacteditError, ValueError):
    """An edit file (or an edit) that is malformed, has non-finite values or was made for another model."""


@dataclass
class EditDelta:
    method: str
    model_fingerprint: str
    changes: dict[str, dict[str, torch.Tensor]]  # module name -> {"up", "down"} or {"dense"}
    settings: dict = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> (d_in, n) keys written there

    def validate(self, source: str = "the edit") -> None:
        """Check the changes' structure and values; raises EditFileError naming `source` and the problem.

        Each touched module has either a dense change (d_out x d_in) or a pair of low-rank factors,
        up (d_out x r) and down (r x d_in) with the same rank r >= 1; every tensor is a 2-D floating-point
        matrix with finite values. Whether the shapes fit a model is checked when applying
        (EditStack.check)."""
        if not isinstance(self.changes, dict):
            raise EditFileError(f"{source}: the changes must be a mapping of module name -> tensors")
        for name, change in self.changes.items():
            parts = set(change)
            if parts != {"up", "down"} and parts != {"dense"}:
                if parts & {"up", "down"} and not parts & {"dense"}:
                    have, missing = ("up", "down") if "up" in parts else ("down", "up")
                    problem = f"has the {have!r} factor but not the {missing!r} factor"
                else:
                    problem = f"has the parts {sorted(parts)}"
                raise EditFileError(f"{source}: {name} {problem}; a change is either an up+down pair of "
                                    "factors or one dense matrix")
            for part, tensor in change.items():
                if not isinstance(tensor, torch.Tensor):
                    raise EditFileError(f"{source}: {name}::{part} is a {type(tensor).__name__}, not a tensor")
                if tensor.dtype not in FLOAT_DTYPES:
                    raise EditFileError(f"{source}: {name}::{part} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                        "edit tensors must be float16, bfloat16, float32 or float64")
                if tensor.dim() != 2:
                    raise EditFileError(f"{source}: {name}::{part} is {tensor.dim()}-D (shape {tuple(tensor.shape)}); "
                                        "edit tensors must be 2-D matrices")
                if not torch.isfinite(tensor).all():
                    raise EditFileError(f"{source}: {name}::{part} contains NaN or infinite values; refusing the edit")
            if "up" in change:
                up, down = change["up"].shape, change["down"].shape
                if up[1] != down[0]:
                    raise EditFileError(f"{source}: {name} has factors of mismatched rank: up is {tuple(up)}, down "
                                        f"{tuple(down)}; up must be (d_out, r) and down (r, d_in)")
                if up[1] == 0:
                    raise EditFileError(f"{source}: {name} has factors of rank 0")
        for name, keys in self.keys.items():  # keys of a module without a change: keys to protect only
            if not isinstance(keys, torch.Tensor) or keys.dtype not in FLOAT_DTYPES or keys.dim() != 2:
                raise EditFileError(f"{source}: {name}::keys must be a 2-D floating-point matrix (d_in x n)")
            if not torch.isfinite(keys).all():
                raise EditFileError(f"{source}: {name}::keys contains NaN or infinite values; refusing the edit")

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
        keys = dict(self.keys)
        for name, more in other.keys.items():
            keys[name] = torch.cat([keys[name], more], 1) if name in keys else more
        method = self.method if self.method == other.method else f"{self.method}+{other.method}"
        return EditDelta(method, self.model_fingerprint, changes, self.settings, self.requests + other.requests,
                         {"composed": True}, keys)

    def save(self, path: str | Path) -> Path:
        """Write the edit as .safetensors. Atomic: a failed write leaves no partial file at `path`."""
        path = Path(path)
        tensors = {f"{name}::{part}": t.detach().contiguous().cpu() for name, change in self.changes.items()
                   for part, t in change.items()}
        tensors.update({f"{name}::keys": keys.detach().contiguous().cpu() for name, keys in self.keys.items()})
        metadata = {"format": "factedit-edit", "version": str(FORMAT_VERSION), "method": self.method,
                    "model_fingerprint": self.model_fingerprint, "settings": json.dumps(self.settings),
                    "requests": json.dumps(self.requests), "info": json.dumps(self.info)}
        return write_atomic(path, lambda partial: save_file(tensors, str(partial), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> "EditDelta":
        """Read and validate an edit file: the one place where a file's structure, metadata types, format
        version and values are checked. Raises EditFileError saying what is wrong."""
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
        if not tensors:  # a real edit changes a weight or names keys to protect
            raise EditFileError(f"{path} holds no tensors: it changes no weight; not an edit")
        fields = _read_metadata(metadata, str(path))
        changes: dict[str, dict[str, torch.Tensor]] = {}
        keys: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            name, _, part = key.rpartition("::")
            if part not in ("up", "down", "dense", "keys") or not name:
                raise EditFileError(f"{path}: unexpected tensor {key!r} (expected MODULE::up, ::down, ::dense or ::keys)")
            if part == "keys":
                keys[name] = tensor
            else:
                changes.setdefault(name, {})[part] = tensor
        delta = cls(fields["method"], fields["model_fingerprint"], changes, fields["settings"], fields["requests"],
                    fields["info"], keys)
        delta.validate(str(path))
        return delta


def _read_metadata(metadata: dict[str, str], source: str) -> dict:
    """The edit file's metadata, type-checked: format version, method, fingerprint, settings (object),
    requests (list of request objects) and info (object)."""
    version = metadata.get("version")
    if version is None:
        raise EditFileError(f"{source}: no format version in the metadata; not a factedit edit file")
    if not (version.isascii() and version.isdigit()):  # "٣".isdigit() is true too
        raise EditFileError(f"{source}: unknown format version {version!r}; this factedit reads version {FORMAT_VERSION}")
    if int(version) != FORMAT_VERSION:
        newer = " (written by a newer factedit?)" if int(version) > FORMAT_VERSION else ""
        raise EditFileError(f"{source}: format version {int(version)}{newer} is not supported; this factedit reads "
                            f"version {FORMAT_VERSION}")
    fields: dict = {}
    for key in ("method", "model_fingerprint"):
        if not metadata.get(key, "").strip():
            raise EditFileError(f"{source}: the metadata has no {key!r}")
        fields[key] = metadata[key]
    for key, kind, default in (("settings", dict, None), ("requests", list, None), ("info", dict, "{}")):
        text = metadata.get(key, default)
        if text is None:
            raise EditFileError(f"{source}: the metadata has no {key!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise EditFileError(f"{source}: metadata {key!r} is not valid JSON ({err})") from None
        if not isinstance(value, kind):
            raise EditFileError(f"{source}: metadata {key!r} must be {json_type(kind())}, not {json_type(value)}")
        fields[key] = value
    for i, request in enumerate(fields["requests"]):
        if not isinstance(request, dict):
            raise EditFileError(f"{source}: requests[{i}] must be an object, not {json_type(request)}")
        for key in REQUEST_FIELDS:
            if not isinstance(request.get(key), str):
                raise EditFileError(f"{source}: requests[{i}].{key} must be a string, not {json_type(request.get(key))}")
        if not isinstance(request.get("target_true"), (str, type(None))):
            raise EditFileError(f"{source}: requests[{i}].target_true must be a string or null, "
                                f"not {json_type(request['target_true'])}")
        occurrence = request.get("occurrence")  # absent in files written before occurrences existed
        if occurrence is not None and (isinstance(occurrence, bool) or not isinstance(occurrence, int)
                                       or occurrence < 0):
            raise EditFileError(f"{source}: requests[{i}].occurrence must be a whole number from 0 or null, "
                                f"not {json_type(occurrence)} ({occurrence!r})")
    return fields


def _module(lm: LoadedModel, module_name: str) -> tuple[torch.nn.Module, bool]:
    """The linear module and whether it stores its weight transposed (Conv1D: d_in x d_out)."""
    try:
        module = lm.model.get_submodule(module_name)
    except AttributeError:
        raise EditFileError(f"the model has no module {module_name!r}") from None
    dims = linear_dims(module)
    if dims is None:
        raise EditFileError(f"{module_name} is not a linear layer")
    return module, not isinstance(module, torch.nn.Linear)


# The largest change an edit may make to a weight matrix, relative to the matrix as it is (Frobenius
# norms). Real edits stay far below it: the largest measured here is 2.3, a MEMIT batch of 100 edits
# into Gemma 3's layer 1 after 200 earlier ones, when that layer was already collapsing
# (docs/results.md#lifelong-gemma). An edit file whose factors were scaled by 1e30 made every prediction uniform.
MAX_RELATIVE_CHANGE = 100.0
PROBE_TEXT = "The capital of France is"


@torch.no_grad()
def probe_logits(lm: LoadedModel) -> torch.Tensor:
    """The model's logits (float64, on the CPU) at every position of a short fixed text: one forward."""
    ids = torch.tensor([lm.tokenizer(PROBE_TEXT)["input_ids"]], device=lm.device)
    return lm.model(input_ids=ids, use_cache=False).logits[0].double().cpu()


def check_health(lm: LoadedModel, before: torch.Tensor, source: str) -> None:
    """Refuse (EditFileError) a model whose probe logits (probe_logits) are no longer finite, or have
    collapsed to a uniform prediction at some position where `before` (the same probe before the
    change) was not uniform."""
    after = probe_logits(lm)
    if not torch.isfinite(after).all():
        raise EditFileError(f"{source} makes the model's predictions NaN or infinite; refused (the model is as it "
                            "was)")
    spread_before = before.amax(-1) - before.amin(-1)
    spread_after = after.amax(-1) - after.amin(-1)
    if (spread_after < 1e-3 * spread_before).any():
        raise EditFileError(f"{source} makes the model predict every token as equally likely (its logits "
                            "collapse to one value); refused (the model is as it was)")


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
        """Refuse an edit that is malformed, non-finite, made for another model or of the wrong shapes."""
        delta.validate()
        if delta.model_fingerprint != self.lm.fingerprint:
            raise EditFileError(f"this edit was made for the model with fingerprint {delta.model_fingerprint}, "
                                f"not {self.lm.name} ({self.lm.fingerprint}); refusing to apply it")
        for name, change in delta.changes.items():
            module, transposed = _module(self.lm, name)
            shape = tuple(module.weight.shape[::-1] if transposed else module.weight.shape)
            got = tuple(change["dense"].shape) if "dense" in change else (change["up"].shape[0], change["down"].shape[1])
            if got != shape:
                raise EditFileError(f"{name}: the edit changes a {got[0]}x{got[1]} matrix, but the model's weight is "
                                    f"{shape[0]}x{shape[1]} (d_out x d_in); refusing to apply it")
            weight_norm = read_weight(module).float().norm().item()
            change_norm = delta.weight_change(name).norm().item()
            if not change_norm <= MAX_RELATIVE_CHANGE * weight_norm:  # also catches an overflow to inf
                raise EditFileError(f"{name}: the edit's change has {change_norm / weight_norm if weight_norm else float('inf'):.3g} times "
                                    f"the norm of the weight it changes (at most {MAX_RELATIVE_CHANGE:g}); no "
                                    "real edit is that large; refusing to apply it")
        for name, keys in delta.keys.items():
            module, transposed = _module(self.lm, name)
            d_in = module.weight.shape[0 if transposed else 1]
            if keys.shape[0] != d_in:
                raise EditFileError(f"{name}: the edit's keys have {keys.shape[0]} entries, but the "
                                    f"weight takes inputs of {d_in}; refusing to apply it")

    @torch.no_grad()
    def _add(self, delta: EditDelta, *, check_finite: bool = False) -> None:
        new_values = {}
        for name in delta.changes:  # compute everything first: a failure leaves the model untouched
            module, transposed = _module(self.lm, name)
            weight = read_weight(module)
            change = delta.weight_change(name).to(weight.device)
            value = (weight.float() + (change.T if transposed else change)).to(weight.dtype)
            if check_finite and (torch.isfinite(weight) & ~torch.isfinite(value)).any():
                raise EditFileError(f"{name}: applying the edit would make weights infinite or NaN in "
                                    f"{str(weight.dtype).removeprefix('torch.')}; refusing to apply it")
            new_values[name] = (module, value)
        for module, value in new_values.values():
            write_weight(module, value)

    @torch.no_grad()
    def apply(self, delta: EditDelta, *, probe: bool = False) -> int:
        """Apply an edit; returns its index for `revert`. A refused edit leaves the model unchanged.
        `probe=True` (for edit files from elsewhere) also refuses an edit after which the model's
        predictions are non-finite or uniform (check_health), at the cost of two short forwards."""
        self.check(delta)
        before = probe_logits(self.lm) if probe else None
        for name in delta.changes:  # the model is unedited in these modules, or as the applied edits left it
            if name not in self._originals:
                self._originals[name] = read_weight(_module(self.lm, name)[0]).detach().clone()
        self._add(delta, check_finite=True)
        self.applied.append(delta)
        if probe:
            try:
                check_health(self.lm, before, "the edit")
            except EditFileError:
                self.revert()
                raise
        return len(self.applied) - 1

    @torch.no_grad()
    def revert(self, index: int = -1) -> EditDelta:
        """Undo one edit (the last by default)."""
        if not self.applied:
            raise IndexError("no edit to revert")
        removed = self.applied.pop(index)
        for name, original in self._originals.items():
            write_weight(_module(self.lm, name)[0], original)
        for delta in self.applied:
            self._add(delta)
        return removed

    def originals(self) -> dict[str, torch.Tensor]:
        """The unedited weights of every module an applied edit touches (as stored: Conv1D transposed)."""
        return dict(self._originals)

    def revert_all(self) -> None:
        while self.applied:
            self.revert()
        self._originals.clear()
