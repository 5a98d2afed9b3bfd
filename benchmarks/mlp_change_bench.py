"""What moving MEMIT's residuals behind a post-MLP norm costs (edit/mlp_change.py), against the
naive Jacobian it replaced, on a model with such a norm (Gemma 3).

    python benchmarks/mlp_change_bench.py --model gemma3-270m --n 64 --layers 0 3 --threads 1

Each Levenberg-Marquardt iteration of `mlp_change` takes the Jacobian of the block's output at each
subject token with respect to the MLP projection's output there; that is most of a Gemma batch's
solve. The naive reference differentiates the whole right-padded batch at once; `_jacobians` reads
each prompt only up to its subject and takes rows with the same subject position together. Both run
here on the same rows, three times each (median); the largest difference between them is printed
beside the ratio.
"""

from __future__ import annotations

import argparse

import torch
from common import data_file, timed

from factedit import load
from factedit.data.counterfact import load_counterfact
from factedit.edit.mlp_change import BlockOfMlp, _jacobians
from factedit.hooks import Hook, Hooks


def padded_batch_jacobians(f: BlockOfMlp, m: torch.Tensor) -> torch.Tensor:
    """The reference: one batched backward pass per output coordinate through the whole padded batch."""
    lm, ids = f.lm, f.batch.input_ids
    n, width = ids.shape
    leaf = m.detach().clone().requires_grad_(True)

    def replace(output):
        view = output.reshape(n, width, -1).clone()
        view[f.rows, f.positions] = leaf.to(view.dtype)
        return view.reshape(output.shape)

    with torch.enable_grad():
        hooks = Hooks({"mlp": Hook(lm.arch.module("mlp", f.layer), edit_output=replace),
                       "block": Hook(lm.arch.module("hidden", f.layer), keep_output=True, detach=False, stop=True)})
        with hooks:
            lm.model(input_ids=ids, use_cache=False)
        y = hooks["block"].output.reshape(n, width, -1)[f.rows, f.positions].float()
        basis = torch.eye(y.shape[1]).unsqueeze(1).expand(y.shape[1], n, y.shape[1])
        (grads,) = torch.autograd.grad(y, leaf, grad_outputs=basis, is_grads_batched=True)
    return grads.permute(1, 0, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--data", default=data_file("counterfact", "counterfact_lite.json"))
    parser.add_argument("--n", type=int, default=64, help="requests (mlp_change's chunk is 64)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model)
    requests = [r.request for r in load_counterfact(args.data, args.n)]
    print(f"{args.model}, {args.n} CounterFact requests, {args.threads} threads, median of {args.repeats}")
    print("| layer | tokens read (padded batch / by subject) | padded batch | by subject position | ratio "
          "| largest difference (relative) |")
    print("|---|---|---|---|---|---|")
    for layer in args.layers:
        f = BlockOfMlp(lm, layer, requests, "{}")
        with torch.no_grad():
            m, _ = f()
        naive, reference = timed(lambda: padded_batch_jacobians(f, m), args.repeats)
        grouped, (_, found) = timed(lambda: _jacobians(f, m, f.rows), args.repeats)
        difference = float((found - reference).abs().max() / reference.abs().max())
        tokens = f.batch.input_ids.numel(), int((f.positions + 1).sum())
        print(f"| {layer} | {tokens[0]} / {tokens[1]} | {naive:.2f} s | {grouped:.2f} s | {naive / grouped:.2f} "
              f"| {difference:.1e} |")


if __name__ == "__main__":
    main()
