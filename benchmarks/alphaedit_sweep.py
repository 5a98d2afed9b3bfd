"""The lifelong editors' knobs on a few batches in a row (AlphaEdit's by default, ENCORE's with
--method encore): each configuration run as `factedit eval --sequential` would run it (resumable run
folders under OUT), next to the default.

    python benchmarks/alphaedit_sweep.py --model smollm2-135m --threads 1 --n 300 \
        --corpus ../shared/data/wiki/enwiki_sample.jsonl --data ../shared/data/counterfact/counterfact_lite.json \
        --out docs/results/lifelong/sweep
    python benchmarks/alphaedit_sweep.py --method encore --n 100 --start 2000 ... --out docs/results/lifelong/encore-sweep

Each configuration is the method's default settings with the overrides named in CONFIGS (its name
says which; "preset" names settings such as "paper"). The first batch of every configuration with
the default layers and target settings reuses the same cached targets (they are computed on the
unedited model); later batches are computed on each model as its own earlier batches left it. Prints
the lifelong table (edits kept, perplexity, known facts kept, norm growth after each batch) and
ES/PS/NS of all cases after the last batch.
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
    "alphaedit": {
        "default": {},
        "l2-0.1": {"l2": 0.1},
        "share-0.05-l2-1.0": {"null_space_threshold": 0.05, "l2": 1.0},
        "layers-2-8": {"layers": [2, 3, 4, 5, 6, 7, 8]},
        "preserve-10": {"preserve_weight": 10.0},
        # the two knobs that kept the most edits (l2 0.1) and the most known facts (layers 2-8), together
        "layers-2-8-l2-0.1": {"layers": [2, 3, 4, 5, 6, 7, 8], "l2": 0.1},
    },
    "encore": {
        "default": {},
        "norm-0.1": {"norm_lambda": 0.1},
        "norm-2": {"norm_lambda": 2.0},
        "no-mpes": {"early_stop_on": "nll"},  # ENCORE's solve with the targets every other editor has
        "paper": {"preset": "paper"},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="alphaedit", choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--known", default=None, help=f"known facts (default: {data_dir()}/known_1000.json)")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--start", type=int, default=0, help="skip this many records first (choose settings on "
                                                             "records the reported sequence never edits)")
    parser.add_argument("--edits-per-batch", type=int, default=100)
    parser.add_argument("--configs", default=None, help="some of the method's CONFIGS, comma-separated (default: all)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/lifelong/sweep"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model)
    known = load_known_facts(args.known)
    held_out = held_out_corpus(args.corpus)
    summaries, points = {}, {}
    configs = CONFIGS[args.method]
    for name in args.configs.split(",") if args.configs else configs:
        if name not in configs:
            parser.error(f"{args.method} has no configuration {name!r}; choose from {', '.join(configs)}")
        overrides = dict(configs[name])
        settings = get_method(args.method).settings_with(lm, stats_corpus=args.corpus,
                                                         preset=overrides.pop("preset", "default"), **overrides)
        summaries[name] = run_evaluation(lm, args.method, "counterfact", args.out / name, data=args.data, n=args.n,
                                         start=args.start,
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
