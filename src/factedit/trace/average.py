"""Average indirect effects over many facts, per token class and layer (the paper's Figure 2).

Per-fact heatmaps are appended to `facts.jsonl` in the output folder (a run_folder.RunFolder,
settings.json holding AverageSettings) as they finish, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..data.known import KnownFact
from ..models import LoadedModel, check_seed
from ..progress import steps_only
from ..run_folder import RunFolder, with_added_later
from ..stats_running import RunningMean
from ..tokens import answer_matches, check_prompt_length
from .atp import check_approx
from .corrupt import NoReplacement, check_corruption
from .metric import check_metric
from .heatmap import expand_kinds
from .runs import embedding_std, last_token_logits, prepare
from .tracing import heatmaps

FACTS_FILE = "facts.jsonl"
TOKEN_CLASSES = ("first_subject", "middle_subject", "last_subject", "first_after", "further", "last")


def token_class_rows(scores: np.ndarray, subject_range: tuple[int, int]) -> dict[str, np.ndarray]:
    """Rows of a (tokens x layers) array grouped like the paper: first / middle / last subject
    token, first token after the subject, further tokens, last token. Classes that a prompt does not
    have (e.g. no middle token for a two-token subject) are left out."""
    start, end = subject_range
    last = scores.shape[0] - 1
    rows = {"first_subject": scores[start], "last_subject": scores[end - 1], "last": scores[last]}
    if end - start > 2:
        rows["middle_subject"] = scores[start + 1:end - 1].mean(0)
    if end < last:
        rows["first_after"] = scores[end]
    if end + 1 < last:
        rows["further"] = scores[end + 1:last].mean(0)
    return rows


@dataclass
class AverageSettings:
    kinds: list[str]
    samples: int = 10
    window: int = 10
    seed: int = 0
    noise_std: float = 0.0
    noise_rule: str = ""
    model: str = ""
    fingerprint: str = ""
    corruption: str = "gaussian"
    metric: str = "prob"
    approx: str = ""  # "atp": estimates instead of exact restorations

    @classmethod
    def added_later(cls) -> dict:
        """Each field with a default: a settings.json written before the field existed is read as if
        it held the default (so that older runs resume)."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    @classmethod
    def with_defaults(cls, saved: dict) -> dict:
        """A run folder's settings.json as this class's fields (added_later; without the sessions)."""
        return with_added_later(saved, cls.added_later())

    @classmethod
    def folder(cls, out: str | Path) -> RunFolder:
        """A trace-avg run folder: settings.json checked against these settings, facts.jsonl."""
        return RunFolder(out, added_later=cls.added_later())


@dataclass
class AverageResult:
    settings: AverageSettings
    n_facts: int = 0
    n_correct: int = 0
    effects: dict[str, dict[str, RunningMean]] = field(default_factory=dict)  # kind -> class -> mean
    total_effect: RunningMean = field(default_factory=RunningMean)
    p_clean: RunningMean = field(default_factory=RunningMean)
    n_no_replacement: int = 0  # answered correctly, but no subject of the pool could replace theirs

    @property
    def n_skipped(self) -> int:
        """Facts whose top token was wrong."""
        return self.n_facts - self.n_correct - self.n_no_replacement

    def add(self, record: dict) -> None:
        self.n_facts += 1
        if "no_replacement" in record:
            self.n_no_replacement += 1
            return
        if not record["correct"]:
            return
        self.n_correct += 1
        self.total_effect.add(record["p_clean"] - record["p_corrupt"])
        self.p_clean.add(record["p_clean"])
        for kind, scores in record["scores"].items():
            indirect = np.asarray(scores) - record["p_corrupt"]
            for name, row in token_class_rows(indirect, tuple(record["subject_range"])).items():
                self.effects.setdefault(kind, {}).setdefault(name, RunningMean()).add(row)

    def to_dict(self) -> dict:
        return {
            "settings": asdict(self.settings), "n_facts": self.n_facts, "n_correct": self.n_correct,
            "n_skipped_wrong": self.n_skipped, "n_no_replacement": self.n_no_replacement,
            "total_effect": {"mean": float(self.total_effect.mean), "ci95": float(self.total_effect.ci95)},
            "p_clean": {"mean": float(self.p_clean.mean)},
            "effects": {kind: {name: {"mean": np.asarray(m.mean).tolist(), "ci95": np.asarray(m.ci95).tolist(),
                                      "count": m.count}
                               for name, m in classes.items()}
                        for kind, classes in self.effects.items()},
        }

    def markdown(self) -> str:
        """Peak layer and effect per kind and token class, and the per-layer curves of the two
        classes the paper discusses (last subject token, last token)."""
        s = self.settings
        unreplaced = (f", {self.n_no_replacement} had no replacement subject" if self.n_no_replacement else "")
        corruption = (f"noise std {s.noise_std:.4f} ({s.noise_rule})" if s.corruption == "gaussian"
                      else f"subject tokens replaced ({s.noise_rule})")
        measured = "" if s.metric == "prob" else f"; metric {s.metric} (effects in logits)"
        estimated = "" if not s.approx else f"; ESTIMATES ({s.approx}), not exact restorations"
        clean = "p_clean" if s.metric == "prob" else "clean metric"
        lines = [f"{self.n_correct} facts traced ({self.n_skipped} of {self.n_facts} read were skipped: wrong top "
                 f"token{unreplaced}); {corruption}, {s.samples} samples, window {s.window}, "
                 f"seed {s.seed}{measured}{estimated}; average total effect {float(self.total_effect.mean):.3f} "
                 f"+- {float(self.total_effect.ci95):.3f}, average {clean} {float(self.p_clean.mean):.3f}.", "",
                 "| kind | token class | peak layer | peak indirect effect (95% CI) | share of total effect |",
                 "|---|---|---|---|---|"]
        total = float(self.total_effect.mean)
        for kind, classes in self.effects.items():
            for name in TOKEN_CLASSES:
                if name in classes:
                    layer, value = self.peak(kind, name)
                    ci = float(np.asarray(classes[name].ci95)[layer])
                    lines.append(f"| {kind} | {name.replace('_', ' ')} | {layer} | {value:.3f} (+- {ci:.3f}) | "
                                 f"{value / total:.2f} |")
        n_layers = len(np.asarray(next(iter(next(iter(self.effects.values())).values())).mean))
        lines += ["", "Average indirect effect per layer:", "",
                  "| kind, token | " + " | ".join(str(i) for i in range(n_layers)) + " |",
                  "|---|" + "---|" * n_layers]
        for kind, classes in self.effects.items():
            for name in ("last_subject", "last"):
                if name in classes:
                    values = " | ".join(f"{v:.3f}" for v in np.asarray(classes[name].mean))
                    lines.append(f"| {kind}, {name.replace('_', ' ')} | {values} |")
        return "\n".join(lines)

    def peak(self, kind: str, token_class: str) -> tuple[int, float]:
        mean = np.asarray(self.effects[kind][token_class].mean)
        return int(mean.argmax()), float(mean.max())

    def site(self, kind: str, token_class: str, share: float = 0.9) -> list[int]:
        """The layers around the peak whose average effect is at least `share` of the peak's: the
        contiguous run of layers that the window-averaged curve cannot tell apart from the peak."""
        mean = np.asarray(self.effects[kind][token_class].mean)
        top, threshold = int(mean.argmax()), share * float(mean.max())
        low, high = top, top
        while low > 0 and mean[low - 1] >= threshold:
            low -= 1
        while high < len(mean) - 1 and mean[high + 1] >= threshold:
            high += 1
        return list(range(low, high + 1))


def fact_record(lm: LoadedModel, fact: KnownFact, kinds: list[str], settings: AverageSettings,
                progress: Callable[[int], None] | None = None, pool: list[tuple[str, str]] | None = None) -> dict:
    """One fact's heatmaps. pool: (subject, answer) pairs that --corrupt replace draws from."""
    top = _top_token(lm, fact.prompt)
    record = {"known_id": fact.known_id, "answer": top, "correct": answer_matches(top, fact.attribute), "scores": {}}
    if not record["correct"]:  # no corrupted runs for a fact that is skipped (nor a replacement to find)
        return record
    try:
        noise = settings.noise_std if settings.corruption == "gaussian" else None
        run = prepare(lm, fact.prompt, fact.subject, samples=settings.samples, noise=noise,
                      seed=settings.seed, corrupt=settings.corruption, replacements=pool, metric=settings.metric)
    except NoReplacement as err:
        return {**record, "no_replacement": str(err)}
    record.update({"answer": run.answer, "p_clean": run.p_clean, "p_corrupt": run.p_corrupt,
                   "subject_range": list(run.tokenized.subject_range), "tokens": run.tokenized.tokens})
    if run.replacements:
        record["replacements"] = run.replacements
    results = heatmaps(run, kinds, window=settings.window, approx=settings.approx or None,
                       progress=steps_only(progress))
    for kind, result in results.items():
        record["scores"][kind] = np.round(result.scores, 6).tolist()
    return record


def _top_token(lm: LoadedModel, prompt: str) -> str:
    with torch.no_grad():
        ids = torch.tensor([check_prompt_length(lm, prompt)], device=lm.device)
        logits, _ = last_token_logits(lm, ids)
    return lm.tokenizer.decode([int(logits[0].argmax())])


def average_effects(lm: LoadedModel, facts: list[KnownFact], kinds: str | list[str] = "all", *,
                    n: int | None = None, samples: int = 10, window: int = 10, seed: int = 0,
                    noise: float | None = None, corrupt: str = "gaussian", metric: str = "prob", approx: str = "",
                    out_dir: str | Path | None = None,
                    on_fact: Callable[[dict], None] | None = None,
                    progress: Callable[[int], None] | None = None,
                    records: Callable[..., Iterator[dict]] | None = None) -> AverageResult:
    """Trace the first `n` facts that the model answers correctly (wrong ones are counted and
    skipped) and average indirect effects per token class and layer.

    noise: absolute std; by default 3 x the std of the embeddings of all the facts' subjects (the
    paper's rule). corrupt="replace": each subject replaced by other subjects of the same facts
    (runs.prepare); metric: "prob" or "logit-diff"; approx="atp": estimates (atp.py).
    records: how the facts not yet traced become their records (fact_record), called as
    records(facts, kinds, settings, pool), yielded in the facts' order and read only as far as
    needed; by default one after another here. factedit.cluster passes one that traces them on
    several workers, so that facts.jsonl is the same either way.
    """
    kinds = expand_kinds(kinds)
    check_seed(seed)  # here, not at the first fact traced: settings.json is written before
    check_corruption(corrupt, noise)
    check_metric(metric)
    if approx:
        check_approx(approx, kinds)
    pool, noise_std, rule = _corruption(lm, facts, corrupt, noise)
    settings = AverageSettings(kinds=kinds, samples=samples, window=window, seed=seed, noise_std=noise_std,
                               noise_rule=rule, model=lm.name, fingerprint=lm.fingerprint, corruption=corrupt,
                               metric=metric, approx=approx)
    folder, done = _resume(out_dir, settings)  # holds the folder's lock: one run in it at a time
    try:
        todo = (fact for fact in facts if fact.known_id not in done)
        computed = iter(records(todo, kinds, settings, pool) if records is not None
                        else (fact_record(lm, fact, kinds, settings, progress, pool) for fact in todo))
        return _average(facts, n, done, computed, AverageResult(settings), folder, on_fact)
    finally:
        if folder is not None:
            folder.release()


def _corruption(lm: LoadedModel, facts: list[KnownFact], corrupt: str, noise: float | None
                ) -> tuple[list[tuple[str, str]] | None, float, str]:
    """The replacement pool (corrupt="replace": the facts' (subject, answer) pairs), the noise std and
    how it was chosen (AverageSettings.noise_rule)."""
    if corrupt == "replace":
        return [(f.subject, f.attribute) for f in facts], 0.0, \
            f"by subjects of the same token length from the {len(facts)} facts"
    if noise is None:
        return None, 3 * embedding_std(lm, [f.subject for f in facts]), "3 x std of subject-token embeddings"
    return None, float(noise), "given"


def _resume(out_dir: str | Path | None, settings: AverageSettings) -> tuple[RunFolder | None, dict[int, dict]]:
    """The run folder (None: no `out_dir`), started with `settings`, and the records of the facts it
    holds already, by known_id."""
    if out_dir is None:
        return None, {}
    folder = AverageSettings.folder(out_dir)
    folder.start(asdict(settings))
    # A line cut off by a kill is skipped (and reported): that fact is traced again.
    done = {r["known_id"]: r for r in folder.records(FACTS_FILE) if isinstance(r, dict) and "known_id" in r}
    (folder.path / FACTS_FILE).touch()  # the folder reads as a run (trace-compare) before its first fact
    return folder, done


def _average(facts: list[KnownFact], n: int | None, done: dict[int, dict], computed: Iterator[dict],
             result: AverageResult, folder: RunFolder | None, on_fact: Callable[[dict], None] | None) -> AverageResult:
    """Add the facts' records to `result` in the facts' order, until `n` were answered correctly:
    those `done` before, else the next of `computed` (appended to the folder's facts.jsonl). The
    records not needed are never computed: `computed` is closed at the end."""
    try:
        for fact in facts:
            if n is not None and result.n_correct >= n:
                break
            record = done.get(fact.known_id)
            if record is None:
                record = next(computed)
                if folder is not None:
                    folder.append(FACTS_FILE, record)
            result.add(record)
            if on_fact:
                on_fact(record)
    finally:
        if hasattr(computed, "close"):  # stop the work on facts that are no longer needed
            computed.close()
    return result
