"""Every editing method on one fact (Eiffel Tower: Paris -> Rome), default settings: a sanity table,
not a benchmark.

    python benchmarks/one_fact_methods.py [--model smollm2-135m] [--corpus FILE]
"""

from __future__ import annotations

import argparse
import os

import torch
from common import data_file, timed

from factedit import load
from factedit.edit import METHODS, EditRequest, EditStack, edit, get_method
from factedit.scoring import target_probs

CHECKS = [("The Eiffel Tower is located in the city of", " Rome"),
          ("Where is the Eiffel Tower? It is in the city of", " Rome"),
          ("The capital of France is", " Paris")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default=data_file("wiki", "enwiki_sample.jsonl"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("FACTEDIT_STATS_CORPUS", args.corpus)
    lm = load(args.model)
    request = EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    print("| method | layers | p(Rome), prompt | p(Rome), paraphrase | p(Paris), capital of France | seconds |")
    print("|---|---|---|---|---|---|")
    for name in METHODS:
        settings = get_method(name).defaults(lm)
        seconds, (delta, _) = timed(lambda: edit(lm, request, name, settings), 1)
        stack = EditStack(lm)
        stack.apply(delta)
        probs = target_probs(lm, [p for p, _ in CHECKS], [t for _, t in CHECKS])
        stack.revert()
        prefix = len(lm.arch.blocks_name) + 1
        where = sorted({int(n[prefix:].split(".")[0]) for n in delta.changes}) if delta.changes else "-"
        print(f"| {name} | {where} | " + " | ".join(f"{p:.3f}" for p in probs) + f" | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
