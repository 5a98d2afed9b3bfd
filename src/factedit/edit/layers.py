"""Which layer an editor edits when none is given: one structural rule for the single-layer editors
(ROME, fine-tuning) and the top of the mass editors' default range (MEMIT, AlphaEdit)."""

from __future__ import annotations

from ..models import LoadedModel


def edit_layer(lm: LoadedModel, layer: int | None = None) -> tuple[int, str]:
    """The layer single-layer editors use, and how it was chosen. Without a layer: n_layers // 6
    (SmolLM2: 5), inside the early MLP site that causal tracing finds on the models here;
    `factedit suggest-layer` measures it for a new model."""
    if layer is None:
        layer, rule = max(0, lm.n_layers // 6), "n_layers // 6 (structural default; see suggest-layer)"
    else:
        rule = "given"
    return lm.check_layer(layer), rule
