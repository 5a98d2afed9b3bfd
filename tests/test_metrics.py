import math

import pytest

from factedit.evaluate.metrics import (aggregate, counterfact_record_scores, generation_entropy, generative_scores,
                                       harmonic_mean, ngram_entropy, starts_with_object, tfidf_consistency,
                                       token_accuracy, wilson_interval)


def test_counterfact_scores_on_a_hand_made_record():
    p_new = {"rewrite": [0.6], "paraphrase": [0.5, 0.1], "neighborhood": [0.2, 0.7, 0.1]}
    p_true = {"rewrite": [0.1], "paraphrase": [0.2, 0.3], "neighborhood": [0.5, 0.3, 0.4]}
    s = counterfact_record_scores(p_new, p_true)
    assert s["ES"] == 1 and s["EM"] == pytest.approx(0.5)
    assert s["PS"] == 0.5 and s["PM"] == pytest.approx((0.3 - 0.2) / 2)
    assert s["NS"] == pytest.approx(2 / 3) and s["NM"] == pytest.approx((0.3 - 0.4 + 0.3) / 3)
    with pytest.raises(ValueError, match="paraphrase"):
        counterfact_record_scores({"paraphrase": [0.1]}, {"paraphrase": []})


def test_aggregate_and_harmonic_score():
    records = [{"ES": 1, "PS": 1, "NS": 0.5}, {"ES": 1, "PS": 0, "NS": 0.5}]
    summary = aggregate(records)
    assert summary["ES"]["mean"] == 100 and summary["PS"]["mean"] == 50 and summary["NS"]["mean"] == 50
    assert summary["S"]["mean"] == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 50))
    assert harmonic_mean([100, 0, 50]) == 0
    # The paper's GPT-2 XL ROME row: S is the harmonic mean of ES, PS, NS.
    assert harmonic_mean([100.0, 96.4, 75.4]) == pytest.approx(89.2, abs=0.05)


def test_ngram_entropy_known_values():
    assert ngram_entropy("a b a b a b a b a", 2) == pytest.approx(1.0)  # bigrams (a,b),(b,a) equally often
    assert ngram_entropy("x x x x x", 2) == 0.0
    text = "one two three four five six seven eight"
    assert ngram_entropy(text, 2) == pytest.approx(math.log2(7)) and ngram_entropy(text, 3) == pytest.approx(math.log2(6))
    assert generation_entropy([text]) == pytest.approx(100 * (2 / 3 * math.log2(7) + 4 / 3 * math.log2(6)) / 2)
    assert generation_entropy(["the the the the the"]) < generation_entropy([text])


def test_tfidf_consistency_orders_texts_by_topic():
    references = ["Rome is the capital of Italy, on the Tiber.", "The Colosseum stands in Rome, Italy."]
    on_topic = tfidf_consistency(["It is in Rome, the capital of Italy."], references)
    off_topic = tfidf_consistency(["Basketball players score points in the NBA."], references)
    assert 0 <= off_topic < on_topic <= 100
    assert tfidf_consistency(references, references) == pytest.approx(100)


def test_token_accuracy():
    assert token_accuracy([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        token_accuracy([1], [1, 2])


def test_generative_success_reads_what_the_continuation_starts_with():
    assert starts_with_object(" Rome, Italy. It is", " Rome")
    assert starts_with_object("\n\nrome is", "Rome")  # leading newlines and case do not matter
    assert not starts_with_object(" Romeo and Juliet", " Rome")  # whole words only
    assert not starts_with_object(" Paris, not Rome", " Rome")
    assert starts_with_object(" New York City", " New York")
    scores = generative_scores({"rewrite": [" Rome, not Paris"], "paraphrase": [" Rome.", " Paris and Rome", " Lyon"]},
                               " Rome", " Paris", {"rewrite": "GenES", "paraphrase": "GenPS"}, "GenOld")
    assert scores == {"GenES": 1.0, "GenPS": pytest.approx(1 / 3), "GenOld": 0.5}
    assert "GenOld" not in generative_scores({"rewrite": [" Rome"]}, " Rome", None, {"rewrite": "GenES"}, "GenOld")


def test_wilson_interval_known_values():
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = wilson_interval(1.0, 268)  # all kept: the interval is not empty, and stays below 1
    assert high == 1.0 and low == pytest.approx(0.9859, abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)
