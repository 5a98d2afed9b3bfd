"""One check on a CUDA device, float32 and bfloat16: trace the Eiffel Tower fact, edit it with ROME
and MEMIT, score CounterFact records with both, compare with the CPU float32 numbers, print times.

    python benchmarks/gpu_check.py --device cuda --n 20 --corpus ../shared/data/wiki/enwiki_sample.jsonl \
        --data ../shared/data/counterfact/counterfact_dev.json --cpu-reference docs/results/precision/precision.json

Sized to finish in under 5 minutes on one GPU with SmolLM2-135M. `--cpu-reference`: the
precision benchmark's output (benchmarks/precision_bench.py, same records), whose float32 ES/PS/NS
and trace peaks the GPU's are set beside. Writes `--out`/gpu_check.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from common import Stopwatch

from factedit import load
from factedit.edit import EditRequest, EditStack, edit, get_method
from factedit.evaluate.runner import run_evaluation
from factedit.scoring import target_probs
from factedit.trace import trace

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
REQUEST = EditRequest.create("{} is located in the city of", SUBJECT, "Rome", "Paris")


def synchronized(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_dtype(args, dtype: str, runs: Path) -> dict:
    device = torch.device(args.device)
    with Stopwatch() as clock:
        lm = load(args.model, device=args.device, dtype=dtype)
    row = {"load_seconds": round(clock.seconds, 2)}
    with Stopwatch() as clock:
        heatmaps = trace(lm, PROMPT, SUBJECT, "all", samples=10)
        synchronized(device)
    row["trace_seconds"] = round(clock.seconds, 2)
    row["trace_peaks"] = {kind: list(result.peak()[:2]) for kind, result in heatmaps.items()}
    row["p_clean"] = heatmaps["hidden"].p_clean
    for method in args.methods.split(","):
        settings = get_method(method).settings_with(lm, stats_corpus=args.corpus)
        with Stopwatch() as first:
            delta, _ = edit(lm, [REQUEST], method, settings)  # includes the statistics, the first time
            synchronized(device)
        stack = EditStack(lm)
        stack.apply(delta)
        p_rome = target_probs(lm, [PROMPT], [" Rome"])[0]
        stack.revert_all()
        with Stopwatch() as clock:
            summary = run_evaluation(lm, method, "counterfact", runs / f"{dtype}-{method}", data=args.data, n=args.n,
                                     settings=settings)
            synchronized(device)
        row[method] = {"eiffel_p_rome": p_rome, "first_edit_seconds": round(first.seconds, 2),
                       "eval_seconds": round(clock.seconds, 2),
                       **{m: summary["post"][m]["mean"] for m in ("ES", "PS", "NS")},
                       "not_converged": summary.get("not_converged")}
    return row


def table(result: dict, reference: dict | None) -> str:
    lines = ["| | CPU float32 (reference) | GPU float32 | GPU bfloat16 |", "|---|---|---|---|"]
    gpu32, gpu16 = result["float32"], result["bfloat16"]
    ref = (reference or {}).get("edits", {})
    ref_trace = (reference or {}).get("trace", {})
    for kind in ("hidden", "mlp", "attn"):
        lines.append(f"| trace {kind} peak (token, layer) | {ref_trace.get(kind, {}).get('peak_float32', '')} | "
                     f"{gpu32['trace_peaks'][kind]} | {gpu16['trace_peaks'][kind]} |")
    lines.append(f"| trace, all kinds (s) | {ref_trace.get('seconds', {}).get('float32', '')} | "
                 f"{gpu32['trace_seconds']} | {gpu16['trace_seconds']} |")
    for method in [m for m in gpu32 if isinstance(gpu32[m], dict) and "ES" in gpu32[m]]:
        for metric in ("ES", "PS", "NS"):
            cpu = ref.get(method, {}).get("float32", {}).get(metric)
            lines.append(f"| {method} {metric} | {'' if cpu is None else f'{cpu:.1f}'} | {gpu32[method][metric]:.1f} | "
                         f"{gpu16[method][metric]:.1f} |")
        lines.append(f"| {method}: Eiffel p(Rome) after the edit | | {gpu32[method]['eiffel_p_rome']:.3f} | "
                     f"{gpu16[method]['eiffel_p_rome']:.3f} |")
        lines.append(f"| {method}: {result['n']} records (s) | | {gpu32[method]['eval_seconds']} | "
                     f"{gpu16[method]['eval_seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name, folder or .gguf file")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--corpus")
    parser.add_argument("--data")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--methods", default="rome,memit")
    parser.add_argument("--cpu-reference", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--render", type=Path, default=None,
                        help="print the table of an earlier run's gpu_check.json (with --cpu-reference) and stop")
    args = parser.parse_args()
    if args.render:
        reference = json.loads(args.cpu_reference.read_text()) if args.cpu_reference else None
        print(table(json.loads(args.render.read_text()), reference))
        return
    if not (args.corpus and args.data):
        parser.error("--corpus and --data are needed to run the check")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this where a GPU is available")
    reference = json.loads(args.cpu_reference.read_text()) if args.cpu_reference and args.cpu_reference.exists() \
        else None
    result = {"device": torch.cuda.get_device_name(args.device) if torch.cuda.is_available() else args.device,
              "torch": torch.__version__, "python": platform.python_version(), "n": args.n}
    with tempfile.TemporaryDirectory() as runs:
        for dtype in ("float32", "bfloat16"):
            result[dtype] = check_dtype(args, dtype, Path(runs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(table(result, reference))


if __name__ == "__main__":
    main()
