"""Can AlphaEdit keep the facts it is told to keep? One batch of CounterFact edits, with the keys of
half of the known facts protected (alphaedit.protection) at several weights of H.

    python benchmarks/protected_facts.py --model smollm2-135m --corpus ../shared/data/wiki/enwiki_sample.jsonl \\
        --data ../shared/data/counterfact/counterfact_lite.json --known ../shared/data/known_1000.json --n 100

The known facts that count are those of the lifelong runs (the unedited model answers them and no
edit touches their subject), split by their order: the even ones are protected, the odd ones are
the control. Rows: MEMIT, AlphaEdit without protection, and AlphaEdit protecting the even half (the
keys of the subject's last token, or of every token of the prompt) with H weighted `--weights` (the
reference weighs it 1); with `--variants`, also AlphaEdit with other numeric settings and no
protection (the first batch's trade-off). Columns: edits kept (the new object beats the true one on
the rewrite prompt), known facts kept in each half (Wilson 95% intervals), perplexity of
held-out text. The batch's targets are those of the lifelong runs (cached for the same value
settings), so a row costs one solve and the measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from common import data_dir

from factedit import load
from factedit.data.counterfact import load_counterfact
from factedit.data.known import load_known_facts
from factedit.edit import EditHistory, EditRequest, get_method
from factedit.edit.alphaedit import protection
from factedit.evaluate.lifelong import LifelongProbe, answered, edits_kept, perplexity
from factedit.evaluate.metrics import wilson_interval
from factedit.stats import held_out_corpus


def share(flags: list[bool]) -> str:
    kept = sum(flags) / len(flags)
    low, high = wilson_interval(kept, len(flags))
    return f"{kept:.3f} ({low:.3f}-{high:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--corpus", help="statistics corpus; its last documents are the held-out text")
    parser.add_argument("--data", help="CounterFact file")
    parser.add_argument("--print", dest="print_saved", type=Path, default=None,
                        help="print the table of a saved --out file and stop")
    parser.add_argument("--known", default=None, help=f"known facts (default: {data_dir()}/known_1000.json)")
    parser.add_argument("--n", type=int, default=100, help="edits in the batch")
    parser.add_argument("--weights", default="1,100", help="weights of H to try with the protected facts")
    parser.add_argument("--tokens", default="subject,prompt",
                        help="which tokens' keys to protect: the subject's last, every token of the prompt, or both")
    parser.add_argument("--variants", default="",
                        help="more AlphaEdit rows without protection, each a numeric settings override, separated by ';' "
                             "(e.g. 'l2=0.1;null_space_threshold=0.05'); only settings that keep the batch's cached "
                             "targets (not the layers) stay cheap")
    parser.add_argument("--no-protection", dest="protect", action="store_false",
                        help="only MEMIT, AlphaEdit and the --variants rows")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.print_saved:
        print(table(json.loads(args.print_saved.read_text())))
        return
    if not (args.corpus and args.data):
        parser.error("--corpus and --data are required (unless --print)")
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model)
    requests = [r.request for r in load_counterfact(args.data, args.n)]
    held_out = held_out_corpus(args.corpus)
    counted = LifelongProbe(lm, requests, known=load_known_facts(args.known)).known
    protected, control = counted[0::2], counted[1::2]
    to_keep = [EditRequest.create(f.prompt, f.subject, f.attribute) for f in protected]
    alpha = get_method("alphaedit").settings_with(lm, stats_corpus=args.corpus)
    configs = [("memit", "", get_method("memit").settings_with(lm, stats_corpus=args.corpus), None),
               ("alphaedit", "none", alpha, None)]
    for variant in filter(None, args.variants.split(";")):
        name, _, value = variant.partition("=")
        configs.append(("alphaedit", f"none, {variant}", dataclasses.replace(alpha, **{name: float(value)}), None))
    if args.protect:
        configs += [("alphaedit", f"even half, {tokens} keys, H weight {w:g}",
                     dataclasses.replace(alpha, preserve_weight=w), tokens)
                    for tokens in args.tokens.split(",") for w in map(float, args.weights.split(","))]

    rows = [{"method": "unedited", "protected": "", "edits_kept": edits_kept(lm, requests),
             "protected_kept": answered(lm, protected), "control_kept": answered(lm, control),
             "perplexity": perplexity(lm, held_out)}]
    for method, label, settings, tokens in configs:
        history = EditHistory(lm)
        try:
            if tokens:
                history.apply(protection(lm, to_keep, settings, tokens))
            history.edit(requests, method, settings)
            rows.append({"method": method, "protected": label, "edits_kept": edits_kept(lm, requests),
                         "protected_kept": answered(lm, protected), "control_kept": answered(lm, control),
                         "perplexity": perplexity(lm, held_out)})
        finally:
            history.release()

    found = {"model": args.model, "n": len(requests), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(found, indent=1))
    print(table(found))


def table(found: dict) -> str:
    """The rows as markdown: each half of the known facts, and all of them together."""
    rows = found["rows"]
    halves = len(rows[0]["protected_kept"]), len(rows[0]["control_kept"])
    lines = [f"{found['model']}: one batch of {found['n']} CounterFact edits; {sum(halves)} known facts count, "
             f"{halves[0]} protected where a row protects (even), {halves[1]} never (odd)",
             "| method | protected facts | edits kept | protected facts kept (95% CI) | control facts kept (95% CI) "
             "| all known facts kept (95% CI) | perplexity |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['protected']} | {row['edits_kept'] or 0:.3f} "
                     f"| {share(row['protected_kept'])} | {share(row['control_kept'])} "
                     f"| {share(row['protected_kept'] + row['control_kept'])} | {row['perplexity']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
