"""Batched causal tracing vs. the naive loop (one forward pass per heatmap cell), same process.

    python benchmarks/trace_bench.py [--model smollm2-135m] [--kinds hidden,mlp,attn] [--repeats 3]

Prints, per kind: median seconds of each, the ratio, and the max abs difference of the heatmaps.
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import timed

from factedit import load
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
    parser.add_argument("--naive-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load(args.model)
    run = prepare(lm, args.prompt, args.subject, samples=args.samples, seed=0)
    print(f"model {args.model}: {run.n_tokens} tokens x {lm.n_layers} layers x {args.samples} samples, "
          f"{args.threads} threads; answer {run.answer!r} p_clean {run.p_clean:.4f} p_corrupt {run.p_corrupt:.4f}")
    rows = []
    for kind in args.kinds.split(","):
        cells = heatmap_cells(kind, run.n_tokens, lm.n_layers, args.window)
        t_fast, fast = timed(lambda: restored_probs(run, cells), args.repeats)
        t_naive, naive = timed(lambda: restored_probs_naive(run, cells), args.naive_repeats)
        diff = float((fast - naive).abs().max())
        rows.append({"kind": kind, "cells": len(cells), "batched_s": t_fast, "naive_s": t_naive,
                     "speedup": t_naive / t_fast, "max_abs_diff": diff})
        print(f"{kind:>14}: batched {t_fast:7.2f} s   naive {t_naive:7.2f} s   "
              f"speed-up {t_naive / t_fast:5.1f}x   max |diff| {diff:.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "prompt": args.prompt, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
