"""How many value-optimisation steps do ROME edits need to converge? Steps to reach the early-stop
loss on the first N records of a dataset, run with a generous budget.

    python benchmarks/convergence.py --model smollm2-135m --dataset zsre --n 50 --max-steps 200

Prints, per budget (20 = the reference's setting for GPT-2 XL), the share of records that would
have converged within it, and the percentiles of the steps needed. The value step of several
requests runs in one batch (`--batch`), which gives each request the result it gets alone.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from common import data_dir

from factedit import load
from factedit.edit import RomeSettings
from factedit.edit.prefixes import context_templates
from factedit.edit.rome import compute_keys, update_left, update_shares
from factedit.edit.value import compute_value_deltas
from factedit.evaluate.datasets import get_dataset
from factedit.stats import key_statistics


def steps_to_converge(lm, records, settings, templates, batch: int) -> list[dict]:
    """ROME's value step (consistent keys) as `rome_delta` runs it, several requests per batch."""
    C = key_statistics(lm, settings)[0].matrix if settings.value_through_update else None
    found = []
    for start in range(0, len(records), batch):
        chunk = [r.request for r in records[start:start + batch]]
        keys = [compute_keys(lm, settings.layer, request, templates) for request in chunk]
        inits = torch.stack([k.v_avg for k in keys])
        shares = ([update_shares(lm, request, settings, k, update_left(C, k.k_avg, k.k_avg, settings.ridge))
                   for request, k in zip(chunk, keys)] if C is not None else None)
        results = compute_value_deltas(lm, settings.layer, chunk, templates, settings, inits, row_scales=shares)
        for record, result in zip(records[start:start + batch], results):
            found.append({"case_id": record.case_id, "target": record.request.target_new, "steps": result.steps,
                          "final_loss": result.losses[-1], "converged": result.converged})
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="counterfact")
    parser.add_argument("--data", default=None, help=f"the dataset's file (default: from {data_dir()})")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--early-stop-on", default="nll", help="nll (default) or total (the reference's criterion)")
    parser.add_argument("--out", default=None, help="write the per-record steps to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model)
    settings = RomeSettings.defaults_for(lm, args.layer, v_steps=args.max_steps, early_stop_on=args.early_stop_on,
                                         stats_corpus=os.environ.get("FACTEDIT_STATS_CORPUS"))
    templates = context_templates(lm, settings)
    records = get_dataset(args.dataset).load(args.data, args.n)
    found = steps_to_converge(lm, records, settings, templates, args.batch)
    steps = np.array([f["steps"] if f["converged"] else np.inf for f in found])
    print(f"{args.model} layer {settings.layer}, {args.dataset}, {len(found)} records, early stop when the "
          f"{settings.early_stop_on} loss < {settings.early_stop_loss}, at most {args.max_steps} steps")
    for budget in (20, 25, 40, 60, 80, 100, 150, 200, 300):
        if budget <= args.max_steps:
            print(f"  converged within {budget:3d} steps: {np.mean(steps <= budget):6.1%}")
    done = steps[np.isfinite(steps)]
    if len(done):
        print(f"  steps of the converged: median {np.median(done):.0f}, 90th percentile "
              f"{np.percentile(done, 90):.0f}, max {done.max():.0f}")
    slow = [f for f in found if not f["converged"]]
    print(f"  not converged within {args.max_steps}: {len(slow)} "
          + ", ".join(f"{f['case_id']} ({f['final_loss']:.2f})" for f in slow))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(found, handle, indent=1)


if __name__ == "__main__":
    main()
