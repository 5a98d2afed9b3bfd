"""What bfloat16 changes and gains against float32, on one device: tracing cells, key statistics,
ROME and MEMIT on CounterFact records, and the time of each.

    python benchmarks/precision_bench.py --model smollm2-135m --threads 1 --n 20 \
        --corpus ../shared/data/wiki/enwiki_sample.jsonl --data ../shared/data/counterfact/counterfact_dev.json \
        --out docs/results/precision

In half precision the forward passes run in that dtype; the statistics' accumulation, the solves,
the optimised values and the edits' factors stay float32/float64 (the library does this whatever
the dtype). Tracing: the Eiffel Tower heatmaps (all kinds) in each dtype, max and mean absolute
difference of the cells' p(answer). Statistics: C at ROME's layer over `--stats-tokens` tokens,
collected into a fresh cache folder in each dtype (timed), relative Frobenius difference. Edits:
`factedit eval` of the first `--n` records with each method and dtype (run folders under OUT,
resumable), ES/PS/NS and the median seconds per edit. Everything lands in OUT/precision.json, and a
markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from common import timed

from factedit import load
from factedit.edit import get_method
from factedit.evaluate.runner import run_evaluation
from factedit.stats import corpus_from, second_moment
from factedit.trace import trace

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
DTYPES = ("float32", "bfloat16")


def trace_part(models: dict, samples: int) -> dict:
    results, seconds = {}, {}
    for dtype, lm in models.items():
        took, results[dtype] = timed(lambda: trace(lm, PROMPT, SUBJECT, "all", samples=samples), 1)
        seconds[dtype] = round(took, 2)
    out = {"seconds": seconds}
    for kind in results["float32"]:
        a = torch.tensor(results["float32"][kind].scores)
        b = torch.tensor(results["bfloat16"][kind].scores)
        out[kind] = {"max_abs_diff": float((a - b).abs().max()), "mean_abs_diff": float((a - b).abs().mean()),
                     "peak_float32": list(results["float32"][kind].peak()[:2]),
                     "peak_bfloat16": list(results["bfloat16"][kind].peak()[:2])}
    return out


def stats_part(models: dict, corpus: str, tokens: int, layer: int) -> dict:
    matrices, seconds = {}, {}
    for dtype, lm in models.items():
        with tempfile.TemporaryDirectory() as fresh:
            took, matrices[dtype] = timed(lambda: second_moment(lm, layer, corpus_from(corpus), tokens,
                                                                cache_dir=Path(fresh))[0].matrix, 1)
            seconds[dtype] = round(took, 2)
    a, b = matrices["float32"], matrices["bfloat16"]
    return {"layer": layer, "tokens": tokens, "seconds": seconds,
            "relative_difference": float((a - b).norm() / a.norm())}


def edit_part(models: dict, method: str, corpus: str, data: str, n: int, out: Path) -> dict:
    rows = {}
    for dtype, lm in models.items():
        settings = get_method(method).settings_with(lm, stats_corpus=corpus)
        folder = out / f"{dtype}-{method}"
        summary = run_evaluation(lm, method, "counterfact", folder, data=data, n=n, settings=settings)
        seconds = [json.loads(p.read_text())["edit_seconds"] for p in sorted((folder / "cases").glob("*.json"))]
        rows[dtype] = {**{m: summary["post"][m]["mean"] for m in ("ES", "PS", "NS")},
                       "not_converged": summary.get("not_converged"),
                       "median_edit_seconds": round(statistics.median(seconds), 2)}
    return rows


def kept(path: Path, compute) -> dict:
    """A part's result from an earlier run of the same command, else computed and kept (a killed
    benchmark resumes; the edits resume from their run folders)."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=1))
    return value


def table(result: dict) -> str:
    lines = ["| part | float32 | bfloat16 | difference |", "|---|---|---|---|"]
    t = result["trace"]
    for kind in ("hidden", "mlp", "attn"):
        lines.append(f"| trace {kind}: peak (token, layer) | {t[kind]['peak_float32']} | {t[kind]['peak_bfloat16']} | "
                     f"max {t[kind]['max_abs_diff']:.4f}, mean {t[kind]['mean_abs_diff']:.5f} |")
    lines.append(f"| trace, all kinds (s) | {t['seconds']['float32']} | {t['seconds']['bfloat16']} | |")
    s = result["stats"]
    lines.append(f"| statistics, layer {s['layer']}, {s['tokens']:,} tokens (s) | {s['seconds']['float32']} | "
                 f"{s['seconds']['bfloat16']} | relative ‖ΔC‖ {s['relative_difference']:.4f} |")
    for method, rows in result["edits"].items():
        a, b = rows["float32"], rows["bfloat16"]
        for metric in ("ES", "PS", "NS"):
            lines.append(f"| {method} {metric} | {a[metric]:.1f} | {b[metric]:.1f} | {b[metric] - a[metric]:+.1f} |")
        lines.append(f"| {method} median s/edit | {a['median_edit_seconds']} | {b['median_edit_seconds']} | "
                     f"x{b['median_edit_seconds'] / a['median_edit_seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10, help="noise samples for tracing")
    parser.add_argument("--stats-tokens", type=int, default=20_000)
    parser.add_argument("--methods", default="rome,memit")
    parser.add_argument("--out", type=Path, default=Path("docs/results/precision"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {dtype: load(args.model, device=args.device, dtype=dtype) for dtype in DTYPES}
    layer = get_method("rome").defaults(models["float32"]).layer
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(), "n": args.n,
              "trace": kept(args.out / "trace.json", lambda: trace_part(models, args.samples)),
              "stats": kept(args.out / "stats.json", lambda: stats_part(models, args.corpus, args.stats_tokens, layer)),
              "edits": {m: edit_part(models, m, args.corpus, args.data, args.n, args.out)
                        for m in args.methods.split(",")}}
    (args.out / "precision.json").write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
