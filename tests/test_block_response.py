"""The norm clamp derived from the block's structure: measured response to a change of the MLP
output, against the closed form of an RMSNorm, and the clamp each tiny family gets."""

import math

import pytest
from tiny import tiny_model, word_tokenizer

from factedit.edit.mlp_change import block_response, response_clamp
from factedit.edit.rome import CLAMP_RULE, RomeSettings
from factedit.models import from_model

FACTORS = [0.25, 0.5, 1.0, 2.0, 4.0]


def tiny(family):
    return from_model(tiny_model(family), word_tokenizer(), name=f"tiny-{family}")


def normalised_response(c: float) -> float:
    """A norm with a uniform gain keeps the direction of m + c u (u orthogonal to m, ||u|| = ||m||),
    which is turned by atan(c) from m: the output moves by 2 sin(atan(c) / 2) of its size, against
    c of it for the linearised map."""
    return 2 * math.sin(math.atan(c) / 2) / c


def test_a_block_that_adds_the_mlp_output_passes_every_change_on():
    lm = tiny("llama")
    assert block_response(lm, 1, FACTORS) == pytest.approx([1.0] * len(FACTORS), abs=1e-3)
    assert response_clamp(lm, 1, ceiling=4.0) == 4.0
    settings = RomeSettings.defaults_for(lm, 1)
    assert settings.clamp_norm_factor == 4.0 and settings.clamp_rule == CLAMP_RULE


def test_a_post_mlp_norm_passes_on_what_its_closed_form_says():
    lm = tiny("gemma3")  # the norms' gains are uniform at initialisation (weight 0, scale 1 + 0)
    measured = block_response(lm, 1, FACTORS)
    assert measured == pytest.approx([normalised_response(c) for c in FACTORS], abs=0.02)
    # 2 sin(atan(c) / 2) / c = 3/4 at c = 1.07, 0.9 at c = 0.57
    clamp = response_clamp(lm, 1, ceiling=4.0, keep=0.75)
    assert 0.95 <= clamp <= 1.15 and block_response(lm, 1, [clamp])[0] >= 0.75
    default = RomeSettings.defaults_for(lm, 1).clamp_norm_factor
    assert 0.5 <= default <= 0.62 and block_response(lm, 1, [default])[0] >= 0.9


def test_a_given_clamp_is_kept_and_labelled():
    settings = RomeSettings.defaults_for(tiny("gemma3"), 1, clamp_norm_factor=4.0)
    assert settings.clamp_norm_factor == 4.0 and settings.clamp_rule == "given"
