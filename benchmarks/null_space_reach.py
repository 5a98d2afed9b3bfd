"""Whose keys lie in AlphaEdit's null space: held-out text, the subjects of known facts, the subjects
of the edits.

    python benchmarks/null_space_reach.py --model smollm2-135m --threads 1 \
        --corpus ../shared/data/wiki/enwiki_sample.jsonl --known ../shared/data/known_1000.json \
        --data ../shared/data/counterfact/counterfact_lite.json

AlphaEdit writes an update only through the null space P of the key statistics C (the eigenvectors
of C's smallest eigenvalues, `null_space_rule`/`null_space_threshold`). A key k is then changed in
proportion to ||P k||: the update reaches an edit's subject key through P k_edit, and damages any other
key k through P k. The projection protects what the statistics' text is made of; whether it protects
known facts depends on whether their subject keys fall in the null space less than the edits' do.
Printed per edited layer: the mean share ||P k||^2 / ||k||^2 for held-out text (the last documents of
the corpus, never in the statistics), for the last subject token of `--n-known` known facts and of
`--n-edits` CounterFact edits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from factedit import load
from factedit.data.counterfact import load_counterfact
from factedit.data.known import load_known_facts
from factedit.edit import EditRequest, get_method
from factedit.edit.alphaedit import projectors
from factedit.edit.prompts import io_at_subject
from factedit.hooks import Hook, Hooks
from factedit.stats import held_out_corpus, token_chunks


def null_share(keys: torch.Tensor, basis: torch.Tensor) -> float:
    keys = keys.double()
    return float(((keys @ basis).pow(2).sum(1) / keys.pow(2).sum(1)).mean())


@torch.no_grad()
def text_keys(lm, layers: list[int], corpus, n_tokens: int) -> dict[int, torch.Tensor]:
    found = {layer: [] for layer in layers}
    for chunk in token_chunks(lm, corpus, n_tokens, 256):
        hooks = {layer: Hook(lm.arch.blocks[layer].mlp_out, keep_input=True) for layer in layers}
        with Hooks(hooks):
            lm.model(input_ids=torch.tensor([chunk], device=lm.device), use_cache=False)
        for layer in layers:
            found[layer].append(hooks[layer].input.reshape(-1, hooks[layer].input.shape[-1]).float().cpu())
    return {layer: torch.cat(keys) for layer, keys in found.items()}


@torch.no_grad()
def subject_keys(lm, layers: list[int], requests: list[EditRequest]) -> dict[int, torch.Tensor]:
    return {layer: torch.cat([io_at_subject(lm, "mlp", layer, r, ["{}"])[0].cpu() for r in requests])
            for layer in layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--known", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--n-known", type=int, default=300)
    parser.add_argument("--n-edits", type=int, default=100)
    parser.add_argument("--text-tokens", type=int, default=2048)
    parser.add_argument("--thresholds", default="0.05,0.1,0.2", help="trace shares to compare")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model)
    facts = load_known_facts(args.known)[:args.n_known]
    known = [EditRequest.create(f.prompt.replace(f.subject, "{}", 1), f.subject, f.attribute) for f in facts
             if f.subject in f.prompt]
    edits = [record.request for record in load_counterfact(args.data, args.n_edits)]
    base = get_method("alphaedit").settings_with(lm, stats_corpus=args.corpus)
    groups = {"held-out text": text_keys(lm, base.layers, held_out_corpus(args.corpus), args.text_tokens),
              "known-fact subjects": subject_keys(lm, base.layers, known),
              "edit subjects": subject_keys(lm, base.layers, edits)}
    rows = []
    for threshold in [float(t) for t in args.thresholds.split(",")]:
        settings = get_method("alphaedit").settings_with(lm, stats_corpus=args.corpus, null_space_threshold=threshold)
        for layer, projector in projectors(lm, settings).items():
            rows.append({"threshold": threshold, "layer": layer, "directions": projector.basis.shape[1],
                         **{name: null_share(keys[layer], projector.basis) for name, keys in groups.items()}})
    print(f"{lm.name}: mean share of a key's energy in the null space (trace-share rule), "
          f"{len(known)} known facts, {len(edits)} edits, {args.text_tokens} held-out tokens")
    names = list(groups)
    print("| trace share | layer | directions | " + " | ".join(names) + " | known / edit |")
    print("|---|---|---|" + "---|" * (len(names) + 1))
    for row in rows:
        ratio = row["known-fact subjects"] / row["edit subjects"]
        print(f"| {row['threshold']:g} | {row['layer']} | {row['directions']} | "
              + " | ".join(f"{row[n]:.3f}" for n in names) + f" | {ratio:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
