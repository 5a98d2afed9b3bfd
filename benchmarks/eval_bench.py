"""Evaluation speed: batched record scoring vs prompt-by-prompt, and runner throughput.

    python benchmarks/eval_bench.py [--model smollm2-135m] [--n 20] [--memit-edits 0]

Prints the median seconds to score one CounterFact record with all its prompts in one batch vs one
forward pass per (prompt, target), their ratio and the largest probability difference; records
per second of the runner for `none` and `rome`; and, with --memit-edits N, the time for N MEMIT
edits from counterfact_lite.json.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import data_file, timed

from factedit import load
from factedit.data import load_counterfact
from factedit.edit import edit, get_method
from factedit.evaluate.datasets import counterfact_probabilities
from factedit.evaluate.runner import run_evaluation
from factedit.scoring import target_logprobs


def one_by_one(lm, record):
    groups = {"rewrite": [record.request.text], "paraphrase": record.paraphrase_prompts,
              "neighborhood": record.neighborhood_prompts}
    out = {"p_new": {}, "p_true": {}}
    for key, target in (("p_new", record.request.target_new), ("p_true", record.request.target_true)):
        for group, prompts in groups.items():
            out[key][group] = [float(target_logprobs(lm, [p], [target]).exp()[0]) for p in prompts]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=data_file("counterfact", "counterfact_dev.json"))
    parser.add_argument("--lite", default=data_file("counterfact", "counterfact_lite.json"))
    parser.add_argument("--n", type=int, default=10, help="records for the runner throughput")
    parser.add_argument("--memit-edits", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model)
    records = load_counterfact(args.data, args.n)
    scored = records[:5]
    t_batch, batched = timed(lambda: [counterfact_probabilities(lm, r) for r in scored], 3)
    t_single, single = timed(lambda: [one_by_one(lm, r) for r in scored], 1)
    diff = max(abs(a - b) for x, y in zip(batched, single) for k in ("p_new", "p_true") for g in x[k]
               for a, b in zip(x[k][g], y[k][g]))
    print(f"score one record (22 prompt/target pairs): batched {t_batch / len(scored):.3f} s, one by one {t_single / len(scored):.3f} s, "
          f"speed-up {t_single / t_batch:.1f}x, max |difference| {diff:.1e}")
    for method in ("none", "rome"):
        with tempfile.TemporaryDirectory() as out:
            seconds, _ = timed(lambda: run_evaluation(lm, method, "counterfact", out, data=args.data, n=args.n), 1)
        print(f"runner, {method}: {args.n} records in {seconds:.1f} s = {args.n / seconds:.2f} records/s")
    if args.memit_edits:
        requests = [r.request for r in load_counterfact(args.lite, args.memit_edits)]
        settings = get_method("memit").defaults(lm)
        seconds, _ = timed(lambda: edit(lm, requests, "memit", settings), 1)
        print(f"MEMIT: {len(requests)} edits in {seconds:.1f} s")


if __name__ == "__main__":
    main()
