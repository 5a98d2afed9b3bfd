"""Per batch and edited layer of a lifelong history: ||x||, the change of the MLP projection's output the
batch asked of the layer (the columns of its saved update, "up"); ||m||, that output at the batch's
subjects when the layer was edited (the model with the earlier batches and this batch's lower layers
applied); the median of ||x|| / ||m||; and the edited matrix's norm before the batch and the norm of
its change. The test of the norm feedback loop of issue 29: behind a norm (Gemma's post-feed-forward
norm) the change needed to turn an output grows with ||m||, so a grown W would ask for more next time.

    python benchmarks/layer_norms.py --model gemma3-270m --threads 2 \
        --history docs/results/lifelong/gemma3-memit-500/history --out docs/results/lifelong/gemma3-memit-500/layer_norms

Reads the history's batch files (their manifest and hashes checked as for a replay); computes no edit.
Writes OUT.md (the table) and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from factedit import load
from factedit.edit import EditDelta, EditHistory, EditRequest, EditStack
from factedit.edit.manifest import load_batch, read_manifest
from factedit.edit.prompts import io_at_subject
from factedit.placement import read_weight


def layer_rows(lm, history: EditHistory, folder: Path) -> list[dict]:
    """One row per (batch, edited layer), replaying the history batch by batch."""
    layer_of = {lm.arch.mlp_out_path(layer): layer for layer in range(lm.n_layers)}
    rows = []
    for number, entry in enumerate(read_manifest(folder).batches, 1):
        batch = load_batch(folder, entry)
        requests = [EditRequest.from_dict(r) for r in batch.requests]
        stack = EditStack(lm)
        try:
            for name in sorted(batch.changes, key=lambda n: layer_of[n]):
                layer = layer_of[name]
                outputs = torch.stack([io_at_subject(lm, "mlp", layer, r, ["{}"])[1][0] for r in requests], 1)
                asked = batch.changes[name]["up"].double().norm(dim=0)
                current = outputs.double().norm(dim=0)
                weight = read_weight(lm.arch.blocks[layer].mlp_out).double()
                rows.append({"batch": number, "layer": layer, "asked": float(asked.mean()),
                             "mlp_output": float(current.mean()),
                             "asked_share": statistics.median((asked / current).tolist()),
                             "weight_norm": float(weight.detach().norm()),
                             "change_norm": float(batch.weight_change(name).double().norm())})
                # the next layer sees this one edited, as when the batch was computed
                stack.apply(EditDelta(batch.method, batch.model_fingerprint, {name: batch.changes[name]}, batch.settings,
                                      batch.requests))
        finally:
            stack.revert_all()
        history.replay(1)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| batch | layer | mean ‖x‖ asked | mean ‖m‖ | median ‖x‖/‖m‖ | ‖W‖ before | ‖ΔW‖ |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['layer']} | {r['asked']:.2f} | {r['mlp_output']:.2f} | {r['asked_share']:.3f} | "
              f"{r['weight_norm']:.1f} | {r['change_norm']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model)
    rows = layer_rows(lm, EditHistory(lm, args.history), args.history)
    table = markdown(rows)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.md").write_text(table + "\n")
        Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
