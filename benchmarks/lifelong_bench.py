"""What AlphaEdit costs beside MEMIT: seconds per edit on a batch, the null space it keeps, and the
memory of its projectors P and of the history's H.

    python benchmarks/lifelong_bench.py --model smollm2-135m --n 100 --corpus ../shared/data/wiki/enwiki_sample.jsonl

Both methods optimise the same targets z (MEMIT's step 1, the same code and cache), then differ in
the per-layer solve. The targets are timed once, on a fresh cache folder, for `--target-sample`
requests; each method is then timed on the whole batch with the targets cached (the part where they
differ), three times (median). Seconds per edit = target seconds per request + that median / n.
Also printed: per layer, the directions each null-space rule keeps (the default trace share and the
reference's absolute 2e-2), and the bytes of P (kept as its basis) and of H for a history of
`--history` edits.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import data_file, timed

from factedit import load
from factedit.data.counterfact import load_counterfact
from factedit.edit import edit, get_method
from factedit.edit.alphaedit import null_space_projector
from factedit.stats import key_statistics_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=data_file("counterfact", "counterfact_lite.json"))
    parser.add_argument("--n", type=int, default=100, help="edits in the batch")
    parser.add_argument("--target-sample", type=int, default=16, help="requests whose targets are timed cold")
    parser.add_argument("--history", type=int, default=1000, help="edits in the history H is sized for")
    parser.add_argument("--corpus", default=None, help="statistics corpus (default $FACTEDIT_STATS_CORPUS)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-timing", dest="timing", action="store_false", help="only the null space and memory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model)
    requests = [r.request for r in load_counterfact(args.data, args.n)]
    settings = {m: get_method(m).settings_with(lm, stats_corpus=args.corpus) for m in ("memit", "alphaedit")}

    if args.timing:
        time_methods(lm, requests, settings, args)
    null_space_report(lm, settings["alphaedit"], args.history)


def time_methods(lm, requests, settings, args) -> None:
    with tempfile.TemporaryDirectory() as cold:  # targets from scratch, nothing cached
        target_seconds = timed(lambda: edit(lm, requests[:args.target_sample], "memit", settings["memit"],
                                            cache_dir=Path(cold)), 1)[0] / args.target_sample
    edit(lm, requests, "memit", settings["memit"])  # targets of the whole batch into the cache (if not there)
    rows = []
    for method in ("memit", "alphaedit"):
        edit(lm, requests, method, settings[method])  # statistics and projectors cached
        seconds, _ = timed(lambda: edit(lm, requests, method, settings[method]), args.repeats)
        rows.append((method, seconds, target_seconds + seconds / len(requests)))
    print(f"{args.model}, a batch of {len(requests)} CounterFact edits, {args.threads} threads")
    print(f"target optimisation (same for both): {target_seconds:.2f} s per request "
          f"(cold, {args.target_sample} requests)")
    print(f"| method | batch with targets cached (median of {args.repeats}) | seconds per edit | ratio to memit |")
    print("|---|---|---|---|")
    for method, seconds, per_edit in rows:
        print(f"| {method} | {seconds:.1f} s | {per_edit:.2f} | {per_edit / rows[0][2]:.3f} |")


def null_space_report(lm, alpha, history: int) -> None:
    d = lm.arch.d_mlp
    print(f"\nnull space per layer (d_mlp {d}): directions kept and the share of C's trace they hold")
    print(f"| layer | {alpha.null_space_rule} {alpha.null_space_threshold:g} (default) | absolute 2e-2 (reference) |")
    print("|---|---|---|")
    basis_bytes = 0
    for layer, (stats, _, _) in sorted(key_statistics_at(lm, alpha, None, None).items()):
        C = stats.matrix
        cells = []
        for rule, threshold in ((alpha.null_space_rule, alpha.null_space_threshold), ("absolute", 2e-2)):
            found = null_space_projector(C, rule, threshold)
            cells.append(f"{found.kept} ({found.null_energy / float(C.trace()):.3f})")
            if rule == alpha.null_space_rule:
                basis_bytes += found.nbytes()
        print(f"| {layer} | " + " | ".join(cells) + " |")
    layers = len(alpha.layers)
    print(f"\nmemory: P as bases {basis_bytes / 2**20:.1f} MiB for {layers} layers (as d x d float64 matrices "
          f"{layers * d * d * 8 / 2**20:.1f} MiB); H for {history} edits {layers * d * d * 8 / 2**20:.1f} MiB "
          f"(float64, d x d per layer), kept as the edits' keys {layers * d * history * 4 / 2**20:.1f} MiB "
          "(float32, in the history's edit files); both on the CPU, moved to the device one layer at a time")


if __name__ == "__main__":
    main()
