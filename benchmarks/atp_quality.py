"""How good attribution patching is: estimates against the exact heatmaps of facts already traced.

    python benchmarks/atp_quality.py --exact docs/results/avg-smollm2 --facts ../shared/data/known_1000.json \
        --threads 2 --out docs/results/atp-smollm2

Reads a `factedit trace-avg` folder (settings.json, facts.jsonl with every fact's exact heatmaps),
prepares each traced fact again with the same noise (same std, samples and seed: the same corrupted
runs), estimates its heatmaps (trace --approx atp) and compares, per kind:
* the Spearman rank correlation of estimate and exact over the cells from the first subject token on
  (earlier cells are p_corrupt in both, by construction), per fact;
* whether the estimate's peak cell is the exact peak, and whether the exact peak is among the
  estimate's top 5 (what `--refine 5` would confirm);
* the estimated effect at the exact peak cell as a share of the exact effect (below 1: the estimate
  underestimates there, e.g. a saturated softmax).
Writes quality.json, quality.md, the average-effect figure drawn from the estimates
(average_atp.png/.svg, to set beside the exact one), and the heatmaps of the fact where the
estimate ranks worst (worst_<kind>_exact/atp.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from common import Stopwatch
from scipy.stats import spearmanr

from factedit import load
from factedit.data.known import load_known_facts
from factedit.trace.atp import estimated_heatmaps
from factedit.trace.average import AverageResult, AverageSettings
from factedit.trace.heatmap import TraceResult
from factedit.trace.plot import plot_average, plot_heatmap
from factedit.trace.runs import prepare


def compare(exact: np.ndarray, estimate: np.ndarray, start: int) -> dict:
    """Agreement of one fact's estimated heatmap with its exact one (tokens x layers)."""
    ex, est = exact[start:].ravel(), estimate[start:].ravel()
    peak = int(ex.argmax())
    top5 = set(np.argsort(-est, kind="stable")[:5].tolist())
    rho = spearmanr(ex, est).statistic if np.ptp(ex) > 0 and np.ptp(est) > 0 else float("nan")
    return {"spearman": float(rho), "peak_agrees": int(est.argmax()) == peak, "peak_in_top5": peak in top5,
            "peak": np.unravel_index(peak, exact[start:].shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exact", required=True, help="a trace-avg output folder (settings.json, facts.jsonl)")
    parser.add_argument("--facts", required=True, help="the known-facts JSON that trace-avg read")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N traced facts")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    exact_dir, out = Path(args.exact), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = AverageSettings(**AverageSettings.with_defaults(json.loads((exact_dir / "settings.json").read_text())))
    records = [json.loads(line) for line in (exact_dir / "facts.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if r["correct"]][: args.limit]
    facts = {f.known_id: f for f in load_known_facts(args.facts)}
    lm = load(args.model)
    if lm.fingerprint != settings.fingerprint:
        sys.exit(f"{args.model} has weights {lm.fingerprint}; the exact run traced {settings.fingerprint}")

    kinds = settings.kinds
    per_kind: dict[str, list[dict]] = {kind: [] for kind in kinds}
    estimated = AverageResult(AverageSettings(**{**settings.__dict__, "approx": "atp"}))
    seconds, worst = [], {kind: (2.0, None) for kind in kinds}
    for i, record in enumerate(records):
        fact = facts[record["known_id"]]
        with Stopwatch() as clock:
            run = prepare(lm, fact.prompt, fact.subject, samples=settings.samples, noise=settings.noise_std,
                          seed=settings.seed)
            results = estimated_heatmaps(run, kinds, window=settings.window)
        seconds.append(clock.seconds)
        if abs(run.p_corrupt - record["p_corrupt"]) > 1e-4:
            sys.exit(f"fact {fact.known_id}: p_corrupt {run.p_corrupt} differs from the exact run's "
                     f"{record['p_corrupt']}: not the same corrupted runs")
        start = run.tokenized.subject_range[0]
        for kind in kinds:
            exact = np.asarray(record["scores"][kind])
            row = compare(exact, results[kind].scores, start)
            effect = exact.max() - record["p_corrupt"]
            t, l = row.pop("peak")
            row["share_at_peak"] = float((results[kind].scores[start + t, l] - run.p_corrupt) / effect) \
                if effect > 0.01 else float("nan")
            row["known_id"] = fact.known_id
            per_kind[kind].append(row)
            if row["spearman"] < worst[kind][0]:
                worst[kind] = (row["spearman"], (record, results[kind]))
        estimated.add({**record, "scores": {k: r.scores.tolist() for k, r in results.items()}})
        print(f"\r{i + 1}/{len(records)} facts", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    summary = {"model": args.model, "facts": len(records), "settings": settings.__dict__,
               "seconds_per_fact_median": statistics.median(seconds), "kinds": {}}
    lines = [f"{len(records)} facts of `{exact_dir}` ({args.model}, {settings.samples} noise samples, window "
             f"{settings.window}); attribution patching: median {summary['seconds_per_fact_median']:.2f} s per fact "
             f"for the {len(kinds)} kinds (corrupted runs included), {args.threads} threads.", "",
             "| kind | Spearman, median (IQR) | peak cell agrees | exact peak in estimate's top 5 | "
             "estimate / exact effect at the exact peak, median (IQR) |",
             "|---|---|---|---|---|"]
    for kind in kinds:
        rows = per_kind[kind]
        rho = np.array([r["spearman"] for r in rows if not np.isnan(r["spearman"])])
        share = np.array([r["share_at_peak"] for r in rows if not np.isnan(r["share_at_peak"])])
        entry = {"spearman_median": float(np.median(rho)), "spearman_q1": float(np.percentile(rho, 25)),
                 "spearman_q3": float(np.percentile(rho, 75)),
                 "peak_agrees": float(np.mean([r["peak_agrees"] for r in rows])),
                 "peak_in_top5": float(np.mean([r["peak_in_top5"] for r in rows])),
                 "share_median": float(np.median(share)), "share_q1": float(np.percentile(share, 25)),
                 "share_q3": float(np.percentile(share, 75)), "per_fact": rows}
        summary["kinds"][kind] = entry
        lines.append(f"| {kind} | {entry['spearman_median']:.2f} ({entry['spearman_q1']:.2f}-{entry['spearman_q3']:.2f}) "
                     f"| {entry['peak_agrees']:.0%} | {entry['peak_in_top5']:.0%} | {entry['share_median']:.2f} "
                     f"({entry['share_q1']:.2f}-{entry['share_q3']:.2f}) |")
    (out / "quality.json").write_text(json.dumps(summary, indent=1, default=float))
    plot_average(estimated, out / "average_atp")
    (out / "average_atp.md").write_text(estimated.markdown() + "\n")
    for kind, (rho, (record, estimate)) in worst.items():
        exact = TraceResult(**{**estimate.__dict__, "scores": np.asarray(record["scores"][kind]), "approx": ""})
        plot_heatmap(exact, out / f"worst_{kind}_exact")
        plot_heatmap(estimate, out / f"worst_{kind}_atp")
        lines.append(f"\nWorst {kind} ranking: known fact {record['known_id']} ({''.join(record['tokens'])!r}), "
                     f"Spearman {rho:.2f}: worst_{kind}_exact.png against worst_{kind}_atp.png")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
