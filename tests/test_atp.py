"""Attribution patching, token-replacement corruption and the logit-difference metric, on tiny models
(against finite differences and exact patches) and on SmolLM2 (against the exact trace)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import tiny_model, word_tokenizer

from factedit.errors import InputError
from factedit.hooks import Hook
from factedit.models import from_model
from factedit.trace.atp import estimated_heatmaps, refine
from factedit.trace.heatmap import heatmap
from factedit.trace.restore import heatmap_cells, restored_probs
from factedit.trace.runs import as_batch_seq, prepare

PROMPT, SUBJECT = "Michael Jordan plays basketball professionally in the city of", "Michael Jordan"
KINDS = ["hidden", "mlp", "attn"]


def tiny_double(family: str):
    return from_model(tiny_model(family).double(), word_tokenizer(), name=f"tiny-{family}-f64")


def metric_with_patch(run, kind, layer, token, value):
    """The metric, averaged over the noise samples, with `kind`'s output at (token, layer) set to
    `value` (samples, d): one plain forward pass, the obviously-correct reference."""

    def write(output):
        output = output.clone()
        as_batch_seq(output, run.samples)[:, token] = value.to(output.dtype)
        return output

    ids = run.tokenized.input_ids.expand(run.samples, -1)
    with torch.no_grad(), run.corruption_hook(), Hook(run.lm.arch.module(kind, layer), edit_output=write):
        logits = run.lm.model(input_ids=ids, use_cache=False).logits[:, -1]
    return float(run.metric_of(logits).mean())


@pytest.mark.parametrize("metric", ["prob", "logit-diff"])
def test_estimate_is_the_directional_derivative_along_each_patch(metric):
    """Every cell's estimate - p_corrupt equals the central finite difference of the metric along
    (clean - corrupted state), for all three kinds, in float64 (GPT-2: its norms keep the dtype,
    where Llama's compute in float32)."""
    lm = tiny_double("gpt2")
    run = prepare(lm, PROMPT, SUBJECT, samples=3, noise=1.0, seed=1, metric=metric)
    estimates = estimated_heatmaps(run, KINDS, window=1)
    eps = 1e-6
    start = run.tokenized.subject_range[0]
    for kind in KINDS:
        for layer in range(lm.n_layers):
            for token in range(start, run.n_tokens):
                corrupt = run.corrupt[(kind, layer)][:, token]
                step = eps * (run.clean[(kind, layer)][token] - corrupt)
                slope = (metric_with_patch(run, kind, layer, token, corrupt + step)
                         - metric_with_patch(run, kind, layer, token, corrupt - step)) / 2
                estimate = estimates[kind].scores[token, layer] - run.p_corrupt
                assert estimate == pytest.approx(slope / eps, rel=1e-5, abs=1e-9), (kind, layer, token)
        assert np.all(estimates[kind].scores[:start] == run.p_corrupt)  # nothing before the subject changes


def test_estimate_is_exact_where_the_metric_is_linear_in_the_state():
    """Without the final norm, the logit difference is linear in the last block's output and in its
    MLP output at the last token: there the estimate equals the exact restoration."""
    lm = tiny_double("llama")
    lm.model.model.norm = torch.nn.Identity()
    run = prepare(lm, PROMPT, SUBJECT, samples=4, noise=1.0, seed=3, metric="logit-diff")
    estimates = estimated_heatmaps(run, ["hidden", "mlp"], window=1)
    last_token, last_layer = run.n_tokens - 1, lm.n_layers - 1
    for kind in ("hidden", "mlp"):
        cells = heatmap_cells(kind, run.n_tokens, lm.n_layers, window=1)
        exact = float(restored_probs(run, [cells[last_token * lm.n_layers + last_layer]])[0])
        assert estimates[kind].scores[last_token, last_layer] == pytest.approx(exact, rel=1e-6), kind  # float32 results
        assert abs(exact - run.p_corrupt) > 1e-3  # the restoration does change the metric
    # one layer below, the path to the logits goes through a norm and an MLP: not exact any more
    cells = heatmap_cells("hidden", run.n_tokens, lm.n_layers, window=1)
    below = float(restored_probs(run, [cells[last_token * lm.n_layers + last_layer - 1]])[0])
    assert estimates["hidden"].scores[last_token, last_layer - 1] != pytest.approx(below, rel=1e-3)


def test_a_window_is_the_sum_of_its_layers_and_refine_computes_exact_cells():
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny-llama")
    run = prepare(lm, PROMPT, SUBJECT, samples=3, noise=1.0, seed=1)
    single = estimated_heatmaps(run, ["mlp", "attn"], window=1)
    wide = estimated_heatmaps(run, ["mlp", "attn"], window=2)
    for kind in ("mlp", "attn"):
        terms = single[kind].scores - run.p_corrupt
        # window 2 centred on layer l covers layers l-1 and l (clipped at 0)
        summed = terms + np.concatenate([np.zeros_like(terms[:, :1]), terms[:, :-1]], axis=1)
        assert np.allclose(wide[kind].scores - run.p_corrupt, summed, atol=1e-6)
        assert wide[kind].approx == "atp" and wide[kind].window == 2
    rows = refine(run, wide["mlp"], 4)
    exact = heatmap(run, "mlp", window=2).scores
    assert [r["rank_estimate"] for r in rows] == [1, 2, 3, 4]
    assert sorted(r["rank_exact"] for r in rows) == [1, 2, 3, 4]
    for row in rows:
        assert row["exact"] == pytest.approx(exact[row["token"], row["layer"]], abs=1e-6)
        assert row["estimate"] == pytest.approx(wide["mlp"].scores[row["token"], row["layer"]])
    assert wide["mlp"].extra["refined"] == rows
    with pytest.raises(InputError, match="hidden, mlp, attn"):
        estimated_heatmaps(run, ["hidden_no_mlp"])


POOL = [("Space Needle", "Seattle"), ("The Eiffel Tower", "Paris"), ("Michael Jordan", "basketball"),
        ("Rome", "Italy"), ("Berlin", "Germany"), ("Paris", "France"), ("Seattle", "Washington")]


def test_replacement_takes_the_subjects_token_positions_and_is_seeded():
    """The corrupted run with a replaced subject is the clean run of the prompt with the other
    subject: the same states at every layer. Only subjects of the same token length are drawn."""
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny-llama")
    run = prepare(lm, PROMPT, SUBJECT, samples=3, seed=0, corrupt="replace", replacements=POOL)
    assert run.replacements == ["Space Needle"]  # the only other two-token subject
    assert run.samples == 1 and run.noise_std == 0.0 and run.corruption == "replace"
    swapped = prepare(lm, PROMPT.replace(SUBJECT, "Space Needle"), "Space Needle", samples=1, noise=0.0)
    for key in [("hidden", layer) for layer in range(lm.n_layers)]:
        assert torch.allclose(run.corrupt[key][0], swapped.clean[key], atol=1e-6)
    # restoring the whole last block output gives back the clean prediction, as with noise
    cells = heatmap_cells("hidden", run.n_tokens, lm.n_layers)
    assert float(restored_probs(run, cells[-1:])[0]) == pytest.approx(run.p_clean, abs=1e-6)

    prompt = "Rome is located in the city of"
    draws = {seed: prepare(lm, prompt, "Rome", samples=2, seed=seed, corrupt="replace", replacements=POOL).replacements
             for seed in range(6)}
    assert all(len(chosen) == 2 and "Rome" not in chosen for chosen in draws.values())
    assert all(set(chosen) <= {"Berlin", "Paris", "Seattle"} for chosen in draws.values())
    again = prepare(lm, prompt, "Rome", samples=2, seed=0, corrupt="replace", replacements=POOL).replacements
    assert again == draws[0]
    assert len({tuple(chosen) for chosen in draws.values()}) > 1, "the seed must change the draw"


def test_logit_difference_uses_the_replacements_answers():
    lm = from_model(tiny_model("llama"), word_tokenizer(), name="tiny-llama")
    run = prepare(lm, "Rome is located in the city of", "Rome", samples=3, seed=0, corrupt="replace",
                  replacements=POOL, metric="logit-diff")
    answers = {"Berlin": "Germany", "Paris": "France", "Seattle": "Washington"}
    tokenizer = lm.tokenizer
    contrast = [tokenizer(" " + answers[s], add_special_tokens=False)["input_ids"][0] for s in run.replacements]
    assert list(run.metric.contrast_ids) == contrast
    with torch.no_grad():
        logits = lm.model(input_ids=run.tokenized.input_ids).logits[0, -1]
    expected = float(np.mean([float(logits[run.answer_id] - logits[c]) for c in contrast]))
    assert run.p_clean == pytest.approx(expected, abs=1e-5)


def test_bad_corruption_and_metric_choices_are_clear_errors(tiny_llama):
    with pytest.raises(InputError, match="no subject in the pool"):
        prepare(tiny_llama, PROMPT, SUBJECT, corrupt="replace", replacements=[("Rome", "Italy")])
    with pytest.raises(InputError, match="needs a pool"):
        prepare(tiny_llama, PROMPT, SUBJECT, corrupt="replace")
    with pytest.raises(InputError, match="takes no noise"):
        prepare(tiny_llama, PROMPT, SUBJECT, corrupt="replace", replacements=POOL, noise=0.1)
    with pytest.raises(InputError, match="unknown corruption"):
        prepare(tiny_llama, PROMPT, SUBJECT, corrupt="shuffle")
    with pytest.raises(InputError, match="unknown trace metric"):
        prepare(tiny_llama, PROMPT, SUBJECT, metric="kl")


def test_smollm2_estimate_ranks_like_the_exact_trace(smollm2):
    """On the Eiffel Tower prompt the estimate puts the late site (last token) where the exact trace
    does: its top-5 cells for the hidden state are all at the last token, and the exact peak is among
    them."""
    run = prepare(smollm2, "The Eiffel Tower is located in the city of", "The Eiffel Tower", samples=3)
    estimate = estimated_heatmaps(run, ["hidden"])["hidden"]
    rows = refine(run, estimate, 5)
    assert all(r["token"] == run.n_tokens - 1 for r in rows)
    exact_peak = heatmap(run, "hidden").peak()
    assert (exact_peak[0], exact_peak[1]) in {(r["token"], r["layer"]) for r in rows}


def invoke(args):
    from factedit.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.mark.slow  # the CLI's default model: the bundled SmolLM2
def test_trace_command_estimates_refines_and_replaces(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("FACTEDIT_DATA_DIR", str(data_dir))
    out = tmp_path / "atp"
    result = invoke(["trace", "--threads", "2", "-p", "The Eiffel Tower is located in the city of",
                     "-s", "The Eiffel Tower", "--samples", "3", "--approx", "atp", "--refine", "3",
                     "--corrupt", "replace", "--metric", "logit-diff", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "subject replaced by" in result.output and "refined 3 cells exactly" in result.output
    assert "(estimated, atp)" in result.output
    saved = json.loads((out / "trace_mlp.json").read_text())
    assert saved["approx"] == "atp" and saved["corruption"] == "replace" and saved["metric"] == "logit-diff"
    assert len(saved["extra"]["replacements"]) == 3 and len(saved["extra"]["refined"]) == 3
    assert (out / "trace_attn.png").exists() and (out / "trace_attn.svg").exists()

    for args, message in [(["--refine", "3"], "--refine confirms an estimate"),
                          (["--approx", "atp", "--kind", "hidden_no_mlp"], "estimates the kinds"),
                          (["--corrupt", "replace", "--noise", "0.1"], "takes no noise")]:
        bad = CliRunner().invoke(__import__("factedit.cli", fromlist=["main"]).main,
                                 ["trace", "-p", "The Eiffel Tower is in", "-s", "The Eiffel Tower", *args])
        assert bad.exit_code != 0 and message in bad.output, (args, bad.output)
        assert "Traceback" not in bad.output
