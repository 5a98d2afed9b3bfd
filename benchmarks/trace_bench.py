"""Batched causal tracing vs the naive loop (one forward pass per heatmap cell), and attribution
patching vs both, same process.

    python benchmarks/trace_bench.py [--model smollm2-135m] [--kinds hidden,mlp,attn] [--repeats 3]
                                     [--naive-repeats 1] [--compare-dtype bfloat16]

Prints, per kind: median seconds of the exact batched trace and of the naive loop, the ratio, and the
max abs difference of the heatmaps (--naive-repeats 0 skips the naive loop). Then one line
"atp ... speed-up Nx": the three estimated heatmaps (one forward and backward pass, trace --approx
atp) against the exact batched trace of the same kinds, both from the prepared clean and corrupted
runs. With --compare-dtype, the exact trace again with the model loaded in that dtype: its time per
kind and the difference of every cell from the float32 heatmap (same noise).
"""

from __future__ import annotations

import argparse
import json

import torch
from common import timed

from factedit import load
from factedit.trace.atp import estimated_heatmaps
from factedit.trace.restore import heatmap_cells, restored_probs, restored_probs_naive
from factedit.trace.runs import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--subject", default="The Eiffel Tower")
    parser.add_argument("--kinds", default="hidden,mlp,attn")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast version (median)")
    parser.add_argument("--naive-repeats", type=int, default=1, help="0: skip the naive loop")
    parser.add_argument("--compare-dtype", default=None, help="also trace in this dtype (e.g. bfloat16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load(args.model)
    run = prepare(lm, args.prompt, args.subject, samples=args.samples, seed=0)
    print(f"model {args.model}: {run.n_tokens} tokens x {lm.n_layers} layers x {args.samples} samples, "
          f"{args.threads} threads; answer {run.answer!r} p_clean {run.p_clean:.4f} p_corrupt {run.p_corrupt:.4f}")
    rows, exact = [], {}
    kinds = args.kinds.split(",")
    for kind in kinds:
        cells = heatmap_cells(kind, run.n_tokens, lm.n_layers, args.window)
        t_fast, exact[kind] = timed(lambda: restored_probs(run, cells), args.repeats)
        row = {"kind": kind, "cells": len(cells), "batched_s": t_fast}
        line = f"{kind:>14}: exact batched {t_fast:7.2f} s"
        if args.naive_repeats > 0:
            t_naive, naive = timed(lambda: restored_probs_naive(run, cells), args.naive_repeats)
            diff = float((exact[kind] - naive).abs().max())
            row.update({"naive_s": t_naive, "speedup": t_naive / t_fast, "max_abs_diff": diff})
            line += f"   naive {t_naive:7.2f} s   speed-up {t_naive / t_fast:5.1f}x   max |diff| {diff:.2e}"
        rows.append(row)
        print(line, flush=True)
    t_atp, estimates = timed(lambda: estimated_heatmaps(run, kinds, window=args.window), args.repeats)
    t_exact = sum(row["batched_s"] for row in rows)
    agree = ", ".join(f"{k} {'yes' if int(exact[k].argmax()) == int(estimates[k].scores.argmax()) else 'no'}"
                      for k in kinds)
    print(f"atp ({','.join(kinds)}): {t_atp:.2f} s   exact batched: {t_exact:.2f} s   speed-up {t_exact / t_atp:.0f}x   "
          f"(estimate's peak cell is the exact one: {agree})", flush=True)
    result = {"model": args.model, "prompt": args.prompt, "threads": args.threads, "rows": rows,
              "atp_s": t_atp, "atp_speedup": t_exact / t_atp}
    if args.compare_dtype:
        other = load(args.model, dtype=args.compare_dtype)
        other_run = prepare(other, args.prompt, args.subject, samples=args.samples, seed=0)
        result["dtype"] = {"dtype": args.compare_dtype, "rows": []}
        for row in rows:
            kind = row["kind"]
            cells = heatmap_cells(kind, other_run.n_tokens, other.n_layers, args.window)
            seconds, scores = timed(lambda: restored_probs(other_run, cells), args.repeats)
            diff = (scores - exact[kind]).abs()
            peak_same = int(scores.argmax()) == int(exact[kind].argmax())
            result["dtype"]["rows"].append({"kind": kind, "seconds": seconds, "float32_seconds": row["batched_s"],
                                            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                                            "peak_same": peak_same})
            print(f"{kind:>14}: {args.compare_dtype} {seconds:7.2f} s   float32 {row['batched_s']:7.2f} s   "
                  f"speed-up {row['batched_s'] / seconds:4.2f}x   max |diff| {float(diff.max()):.4f}   "
                  f"mean |diff| {float(diff.mean()):.5f}   peak cell {'same' if peak_same else 'differs'}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
