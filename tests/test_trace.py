import numpy as np
import pytest
import torch
from tiny import FAMILIES, tiny_model, word_tokenizer

from factedit.models import from_model
from factedit.tokens import PromptError
from factedit.trace.tracing import trace
from factedit.trace.restore import HEATMAP_KINDS, heatmap_cells, restored_probs, restored_probs_naive
from factedit.trace.runs import prepare

PROMPT, SUBJECT = "Michael Jordan plays basketball professionally in the city of", "Michael Jordan"


def tiny_run(family, subject=SUBJECT, prompt=PROMPT, **kwargs):
    lm = from_model(tiny_model(family), word_tokenizer(), name=f"tiny-{family}")
    return prepare(lm, prompt, subject, samples=3, noise=1.0, seed=1, **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_tracing_equals_naive_loop_on_every_family(family):
    run = tiny_run(family)
    assert run.p_corrupt != pytest.approx(run.p_clean, abs=1e-4), "noise must change the prediction"
    for kind in HEATMAP_KINDS:
        cells = heatmap_cells(kind, run.n_tokens, run.lm.n_layers, window=2)
        fast = restored_probs(run, cells, max_batch_tokens=40)  # small batches: several groups per token
        naive = restored_probs_naive(run, cells)
        assert torch.allclose(fast, naive, atol=1e-5), (kind, (fast - naive).abs().max())


def test_subject_in_the_middle_and_restoring_everything_recovers_clean():
    run = tiny_run("llama", subject="basketball")
    start, _ = run.tokenized.subject_range
    cells = heatmap_cells("hidden", run.n_tokens, run.lm.n_layers)
    fast = restored_probs(run, cells).view(run.n_tokens, -1)
    # Tokens before the subject were never corrupted; the last layer at the last token is the output.
    assert torch.allclose(fast[:start], torch.tensor(run.p_corrupt), atol=1e-5)
    assert fast[-1, -1] == pytest.approx(run.p_clean, abs=1e-5)
    assert torch.allclose(fast, restored_probs_naive(run, cells).view(run.n_tokens, -1), atol=1e-5)


def test_same_seed_same_numbers_other_seed_other_noise():
    a, b, c = tiny_run("gpt2"), tiny_run("gpt2"), None
    assert torch.equal(a.noise, b.noise) and a.p_corrupt == b.p_corrupt
    lm = a.lm
    c = prepare(lm, PROMPT, SUBJECT, samples=3, noise=1.0, seed=2)
    assert not torch.equal(a.noise, c.noise)


def test_bad_inputs_give_clear_errors(tiny_llama):
    with pytest.raises(PromptError, match="does not occur"):
        trace(tiny_llama, PROMPT, "Paris")
    with pytest.raises(PromptError, match="empty"):
        trace(tiny_llama, "", "Paris")
    with pytest.raises(PromptError, match="empty"):
        trace(tiny_llama, PROMPT, "  ")
    with pytest.raises(PromptError, match="tokens"):
        trace(tiny_llama, "Michael Jordan " + "the " * 100, "Michael Jordan")
    with pytest.raises(ValueError, match="unknown trace kind"):
        trace(tiny_llama, PROMPT, SUBJECT, kinds="neurons")
    with pytest.raises(ValueError, match="samples"):
        trace(tiny_llama, PROMPT, SUBJECT, samples=0)
    with pytest.raises(ValueError, match="window"):
        trace(tiny_llama, PROMPT, SUBJECT, kinds="mlp", window=0)


@pytest.mark.slow
def test_smollm2_eiffel_tower_batched_equals_naive(smollm2):
    run = prepare(smollm2, "The Eiffel Tower is located in the city of", "The Eiffel Tower", samples=10, seed=0)
    assert run.answer == " Paris" and run.p_clean == pytest.approx(0.70, abs=0.03)
    assert run.p_corrupt < 0.1
    assert run.tokenized.tokens[:4] == ["The", " E", "iffel", " Tower"]
    for kind in ("hidden", "mlp", "attn"):
        cells = [c for c in heatmap_cells(kind, run.n_tokens, smollm2.n_layers, 10)
                 if c.token in (2, 3, 9) and c.layer in (0, 2, 5, 14, 23, 29)]
        fast, naive = restored_probs(run, cells), restored_probs_naive(run, cells)
        assert float((fast - naive).abs().max()) < 1e-4, kind


@pytest.mark.slow
def test_smollm2_heatmap_shows_the_papers_pattern(smollm2):
    results = trace(smollm2, "The Eiffel Tower is located in the city of", "The Eiffel Tower", "hidden,mlp")
    hidden, mlp = results["hidden"].scores, results["mlp"].scores
    # Early site: the MLPs at the subject token that carries the fact ("iffel") in low layers.
    assert mlp[2, :8].max() - results["mlp"].p_corrupt > 0.2
    # Late site: the last token's hidden state in late layers carries it; restoring the last layer
    # at the last token gives back the clean probability.
    assert hidden[-1, 25:].min() > 0.5
    assert hidden[-1, -1] == pytest.approx(results["hidden"].p_clean, abs=1e-4)
    assert np.all(np.isfinite(hidden))


@pytest.mark.slow
def test_gemma3_embedding_scale_is_corrupted_and_batched_equals_naive(gemma3):
    lm = gemma3
    run = prepare(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower", samples=4, seed=0)
    assert run.answer == " Paris" and run.p_clean > 0.5 and run.p_corrupt < 0.1
    # Gemma multiplies embeddings by sqrt(d) inside the embedding module: the noise follows that scale.
    raw_std = float(lm.arch.embed.weight.detach().std())
    assert run.noise_std == pytest.approx(3 * raw_std * lm.arch.d_model**0.5, rel=0.05)
    assert run.tokenized.subject_range == (1, 4)  # after <bos>
    cells = [c for c in heatmap_cells("hidden", run.n_tokens, lm.n_layers) if c.layer in (1, 3, 9, 17)]
    assert float((restored_probs(run, cells) - restored_probs_naive(run, cells)).abs().max()) < 1e-4
