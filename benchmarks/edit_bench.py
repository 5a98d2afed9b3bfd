"""ROME edit speed: cached value optimisation vs the full-forward reference, same process; and the
cost of running the value optimisation to convergence instead of the reference's fixed budget.

    python benchmarks/edit_bench.py [--model smollm2-135m] [--repeats 3] [--corpus FILE] [--records 10]

Prints the median edit time of each, their ratio, the relative difference of the resulting
updates, and the key-statistics throughput with early stopping vs a full forward pass. With
`--records N`: the time per edit (median and 90th percentile), steps and convergence on the first N
CounterFact and zsRE records with the "paper" settings (20 steps, the reference's criterion) and the
defaults (to convergence of the target's NLL, at most 100 steps), alternating record by record so
that both see the same machine load.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from common import data_file, mlp_keys, timed

from factedit import load
from factedit.edit import EditRequest, RomeSettings, get_method
from factedit.edit.prefixes import context_templates
from factedit.edit.rome import rome_delta
from factedit.evaluate.datasets import get_dataset
from factedit.stats import corpus_from, key_statistics, token_chunks


def stats_throughput(lm, layer, corpus, n_tokens=16_384, chunk=256, batch=8):
    """Tokens per second collecting keys: stopping after the edit layer vs running the whole model."""
    chunks = list(token_chunks(lm, corpus, n_tokens, chunk))

    def run(stop):
        for i in range(0, len(chunks), batch):
            ids = torch.tensor([c for c in chunks[i:i + batch] if len(c) == chunk])
            if len(ids):
                mlp_keys(lm, ids, [layer], stop=stop)
    total = sum(len(c) for c in chunks)
    t_stop, _ = timed(lambda: run(True), 1)
    t_full, _ = timed(lambda: run(False), 1)
    return total / t_stop, total / t_full


def budget_costs(lm, C, args, n_records: int) -> None:
    """Seconds per edit with the paper's budget and with the default convergence criterion."""
    variants = {name: get_method("rome").settings_with(lm, args.layer, preset=name, stats_corpus=args.corpus,
                                                       stats_tokens=args.stats_tokens) for name in ("paper", "default")}
    templates = {name: context_templates(lm, settings) for name, settings in variants.items()}
    for dataset in ("counterfact", "zsre"):
        found = {name: [] for name in variants}
        for record in get_dataset(dataset).load(None, n_records):
            for name, settings in variants.items():
                seconds, (_, info) = timed(lambda: rome_delta(lm, record.request, settings, C, templates[name]), 1)
                found[name].append((seconds, info["steps"], info["converged"]))
        for name, rows in found.items():
            seconds = np.array([s for s, _, _ in rows])
            steps = np.array([n for _, n, _ in rows])
            print(f"{dataset:11} {name:8} {len(rows)} edits: {np.median(seconds):5.1f} s median, "
                  f"{np.percentile(seconds, 90):5.1f} s 90th percentile; steps median {np.median(steps):.0f}, "
                  f"max {steps.max()}; converged {sum(c for _, _, c in rows)} of {len(rows)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--corpus", default=os.environ.get("FACTEDIT_STATS_CORPUS",
                                                           data_file("wiki", "enwiki_sample.jsonl")))
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--records", type=int, default=0, help="also time edits of the first N dataset records")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model)
    settings = RomeSettings.defaults_for(lm, args.layer, stats_corpus=args.corpus, stats_tokens=args.stats_tokens)
    stats, path, hit = key_statistics(lm, settings)
    print(f"model {args.model}, layer {settings.layer}, statistics {stats.count} keys ({'cached' if hit else 'computed'})")
    C = stats.matrix
    templates = context_templates(lm, settings)
    request = EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    t_fast, (fast, info) = timed(lambda: rome_delta(lm, request, settings, C, templates, forward="cached"), args.repeats)
    t_full, (full, _) = timed(lambda: rome_delta(lm, request, settings, C, templates, forward="full"), args.repeats)
    name = next(iter(fast.changes))
    a, b = fast.weight_change(name), full.weight_change(name)
    rel = float((a - b).norm() / b.norm())
    print(f"one edit ({info['steps']} optimisation steps): cached {t_fast:.2f} s   full forward {t_full:.2f} s   "
          f"speed-up {t_full / t_fast:.1f}x   relative update difference {rel:.1e}")
    if args.records:
        budget_costs(lm, C, args, args.records)
    stop, full_tps = stats_throughput(lm, settings.layer, corpus_from(args.corpus))
    print(f"key statistics: {stop:,.0f} tokens/s stopping after layer {settings.layer} vs {full_tps:,.0f} tokens/s "
          f"through all {lm.n_layers} layers ({stop / full_tps:.1f}x)")


if __name__ == "__main__":
    main()
