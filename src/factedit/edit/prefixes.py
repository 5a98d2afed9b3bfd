"""The context prefixes every editor averages its keys and values over (ROME section 3.1, MEMIT's
"context templates"): "{}" plus short texts sampled from the model, each as "<text>. {}".

Shared by ROME, MEMIT and AlphaEdit: each passes its own settings (ValueSettings' prefix_lengths,
prefix_seed, prefix_context), so that changing one method's prefixes changes no other's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..cache_files import read_cached, write_atomic
from ..models import LoadedModel, cache_root, check_seed
from ..progress import PREFIXES, Phases, start_phase
from .value import ValueSettings


def context_templates(lm: LoadedModel, settings: ValueSettings, cache_dir: Path | None = None, *,
                      progress: Phases | None = None) -> list[str]:
    """["{}"] + ["<sampled text>. {}", ...], sampled once per model and seed, cached on disk; the
    sampling is phase progress.PREFIXES, counted in tokens."""
    from ..generate import sample_texts, sampled_tokens

    check_seed(settings.prefix_seed, "prefix_seed")
    starts = ["The", "Therefore", "Because", "I", "You"]
    spec = "-".join(f"{n}x{length}" for length, n in settings.prefix_lengths)
    if settings.prefix_context:
        spec += "_after-" + hashlib.sha256(settings.prefix_context.encode()).hexdigest()[:8]
    path = cache_root(cache_dir) / "prefixes" / f"{lm.fingerprint}_seed{settings.prefix_seed}_{spec}.json"
    cached = read_cached(path, lambda p: json.loads(p.read_text()))
    # What this function writes: "{}" first, then one template per sampled text, each with one "{}".
    expected = 1 + sum(max(1, count // len(starts)) * len(starts) for _, count in settings.prefix_lengths)
    if isinstance(cached, list) and len(cached) == expected and cached[0] == "{}" \
            and all(isinstance(t, str) and t.count("{}") == 1 for t in cached):
        return cached
    total = sum(sampled_tokens(lm, starts, max(1, count // len(starts)), length, settings.prefix_context)
                for length, count in settings.prefix_lengths)
    step = start_phase(progress, PREFIXES, total, "tok")
    templates = ["{}"]
    for length, count in settings.prefix_lengths:
        texts = sample_texts(lm, starts, max(1, count // len(starts)), length, top_k=5,
                             seed=settings.prefix_seed * 100 + length, context=settings.prefix_context, progress=step)
        templates += [t.replace("{", " ").replace("}", " ").strip() + ". {}" for t in texts]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda partial: partial.write_text(json.dumps(templates, indent=1)))
    return templates
