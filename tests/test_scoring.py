import pytest
import torch
from tiny import FAMILIES, tiny_model, word_tokenizer

from factedit.models import from_model
from factedit.scoring import target_logprobs, teacher_forced_predictions

PROMPTS = ["The Eiffel Tower is located in", "Paris", "The Space Needle is located in the city of"]
TARGETS = [" the city of Rome", " Seattle", " Paris"]


def reference_logprob(lm, prompt, target):
    """One pair at a time, every position's full logits, no padding: obviously right."""
    p_ids = list(lm.tokenizer(prompt)["input_ids"])
    t_ids = list(lm.tokenizer(target, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].float()
    log_probs = torch.log_softmax(logits, -1)
    return torch.stack([log_probs[len(p_ids) - 1 + j, t] for j, t in enumerate(t_ids)]).mean(), \
        logits[len(p_ids) - 1:len(p_ids) - 1 + len(t_ids)].argmax(-1).tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_scoring_matches_one_pair_at_a_time(family):
    lm = from_model(tiny_model(family), word_tokenizer())
    batched = target_logprobs(lm, PROMPTS, TARGETS)
    predictions = teacher_forced_predictions(lm, PROMPTS, TARGETS)
    for i, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        expected, argmax = reference_logprob(lm, prompt, target)
        assert float(batched[i]) == pytest.approx(float(expected), abs=1e-5)
        assert predictions[i][0] == argmax
