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

With --preserve-subjects N, it also asks whether preserving subject keys would help: C is mixed with
the second moment of the last subject token of N other known facts (the ones after the first
`--n-known`, so disjoint from those measured), C' = C + w E[k_s k_s^T] for each weight w of
`--preserve-weights`, and the null space of C' (default rule and threshold) is measured the same way.
Preserving subjects helps the known facts only if it takes their keys out of the null space more than
it takes the edits' keys out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import mlp_keys

from factedit import load
from factedit.data.counterfact import load_counterfact
from factedit.data.known import load_known_facts
from factedit.edit import EditRequest, get_method
from factedit.edit.alphaedit import null_space_projector, projectors
from factedit.edit.prompts import io_at_subject
from factedit.stats import held_out_corpus, key_statistics_at, token_chunks


def null_share(keys: torch.Tensor, basis: torch.Tensor) -> float:
    keys = keys.double()
    return float(((keys @ basis).pow(2).sum(1) / keys.pow(2).sum(1)).mean())


def text_keys(lm, layers: list[int], corpus, n_tokens: int) -> dict[int, torch.Tensor]:
    found = {layer: [] for layer in layers}
    for chunk in token_chunks(lm, corpus, n_tokens, 256):
        for layer, keys in mlp_keys(lm, torch.tensor([chunk], device=lm.device), layers).items():
            found[layer].append(keys.float().cpu())
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
    parser.add_argument("--preserve-subjects", type=int, default=0,
                        help="also mix the keys of this many other known facts' subjects into C (see above)")
    parser.add_argument("--preserve-weights", default="0.1,1,10", help="weights w of C' = C + w E[k_s k_s^T]")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model)
    facts = load_known_facts(args.known)

    def requests(chosen):
        return [EditRequest.create(f.prompt.replace(f.subject, "{}", 1), f.subject, f.attribute) for f in chosen
                if f.subject in f.prompt]

    known = requests(facts[:args.n_known])
    preserved = requests(facts[args.n_known:args.n_known + args.preserve_subjects])
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
    if preserved:
        subjects = subject_keys(lm, base.layers, preserved)
        statistics = key_statistics_at(lm, base, None, None)
        for weight in [float(w) for w in args.preserve_weights.split(",")]:
            for layer in base.layers:
                moment = subjects[layer].double().T @ subjects[layer].double() / len(preserved)
                mixed = statistics[layer][0].matrix.double() + weight * moment
                basis = null_space_projector(mixed, base.null_space_rule, base.null_space_threshold).basis
                rows.append({"threshold": base.null_space_threshold, "preserved_weight": weight, "layer": layer,
                             "directions": basis.shape[1],
                             **{name: null_share(keys[layer], basis) for name, keys in groups.items()}})
    print(f"{lm.name}: mean share of a key's energy in the null space (trace-share rule), "
          f"{len(known)} known facts, {len(edits)} edits, {args.text_tokens} held-out tokens")
    names = list(groups)
    print(f"(preserved: C + w x the second moment of {len(preserved)} other known facts' subject keys)"
          if preserved else "")
    print("| trace share | preserved subjects w | layer | directions | " + " | ".join(names) + " | known / edit |")
    print("|---|---|---|---|" + "---|" * (len(names) + 1))
    for row in rows:
        ratio = row["known-fact subjects"] / row["edit subjects"]
        print(f"| {row['threshold']:g} | {row.get('preserved_weight', 0):g} | {row['layer']} | {row['directions']} | "
              + " | ".join(f"{row[n]:.3f}" for n in names) + f" | {ratio:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
