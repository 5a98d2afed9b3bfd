"""ROME on the bundled SmolLM2-135M: edits that work, stay specific, revert exactly, round-trip."""

import dataclasses

import pytest
import torch

from factedit.edit import EditDelta, EditRequest, EditStack, edit, get_method
from factedit.generate import greedy_continuation
from factedit.scoring import target_probs

pytestmark = pytest.mark.slow

PROMPT = "The Eiffel Tower is located in the city of"
PARAPHRASES = ["Where is the Eiffel Tower? It is in the city of", "The Eiffel Tower, a famous landmark in the city of"]
UNRELATED = [("The capital of France is", " Paris"), ("The capital of Japan is", " Tokyo"),
             ("Michael Jordan is a famous", " basketball")]


def settings_for(method, lm, data_dir):
    return get_method(method).defaults(lm, 5, stats_corpus=str(data_dir / "wiki" / "enwiki_sample.jsonl"),
                                       stats_tokens=20_000)


@pytest.fixture(scope="module")
def cache_dir(smollm2_cache):
    return smollm2_cache  # the key statistics at 20,000 tokens: shared with the other SmolLM2 tests (conftest)


@pytest.mark.parametrize("method", ["rome", "rome-original"])
def test_edit_rewrites_the_fact_generalises_and_stays_specific(smollm2, data_dir, cache_dir, method, tmp_path):
    settings = settings_for(method, smollm2, data_dir)
    request = EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    weights = {k: v.clone() for k, v in smollm2.model.state_dict().items()}
    rome_before = target_probs(smollm2, [PROMPT] + PARAPHRASES, [" Rome"] * 3)
    paris_before = target_probs(smollm2, [PROMPT], [" Paris"])[0]
    unrelated_before = target_probs(smollm2, [p for p, _ in UNRELATED], [t for _, t in UNRELATED])
    assert paris_before > 0.6 and rome_before[0] < 0.05

    delta, info = edit(smollm2, request, method, settings, cache_dir=cache_dir)
    assert all(torch.equal(weights[k], v) for k, v in smollm2.model.state_dict().items()), "edit() must not modify"
    stack = EditStack(smollm2)
    stack.apply(delta)
    try:
        rome_after = target_probs(smollm2, [PROMPT] + PARAPHRASES, [" Rome"] * 3)
        paris_after = target_probs(smollm2, [PROMPT], [" Paris"])[0]
        unrelated_after = target_probs(smollm2, [p for p, _ in UNRELATED], [t for _, t in UNRELATED])
        assert rome_after[0] > 0.5 and rome_after[0] > paris_after
        assert all(after > before + 0.1 for after, before in zip(rome_after[1:], rome_before[1:]))
        assert all(abs(a - b) < 0.1 for a, b in zip(unrelated_after, unrelated_before)), (unrelated_before,
                                                                                          unrelated_after)
        assert "Rome" in greedy_continuation(smollm2, PROMPT, 5)
        # Save, revert, load and apply again: same behaviour.
        path = delta.save(tmp_path / "e.safetensors")
        stack.revert()
        assert all(torch.equal(weights[k], v) for k, v in smollm2.model.state_dict().items())
        stack.apply(EditDelta.load(path))
        assert target_probs(smollm2, [PROMPT], [" Rome"])[0] == pytest.approx(rome_after[0], abs=1e-5)
    finally:
        stack.revert_all()
    assert all(torch.equal(weights[k], v) for k, v in smollm2.model.state_dict().items())
    assert info[0]["steps"] >= 1 and delta.method == method


def test_paper_settings_by_name_reproduce_the_committed_run_on_one_record(smollm2, data_dir, tmp_path):
    """docs/results/eval/smollm2-cf-rome was run with the reference's 20 value steps (then the default);
    `--settings paper` must give its numbers again."""
    import json
    from pathlib import Path

    from factedit.evaluate.runner import run_evaluation

    committed = Path(__file__).parents[1] / "docs" / "results" / "eval" / "smollm2-cf-rome"
    then = json.loads((committed / "settings.json").read_text())["settings"]
    settings = get_method("rome").settings_with(smollm2, preset="paper", stats_tokens=then["stats_tokens"],
                                                stats_corpus=str(data_dir / "wiki" / "enwiki_sample.jsonl"))
    now = settings.to_dict()  # every setting of then, the same; those added since at the reference's values
    assert {k: now[k] for k in then if k != "stats_corpus"} == {k: v for k, v in then.items() if k != "stats_corpus"}
    assert (now["early_stop_on"], now["prefix_context"], now["value_through_update"]) == ("total", "", False)
    data = data_dir / "counterfact" / "counterfact_dev.json"
    run_evaluation(smollm2, "rome", "counterfact", tmp_path / "run", data=str(data), n=1, settings=settings)
    (case_file,) = (tmp_path / "run" / "cases").iterdir()
    new, old = json.loads(case_file.read_text()), json.loads((committed / "cases" / case_file.name).read_text())
    for group in ("rewrite", "paraphrase", "neighborhood"):
        for which in ("p_new", "p_true"):
            assert new["post"][which][group] == pytest.approx(old["post"][which][group], rel=1e-3, abs=1e-5)
    assert {k: v for k, v in new["post_scores"].items() if k in old["post_scores"]} == \
        pytest.approx(old["post_scores"], rel=1e-3, abs=1e-5)
    assert new["edit"]["steps"] <= 20


def test_context_prefixes_are_sentences(smollm2, tmp_path):
    """SmolLM2's tokenizer adds no start token, and the model's prediction at position 0 ignores the
    word there: sampled from a bare start word, the reference's prefixes degenerate ("The-199. {}");
    sampled after a newline (the default) they read as text."""
    import torch

    from factedit.edit.prefixes import context_templates

    next_dash = []
    for word in ("The", "I", "Because", "You"):
        ids = torch.tensor([smollm2.tokenizer(word)["input_ids"]])
        with torch.no_grad():
            probs = smollm2.model(input_ids=ids).logits[0, -1].softmax(-1)
        next_dash.append(float(probs[smollm2.tokenizer("-", add_special_tokens=False)["input_ids"][0]]))
    assert min(next_dash) > 0.3, next_dash  # the same "-" whatever the word

    def glued(templates):  # prefixes whose start word runs straight into "-", "_" or ","
        return sum(t.split()[0].rstrip(".{}").count("-") + t.startswith(("The,", "I,", "You,", "Because,"))
                   > 0 for t in templates[1:])

    bare = context_templates(smollm2, get_method("rome").settings_with(smollm2, preset="paper"), tmp_path)
    default = context_templates(smollm2, get_method("rome").settings_with(smollm2), tmp_path)
    assert len(bare) == len(default) == 21 and bare != default
    assert glued(bare) >= 10 and glued(default) <= 2, (bare, default)


def test_rome_in_bfloat16_rewrites_the_fact_with_float32_factors(smollm2, data_dir, cache_dir):
    """Forward passes in bfloat16; the clamp rule, statistics, value and solve as in float32."""
    from factedit import load

    lm = load("smollm2-135m", dtype="bfloat16")
    assert settings_for("rome", lm, data_dir).clamp_norm_factor == settings_for("rome", smollm2, data_dir).clamp_norm_factor
    # Forward passes in bfloat16 are slow on a CPU without bf16 arithmetic: fewer statistics tokens and
    # context prefixes than the float32 tests (the statistics, prefixes and value are its own: the
    # caches are keyed by the dtype), enough for the fact to move; and the optimisation stops once the
    # target's mean NLL is below 0.3 (p ~ 0.74), enough for what is asserted (p(Rome) > 0.5).
    settings = dataclasses.replace(settings_for("rome", lm, data_dir), stats_tokens=5_000,
                                   prefix_lengths=[[5, 3], [10, 3]], early_stop_loss=0.3)
    request = EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    unrelated_before = target_probs(lm, [p for p, _ in UNRELATED], [t for _, t in UNRELATED])
    delta, info = edit(lm, request, "rome", settings, cache_dir=cache_dir)
    assert info[0]["converged"]
    assert all(t.dtype == torch.float32 for change in delta.changes.values() for t in change.values())
    stack = EditStack(lm)
    stack.apply(delta)
    try:
        rome, paris = target_probs(lm, [PROMPT, PROMPT], [" Rome", " Paris"])
        unrelated_after = target_probs(lm, [p for p, _ in UNRELATED], [t for _, t in UNRELATED])
        assert rome > 0.5 and rome > paris
        assert all(abs(a - b) < 0.1 for a, b in zip(unrelated_after, unrelated_before))
    finally:
        stack.revert_all()
    assert all(torch.equal(weights[k], v) for k, v in lm.model.state_dict().items())
