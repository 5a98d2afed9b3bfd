"""The mass editors' targets (MEMIT step 1, the reference's compute_z): for each request, the block
output z at the subject's last token of the top edited layer that makes the model predict the new
target, z = h + delta with delta optimised by the value step (value.py, applied to the block), and
cached on disk so that a long batch resumes where it stopped. Shared by MEMIT and AlphaEdit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..cache_files import read_cached, write_atomic
from ..models import LoadedModel, cache_root, weights_fingerprint
from ..request import EditRequest
from .prompts import io_at_subject
from .value import ValueSettings, compute_value_deltas


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class TargetCache:
    """Each request's target z on disk, so that a long batch (1,000 edits: hours on a CPU) resumes
    where it stopped. Keyed by the current weights (an earlier edit changes them), the device, the
    top layer and the value-step settings; one file per request."""

    def __init__(self, lm: LoadedModel, settings: ValueSettings, top: int, cache_dir: Path | None):
        key = {"weights": weights_fingerprint(lm.model), "device": str(lm.device), "layer": top,
               "settings": settings.value_settings()}
        # (The folder's name predates AlphaEdit's use of the same targets; kept so that caches stay valid.)
        self.folder = cache_root(cache_dir) / "memit_targets" / _digest(key)

    def _path(self, request: EditRequest) -> Path:
        return self.folder / f"{_digest(request.to_dict())}.pt"

    def get(self, request: EditRequest) -> dict | None:
        return read_cached(self._path(request), lambda path: torch.load(path, weights_only=True))

    def put(self, request: EditRequest, found: dict) -> None:
        write_atomic(self._path(request), lambda partial: torch.save(found, partial))


def compute_targets(lm: LoadedModel, requests: list[EditRequest], settings: ValueSettings, top: int,
                    templates: list[str], cache: TargetCache, progress, batch_requests: int) -> list[dict]:
    """{"z": target, **the value step's diagnostics} for every request, optimised `batch_requests` at a
    time; cached targets are reused. `progress` hears of each request done."""
    found = [cache.get(r) for r in requests]
    missing = [i for i, f in enumerate(found) if f is None]
    if progress and len(missing) < len(requests):
        progress(len(requests) - len(missing))
    for start in range(0, len(missing), batch_requests):
        chunk = missing[start:start + batch_requests]
        chunk_requests = [requests[i] for i in chunk]
        hidden = torch.stack([io_at_subject(lm, "hidden", top, r, templates[:1])[1][0] for r in chunk_requests])
        values = compute_value_deltas(lm, top, chunk_requests, templates, settings, hidden, kind="hidden")
        for i, h, value in zip(chunk, hidden, values):
            found[i] = {"z": (h + value.delta.to(h.device)).cpu(), **value.diagnostics()}
            cache.put(requests[i], found[i])
        if progress:
            progress(len(chunk))
    return found
