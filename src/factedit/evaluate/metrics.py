"""The paper's metrics (section 3.4 and appendix), computed from probabilities and texts.

Every function here is pure: it never sees a model, so it cannot know which editor produced the
numbers and is tested on hand-made cases.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

WORD = re.compile(r"\w+|[^\w\s]")


def counterfact_record_scores(p_new: dict[str, list[float]], p_true: dict[str, list[float]]) -> dict[str, float]:
    """Per-record CounterFact scores from P(new) and P(true) on each prompt group.

    Groups: "rewrite" (one prompt), "paraphrase", "neighborhood". P(x) = exp(-mean token NLL).
    ES/PS: share of prompts where P(new) > P(true); NS: share where P(true) > P(new);
    EM/PM: mean P(new) - P(true); NM: mean P(true) - P(new)."""
    scores = {}
    for group, success, magnitude, sign in (("rewrite", "ES", "EM", 1), ("paraphrase", "PS", "PM", 1),
                                            ("neighborhood", "NS", "NM", -1)):
        new, true = np.asarray(p_new.get(group, []), float), np.asarray(p_true.get(group, []), float)
        if len(new) != len(true):
            raise ValueError(f"{group}: {len(new)} P(new) values but {len(true)} P(true) values")
        if len(new) == 0:
            continue
        diff = sign * (new - true)
        scores[success] = float((diff > 0).mean())
        scores[magnitude] = float(diff.mean())
    return scores


def harmonic_mean(values: list[float]) -> float:
    values = [float(v) for v in values]
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def aggregate(records: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean (x100) and 95% CI half-width of each score over records; S = harmonic mean of ES, PS, NS."""
    keys = sorted({k for r in records for k in r})
    summary = {}
    for key in keys:
        values = np.asarray([r[key] for r in records if key in r], float)
        ci = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        summary[key] = {"mean": 100 * float(values.mean()), "ci95": 100 * ci, "n": int(len(values))}
    if all(k in summary for k in ("ES", "PS", "NS")):
        summary["S"] = {"mean": harmonic_mean([summary[k]["mean"] for k in ("ES", "PS", "NS")]), "ci95": None,
                        "n": min(summary[k]["n"] for k in ("ES", "PS", "NS"))}
    return summary


def wilson_interval(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion observed as `share` of `n` (Wilson's score interval, which
    stays inside [0, 1] and is not empty at a share of 0 or 1, where the normal one is)."""
    if n <= 0:
        raise ValueError("a proportion needs at least one observation")
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def words(text: str) -> list[str]:
    """Word tokens for the fluency and consistency metrics: a regular expression (words and single
    punctuation marks) standing in for NLTK's word_tokenize, which needs a data download."""
    return WORD.findall(text)


def ngram_entropy(text: str, n: int) -> float:
    counts = Counter(zip(*(words(text)[i:] for i in range(n))))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    freqs = np.asarray(list(counts.values()), float) / total
    return float(-(freqs * np.log2(freqs)).sum())


def generation_entropy(texts: list[str]) -> float:
    """GE: mean over texts of the average of 2/3 x bigram and 4/3 x trigram entropy (bits), x100 as
    the paper reports it. Repetitive (disfluent) text scores low."""
    if not texts:
        raise ValueError("no texts")
    per_text = [np.mean([2 / 3 * ngram_entropy(t, 2), 4 / 3 * ngram_entropy(t, 3)]) for t in texts]
    return 100 * float(np.mean(per_text))


def tfidf_consistency(generated: list[str], references: list[str], fit_texts: list[str] | None = None) -> float:
    """Cosine similarity of the TF-IDF vectors of the generated texts (concatenated) and the reference
    texts (concatenated), x100. The vectoriser is fitted on `fit_texts` (default: both sides)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not generated or not references:
        raise ValueError("need generated and reference texts")
    vectorizer = TfidfVectorizer(tokenizer=words, lowercase=True, token_pattern=None)
    vectorizer.fit(fit_texts or generated + references)
    a, b = vectorizer.transform([" ".join(generated), " ".join(references)]).toarray()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return 100 * float(a @ b / norm) if norm else 0.0


def token_accuracy(predicted: list[int], target: list[int]) -> float:
    """zsRE: share of target tokens the model predicts (argmax) under teacher forcing."""
    if len(predicted) != len(target) or not target:
        raise ValueError("predicted and target token lists must be equally long and non-empty")
    return float(np.mean([p == t for p, t in zip(predicted, target)]))


def _names_object(text: str, obj: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(obj.strip())}(?!\w)", text, re.IGNORECASE) is not None


def starts_with_object(continuation: str, obj: str) -> bool:
    """Does a generated continuation begin with the object (leading whitespace, newlines included,
    ignored; whole words; case-insensitive)?"""
    return re.match(rf"{re.escape(obj.strip())}(?!\w)", continuation.lstrip(), re.IGNORECASE) is not None


def generative_scores(continuations: dict[str, list[str]], new: str, old: str | None,
                      names: dict[str, str], old_name: str) -> dict[str, float]:
    """What a user sees: per prompt group (e.g. {"rewrite": "GenES"}), the share of greedy continuations
    that start with the new object; `old_name`: the share of all of them in which the old object
    still appears anywhere (left out when the old object is unknown)."""
    scores = {}
    for group, name in names.items():
        texts = continuations.get(group, [])
        if texts:
            scores[name] = float(np.mean([starts_with_object(t, new) for t in texts]))
    every = [t for group in names for t in continuations.get(group, [])]
    if old and every:
        scores[old_name] = float(np.mean([_names_object(t, old) for t in every]))
    return scores
