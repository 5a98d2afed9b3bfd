"""Editors: requests -> EditDelta (apply, revert, save, load)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..models import LoadedModel
from .delta import EditDelta, EditFileError, EditStack
from .request import EditRequest
from .rome import RomeSettings, context_templates, key_statistics, rome_delta

METHODS = {"rome": "consistent", "rome-original": "original"}  # method name -> ROME key mode


def edit(lm: LoadedModel, requests: EditRequest | list[EditRequest], method: str = "rome",
         settings: RomeSettings | None = None, *, cache_dir: Path | None = None,
         progress: Callable[[int], None] | None = None, stats_progress: Callable[[int], None] | None = None,
         ) -> tuple[EditDelta, list[dict]]:
    """Compute the edit for `requests` (applied one after another, as the paper does for several
    facts) and return it with per-request diagnostics. The model is left exactly as it was, also
    when something fails; apply the result with EditStack(lm).apply(delta)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    requests = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not requests:
        raise ValueError("no edit requests given")
    settings = settings or RomeSettings.defaults_for(lm)
    settings.key_mode = METHODS[method]
    stats, _, _ = key_statistics(lm, settings, cache_dir=cache_dir, progress=stats_progress)
    C = stats.matrix.to(lm.device)
    templates = context_templates(lm, settings, cache_dir)
    stack = EditStack(lm)
    total, diagnostics = None, []
    try:
        for request in requests:
            delta, info = rome_delta(lm, request, settings, C, templates, progress=progress)
            diagnostics.append(info)
            if len(requests) > 1:
                stack.apply(delta)
            total = delta if total is None else total.compose(delta)
    finally:
        stack.revert_all()
    total.info.update({"diagnostics": diagnostics, "stats_tokens": stats.count})
    return total, diagnostics


__all__ = ["EditDelta", "EditFileError", "EditRequest", "EditStack", "METHODS", "RomeSettings", "edit"]
