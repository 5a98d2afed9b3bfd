"""How much of a ROME edit reaches the neighbours' prompts, by layer: a diagnostic of specificity
that needs no optimisation.

    python benchmarks/key_leakage.py --model gemma3-270m --layers 1 3 5 7 9 11 --n 30

A rank-one update W' = W + r u^T / (u^T k*), u = C^-1 k*, adds the fraction (u^T k) / (u^T k*) of
the edit's change r to the MLP output at any token whose key is k. For each CounterFact record and
layer this prints the largest such fraction over the tokens of each neighbourhood prompt (other
subjects with the same relation, whose answers must not change), averaged over the prompts, and the
same over the record's own paraphrase prompts (which should receive the edit). A layer whose
neighbours receive a large share of the edit cannot stay specific, however well the value is
optimised. The last columns: the share the plain rewrite prompt's subject token receives (k* is the
key averaged over ROME's context prefixes), its smallest value, and how many records get less than
60% of the edit there; a subject at the very start of the text can have a key unlike its key in
context.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from common import data_dir, mlp_keys

from factedit import load
from factedit.data import load_counterfact
from factedit.edit import RomeSettings
from factedit.edit.prefixes import context_templates
from factedit.edit.rome import compute_keys, update_left
from factedit.stats import key_statistics


def token_keys(lm, layer: int, prompt: str) -> torch.Tensor:
    """The MLP keys of every token of a prompt at a layer, (tokens, d_mlp)."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    return mlp_keys(lm, ids, [layer])[layer].float()


def largest_share(lm, layer, left, prompts) -> float:
    """left^T k at each token of each prompt: its most affected token's share, averaged over prompts."""
    return float(np.mean([float((token_keys(lm, layer, p) @ left).max()) for p in prompts]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", required=True)
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--data", default=None, help=f"CounterFact file (default: {data_dir()}/counterfact/...)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--corpus", default=os.environ.get("FACTEDIT_STATS_CORPUS"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model)
    records = load_counterfact(args.data, args.n)
    print(f"{args.model}: {len(records)} CounterFact records; share of the edit received by a token "
          "(max over each prompt's tokens, mean over prompts and records)")
    print("| layer | neighbourhood prompts | paraphrase prompts | ratio | plain prompt | its minimum | below 0.6 |")
    print("|---|---|---|---|---|---|---|")
    lows = []
    for layer in args.layers:
        settings = RomeSettings.defaults_for(lm, layer, stats_corpus=args.corpus)
        C = key_statistics(lm, settings)[0].matrix
        templates = context_templates(lm, settings)
        neighbours, paraphrases, plain, low = [], [], [], []
        for record in records:
            keys = compute_keys(lm, layer, record.request, templates)
            left = update_left(C, keys.k_avg, keys.k_avg, settings.ridge)  # ROME's (consistent) direction
            plain.append(float(left @ keys.k_plain.double()))
            if plain[-1] < 0.6:
                low.append(f"{record.case_id} {record.request.text!r}: {plain[-1]:.2f}")
            left = left.float()
            neighbours.append(largest_share(lm, layer, left, record.neighborhood_prompts))
            paraphrases.append(largest_share(lm, layer, left, record.paraphrase_prompts))
        print(f"| {layer} | {np.mean(neighbours):.3f} | {np.mean(paraphrases):.3f} | "
              f"{np.mean(neighbours) / np.mean(paraphrases):.2f} | {np.mean(plain):.2f} | {np.min(plain):.2f} | "
              f"{sum(p < 0.6 for p in plain)} of {len(plain)} |", flush=True)
        lows.append(f"layer {layer}, plain prompts below 0.6: " + ("; ".join(low) or "none"))
    print("\n" + "\n".join(lows))


if __name__ == "__main__":
    main()
