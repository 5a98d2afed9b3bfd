"""AlphaEdit's knobs on a few batches in a row: the null-space rule, l2 and the layers, each run as
`factedit eval --sequential` would run it (resumable run folders under OUT), next to the default.

    python benchmarks/alphaedit_sweep.py --model smollm2-135m --threads 1 --n 300 \
        --corpus ../shared/data/wiki/enwiki_sample.jsonl --data ../shared/data/counterfact/counterfact_lite.json \
        --out docs/results/lifelong/sweep

Each configuration is the default settings with the overrides named in CONFIGS (its name says
which). The first batch of every configuration with the default layers reuses the same cached
targets (they are computed on the unedited model); later batches are computed on each model as its
own earlier batches left it. Prints the lifelong table (edits kept, perplexity, known facts kept,
norm growth after each batch) and ES/PS/NS of all cases after the last batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import data_dir

from factedit import load
from factedit.data.known import load_known_facts
from factedit.edit import get_method
from factedit.evaluate.runner import run_evaluation
from factedit.evaluate.sequential import lifelong_table, read_points
from factedit.stats import held_out_corpus

CONFIGS = {
    "default": {},
    "l2-0.1": {"l2": 0.1},
    "share-0.05-l2-1.0": {"null_space_threshold": 0.05, "l2": 1.0},
    "layers-2-8": {"layers": [2, 3, 4, 5, 6, 7, 8]},
    "preserve-10": {"preserve_weight": 10.0},
    # the two knobs that kept the most edits (l2 0.1) and the most known facts (layers 2-8), together
    "layers-2-8-l2-0.1": {"layers": [2, 3, 4, 5, 6, 7, 8], "l2": 0.1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--known", default=None, help=f"known facts (default: {data_dir()}/known_1000.json)")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--edits-per-batch", type=int, default=100)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"some of {', '.join(CONFIGS)}")
    parser.add_argument("--out", type=Path, default=Path("docs/results/lifelong/sweep"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model)
    known = load_known_facts(args.known)
    held_out = held_out_corpus(args.corpus)
    summaries, points = {}, {}
    for name in args.configs.split(","):
        settings = get_method("alphaedit").settings_with(lm, stats_corpus=args.corpus, **CONFIGS[name])
        summaries[name] = run_evaluation(lm, "alphaedit", "counterfact", args.out / name, data=args.data, n=args.n,
                                         edits_per_batch=args.edits_per_batch, settings=settings, sequential=True,
                                         held_out=held_out, known=known)
        found = read_points(args.out / name)
        points[name] = [found[b] for b in sorted(found)]
    print(lifelong_table(points))
    print("\nAll cases after the last batch:\n\n| config | ES | PS | NS |\n|---|---|---|---|")
    for name, summary in summaries.items():
        final = summary.get("final", summary["post"])
        print(f"| {name} | {final['ES']['mean']:.1f} | {final['PS']['mean']:.1f} | {final['NS']['mean']:.1f} |")


if __name__ == "__main__":
    main()
