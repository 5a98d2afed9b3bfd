"""Why does a ROME edit reach zsRE's rephrased question less often than the question it was made for?
Diagnostics of one evaluation run (SmolLM2-135M, 200 records: paraphrase 73.6 vs efficacy 98.3).

    python benchmarks/paraphrase_reach.py docs/results/fidelity/smollm2-zsre-rome [--n 200] [--inject 40]

Run from the folder the run's relative paths (settings.json: data, stats_corpus) start from: the
repository root for the runs in docs/results. A record fails when the paraphrase's token accuracy
(teacher-forced, as zsRE scores it) is below 1. The tables, from the run's stored cases and the
unedited model:

1. tokenisation: whether the paraphrase contains the subject with the rewrite prompt's tokens;
2. accuracy per target token, paraphrase vs rewrite, and the wrong first tokens of the failures;
3. the update share s = u . k_para: the rank-one update adds s times the edit's change to the MLP
   output at the paraphrase's subject token (u = update_left for the run's settings, 1 at the key
   it was written for); its median for failures and passes, and the full-pass rate by s;
4. with --inject K (one value optimisation per record, ~30 s each on a CPU): the first K records'
   edits are recomputed (rome_delta) and their change added, at share 1 and at share s, to the MLP
   output at the paraphrase's subject token of the unedited model. Share 1 is the ceiling of any
   rank-one update that writes the same value: what the paraphrase would score if its key received
   the whole edit. "re-edited" applies the recomputed edit, to check that it reproduces the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import torch
from common import Stopwatch, timed

from factedit import load
from factedit.data.zsre import load_zsre
from factedit.edit import EditStack
from factedit.edit.prefixes import context_templates
from factedit.edit.prompts import io_at_subject
from factedit.edit.rome import RomeSettings, compute_keys, rome_delta, update_left
from factedit.evaluate.metrics import token_accuracy
from factedit.hooks import Hook
from factedit.request import EditRequest
from factedit.scoring import teacher_forced_predictions
from factedit.stats import key_statistics
from factedit.tokens import subject_token_range

BUCKETS = [(-float("inf"), 0.6), (0.6, 0.8), (0.8, 0.9), (0.9, 1.0), (1.0, float("inf"))]


def subject_tokens(tokenizer, text: str, subject: str) -> tuple[list[int], int] | None:
    """The subject's token ids in `text` and the index of its last token; None where it does not occur."""
    if subject not in text:
        return None
    ids = list(tokenizer(text)["input_ids"])
    start, end = subject_token_range(tokenizer, text, subject, ids)
    return ids[start:end], end - 1


def tokenisation(tokenizer, record) -> str:
    """How the paraphrase contains the subject, compared with the rewrite prompt."""
    subject, paraphrase = record.request.subject, record.paraphrase
    para = subject_tokens(tokenizer, paraphrase, subject)
    if para is None:
        return "different case" if subject.lower() in paraphrase.lower() else "absent"
    rewrite = subject_tokens(tokenizer, record.request.text, subject)[0]
    return "same tokens" if para[0] == rewrite else "same last token" if para[0][-1] == rewrite[-1] else "other tokens"


def shown(text: str) -> str:
    return "`" + repr(text).replace("|", "\\|").replace("`", "'") + "`"


def position_accuracy(cases: list[dict], group: str, cap: int = 4) -> dict[int, tuple[int, int]]:
    """Per target position (the last one pooling `cap` and beyond): (correct, total) after the edit."""
    correct, total = Counter(), Counter()
    for case in cases:
        scored = case["post"][group]
        for i, (p, t) in enumerate(zip(scored["predicted"], scored["target"])):
            total[min(i, cap - 1)] += 1
            correct[min(i, cap - 1)] += p == t
    return {i: (correct[i], total[i]) for i in sorted(total)}


def paraphrase_key(lm, layer: int, record) -> torch.Tensor:
    """The MLP key at the subject's last token of the paraphrase."""
    request = EditRequest.create(record.paraphrase, record.request.subject, record.request.target_new)
    return io_at_subject(lm, "mlp", layer, request, ["{}"])[0][0]


def added_at(position: int, vector: torch.Tensor):
    """An edit_output callback adding `vector` at one token position of a one-row batch."""
    def edit(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out.view(-1, out.shape[-1])[position] += vector.to(out.dtype)
        return out
    return edit


def paraphrase_accuracy(lm, record) -> float:
    (predicted, target), = teacher_forced_predictions(lm, [record.paraphrase], [record.request.target_new])
    return token_accuracy(predicted, target)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="an evaluation run folder of method rome on zsRE (factedit eval)")
    parser.add_argument("--n", type=int, default=200, help="the run's first N cases")
    parser.add_argument("--inject", type=int, default=0, help="table 4 on the first K of them (~30 s each)")
    parser.add_argument("--data", default=None, help="the zsRE file, if not the run's")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = Stopwatch()
    run = Path(args.run)
    info = json.loads((run / "settings.json").read_text())
    if info["dataset"] != "zsre" or info["method"] not in ("rome", "rome-original"):
        raise SystemExit(f"{run}: a {info['method']} run on {info['dataset']}; this needs rome on zsre")
    cases = {c["case_id"]: c for c in (json.loads(p.read_text()) for p in (run / "cases").glob("*.json"))}
    lm = load(info["model"])
    if lm.fingerprint != info["fingerprint"]:
        raise SystemExit(f"{run} was made with model fingerprint {info['fingerprint']}, not {lm.fingerprint}")
    settings = RomeSettings.from_dict(info["settings"])
    data = args.data or (None if info["data"] == "default" else info["data"])
    records = [r for r in load_zsre(data, max(cases) + 1) if r.case_id in cases][:args.n]
    cases = [cases[r.case_id] for r in records]
    failing = [c["post_scores"]["paraphrase"] < 1 for c in cases]
    print(f"{run.name}: {len(records)} cases, {sum(failing)} failing the paraphrase (token accuracy < 1); "
          f"paraphrase {100 * statistics.mean(c['post_scores']['paraphrase'] for c in cases):.1f}, "
          f"efficacy {100 * statistics.mean(c['post_scores']['efficacy'] for c in cases):.1f}\n", flush=True)

    kinds = [tokenisation(lm.tokenizer, r) for r in records]
    print("| subject in the paraphrase | failing | passing | full-pass rate |\n|---|---|---|---|")
    for kind in ("same tokens", "same last token", "other tokens", "different case", "absent"):
        fail = sum(k == kind and f for k, f in zip(kinds, failing))
        total = kinds.count(kind)
        if total:
            print(f"| {kind} | {fail} | {total - fail} | {(total - fail) / total:.2f} |")

    fails = [c for c, f in zip(cases, failing) if f]
    rewrite, paraphrase = position_accuracy(cases, "rewrite"), position_accuracy(cases, "paraphrase")
    print("\n| target token | rewrite | paraphrase | tokens |\n|---|---|---|---|")
    for i, (right, total) in paraphrase.items():
        label = f"{i + 1}+" if i == max(paraphrase) and i > 0 else f"{i + 1}"
        print(f"| {label} | {rewrite[i][0] / rewrite[i][1]:.3f} | {right / total:.3f} | {total} |")
    wrong_first = [lm.tokenizer.decode([c["post"]["paraphrase"]["predicted"][0]]) for c in fails
                   if c["post"]["paraphrase"]["predicted"][0] != c["post"]["paraphrase"]["target"][0]]
    print(f"\nFirst token wrong in {len(wrong_first)} of {len(fails)} failures; the most frequent predictions:\n")
    print("| predicted first token | failures |\n|---|---|")
    for token, count in Counter(wrong_first).most_common(8):
        print(f"| {shown(token)} | {count} |")

    C = key_statistics(lm, settings)[0].matrix
    templates = context_templates(lm, settings)
    shares = {}  # case id -> s, where the paraphrase contains the subject
    for record in records:
        if subject_tokens(lm.tokenizer, record.paraphrase, record.request.subject) is None:
            continue
        keys = compute_keys(lm, settings.layer, record.request, templates)
        residual = keys.k_avg if settings.key_mode == "consistent" else keys.k_plain
        left = update_left(C, keys.k_avg, residual, settings.ridge)
        shares[record.case_id] = float(left @ paraphrase_key(lm, settings.layer, record).double().to(left.device))
    print(f"\nUpdate share s = u . k_para ({len(shares)} records with the subject in the paraphrase):\n")
    print("| paraphrase | records | median s | p10 | p90 |\n|---|---|---|---|---|")
    for name, group in (("failing", True), ("passing", False)):
        values = sorted(shares[c["case_id"]] for c, f in zip(cases, failing) if f == group and c["case_id"] in shares)
        if values:
            print(f"| {name} | {len(values)} | {statistics.median(values):.3f} | {values[len(values) // 10]:.3f} | "
                  f"{values[9 * len(values) // 10]:.3f} |")
    print("\n| s | records | full-pass rate | mean paraphrase accuracy |\n|---|---|---|---|")
    for low, high in BUCKETS:
        scores = [c["post_scores"]["paraphrase"] for c in cases if low <= shares.get(c["case_id"], float("nan")) < high]
        if scores:
            print(f"| [{low:g}, {high:g}) | {len(scores)} | {sum(s == 1 for s in scores) / len(scores):.2f} | "
                  f"{statistics.mean(scores):.3f} |")
    print(flush=True)
    if args.inject:
        module = lm.arch.module("mlp", settings.layer)
        stack, rows, edit_seconds = EditStack(lm), [], []
        for record, case in list(zip(records, cases))[:args.inject]:
            if record.case_id not in shares:
                continue
            seconds, (delta, _) = timed(lambda: rome_delta(lm, record.request, settings, C, templates), 1)
            edit_seconds.append(seconds)
            (change,) = delta.changes.values()
            right = change["up"][:, 0]  # the value change at share 1
            stack.apply(delta)
            re_edited = paraphrase_accuracy(lm, record)
            stack.revert()
            position = subject_tokens(lm.tokenizer, record.paraphrase, record.request.subject)[1]
            injected = []
            for share in (shares[record.case_id], 1.0):
                with Hook(module, edit_output=added_at(position, share * right)):
                    injected.append(paraphrase_accuracy(lm, record))
            rows.append((case["post_scores"]["paraphrase"], re_edited, *injected))
        skipped = min(args.inject, len(records)) - len(rows)
        if not rows:
            raise SystemExit("no record to inject into: none of them has the subject in its paraphrase")
        print(f"Injection on the first {min(args.inject, len(records))} records ({len(rows)} with the subject in "
              f"the paraphrase{f', {skipped} without' if skipped else ''}; {statistics.mean(edit_seconds):.0f} s "
              f"per edit):\n")
        print("| paraphrase | run | re-edited | injected at share s | injected at share 1 (ceiling) |\n"
              "|---|---|---|---|---|")
        columns = list(zip(*rows))
        print("| token accuracy | " + " | ".join(f"{100 * statistics.mean(col):.1f}" for col in columns) + " |")
        print("| full passes | " + " | ".join(f"{sum(v == 1 for v in col)} of {len(col)}" for col in columns) + " |")
    print(f"\n{clock.seconds:.0f} s in all")


if __name__ == "__main__":
    main()
