"""Benchmarks are code too: every script in benchmarks/ runs, as a subprocess, with its smallest
arguments and exits 0 having printed its figures.

Most run on tiny random models saved as model folders (tests/tiny.py: the Llama, and a Gemma 3 for the
script about post-MLP norms) with a corpus of their vocabulary's words and known facts the tiny model
answers; atp_quality.py, which compares with a committed trace-avg run of SmolLM2, runs on the bundled
SmolLM2 with one fact. The CounterFact and zsRE records come from the benchmark data
($FACTEDIT_DATA_DIR). long_runs.sh, which starts runs of hours, is checked by `bash -n` and by its
dry run (DRY_RUN=1 lists the commands a lane would run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TIMEOUT = 300


@pytest.fixture(scope="module")
def tiny_gemma_folder(tmp_path_factory) -> Path:
    """A tiny Gemma 3 (a norm after the MLP) saved as a model folder."""
    from tiny import saved_folder

    return saved_folder("gemma3", tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_folder, data_dir) -> dict:
    """Files the scripts read (a corpus of the tiny vocabulary's words, in documents; known facts the
    tiny Llama answers) and the environment they run in (one thread, a fresh cache folder)."""
    from tiny import VOCAB_WORDS

    from factedit import load
    from factedit.data.known import KnownFact
    from factedit.evaluate.lifelong import answered

    folder = tmp_path_factory.mktemp("bench-smoke")
    rng = random.Random(0)
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(VOCAB_WORDS[3:]) for _ in range(200))}) + "\n"
                              for _ in range(20)))
    lm = load(str(tiny_folder))
    facts = []
    for subject in ("The Eiffel Tower", "Space Needle", "Michael Jordan", "France", "Germany", "Seattle", "Berlin"):
        for template in ("{} is located in the city of", "The capital of {} is", "{} plays"):
            prompt = template.format(subject)
            next_id = int(lm.model(**lm.tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax())
            word = lm.tokenizer.convert_ids_to_tokens(next_id)
            if word in VOCAB_WORDS[3:]:
                facts.append(KnownFact(len(facts), subject, word, prompt))
    facts = [f for f, ok in zip(facts, answered(lm, facts)) if ok]
    assert len(facts) >= 4, "the tiny Llama answers too few of the facts made for it"
    known = folder / "known.json"
    known.write_text(json.dumps([{**f.__dict__, "template": f.prompt.replace(f.subject, "{}")} for f in facts]))
    env = {**os.environ, "FACTEDIT_DATA_DIR": str(data_dir), "FACTEDIT_STATS_CORPUS": str(corpus),
           "FACTEDIT_CACHE_DIR": str(folder / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return {"folder": folder, "corpus": str(corpus), "known": str(known), "tiny": str(tiny_folder),
            "counterfact": str(data_dir / "counterfact" / "counterfact_dev.json"),
            "lite": str(data_dir / "counterfact" / "counterfact_lite.json"), "env": env}


def run(args: list[str], env: dict, timeout: int = TIMEOUT) -> str:
    """Run a command from the repository root; its output, after asserting it exited 0."""
    process = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    output = process.stdout + process.stderr
    assert process.returncode == 0, f"{' '.join(args)} exited {process.returncode}:\n{output[-4000:]}"
    return process.stdout


def bench(script: str, *args: str, env: dict, timeout: int = TIMEOUT) -> str:
    return run([sys.executable, str(BENCHMARKS / script), *args], env, timeout)


# script -> (arguments, with {tiny}, {corpus}, ... from the `smoke` fixture and {out} a fresh folder;
#            a line (part) the script always prints with its figures)
CASES = {
    "alphaedit_sweep.py": ("--model {tiny} --threads 1 --corpus {corpus} --data {lite} --known {known} --n 2 "
                           "--edits-per-batch 1 --configs default,l2-0.1 --out {out}", "All cases after the last batch"),
    "block_response.py": ("--model {tiny} --layers 1", "| closed form, uniform-gain norm |"),
    "convergence.py": ("--model {tiny} --n 2 --max-steps 5 --batch 2", "converged within"),
    "edit_bench.py": ("--model {tiny} --repeats 1 --threads 1 --corpus {corpus} --stats-tokens 512",
                      "key statistics:"),
    "eval_bench.py": ("--model {tiny} --n 1 --threads 1 --memit-edits 2", "runner, rome:"),
    "gpu_check.py": ("--model {tiny} --device cpu --n 1 --methods rome --corpus {corpus} --data {counterfact} "
                     "--out {out}", "| rome ES |"),
    "key_leakage.py": ("--model {tiny} --layers 1 --n 1 --corpus {corpus}", "layer 1, plain prompts below 0.6"),
    "lifelong_bench.py": ("--model {tiny} --n 2 --target-sample 1 --history 10 --corpus {corpus} --threads 1 "
                          "--repeats 1", "memory: P as bases"),
    "mlp_change_bench.py": ("--model {gemma} --n 2 --layers 0 --repeats 1", "| 0 |"),
    "null_space_reach.py": ("--model {tiny} --threads 1 --corpus {corpus} --known {known} --data {lite} --n-known 2 "
                            "--n-edits 2 --text-tokens 64 --thresholds 0.1 --preserve-subjects 2 "
                            "--preserve-weights 1", "| trace share |"),
    "one_fact_methods.py": ("--model {tiny} --corpus {corpus} --threads 1", "| rome |"),
    "precision_bench.py": ("--model {tiny} --threads 1 --corpus {corpus} --data {counterfact} --n 1 --samples 2 "
                           "--stats-tokens 256 --methods rome --out {out}", "| rome ES |"),
    "protected_facts.py": ("--model {tiny} --threads 1 --corpus {corpus} --data {lite} --known {known} --n 2 "
                           "--weights 1 --tokens subject --variants l2=0.1 --out {out}/rows.json",
                           "| alphaedit | even half, subject keys, H weight 1 |"),
    "trace_bench.py": ("--model {tiny} --samples 2 --window 2 --repeats 1 --threads 1 --compare-dtype bfloat16 "
                       "--json {out}/trace.json", "atp (hidden,mlp,attn)"),
}


def test_every_script_is_smoke_tested():
    """A new benchmark script gets a smoke test here (or a reason not to)."""
    tested = set(CASES) | {"atp_quality.py", "cluster_bench.py", "layer_norms.py", "paraphrase_reach.py", "long_runs.sh"}
    helpers = {"common.py"}
    scripts = {p.name for p in BENCHMARKS.iterdir() if p.suffix in (".py", ".sh")} - helpers
    assert scripts == tested


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs(script, smoke, tiny_gemma_folder, tmp_path):
    args, printed = CASES[script]
    (tmp_path / "out").mkdir()
    values = {**{k: v for k, v in smoke.items() if isinstance(v, str)}, "gemma": str(tiny_gemma_folder),
              "out": str(tmp_path / "out")}
    output = bench(script, *[a.format(**values) for a in args.split()], env=smoke["env"])
    assert printed in output, output[-3000:]


def test_protected_facts_prints_a_saved_table(smoke, tmp_path):
    """--print reads an earlier run's rows (no model)."""
    rows = {"model": "m", "n": 2, "rows": [{"method": "unedited", "protected": "", "edits_kept": 0.5,
                                           "protected_kept": [True, False], "control_kept": [True],
                                           "perplexity": 12.0}]}
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert "| unedited |" in bench("protected_facts.py", "--print", str(tmp_path / "rows.json"), env=smoke["env"])


def test_atp_quality(smoke, tmp_path):
    """Against the committed exact run of SmolLM2 (docs/results/avg-smollm2), on its first traced fact."""
    output = bench("atp_quality.py", "--exact", "docs/results/avg-smollm2", "--facts",
                   str(Path(smoke["counterfact"]).parents[1] / "known_1000.json"), "--threads", "1", "--limit", "1",
                   "--out", str(tmp_path / "atp"), env=smoke["env"])
    assert "| hidden |" in output and (tmp_path / "atp" / "quality.json").exists()


def test_paraphrase_reach(smoke, tmp_path):
    """On a zsRE run of ROME made here on the tiny Llama (2 records), with one injection."""
    run_folder = tmp_path / "zsre-rome"
    run([sys.executable, "-c", "from factedit.cli import main; main()", "eval", "--threads", "1", "-m", smoke["tiny"], "--method", "rome",
         "--dataset", "zsre", "--n", "2", "-o", str(run_folder)], smoke["env"])
    output = bench("paraphrase_reach.py", str(run_folder), "--n", "2", "--inject", "2", env=smoke["env"])
    assert "| subject in the paraphrase |" in output and "s in all" in output


def test_layer_norms(smoke, tmp_path):
    """On a history of two MEMIT batches made here on the tiny Llama: a row per batch and layer."""
    from factedit import load
    from factedit.edit import EditHistory, EditRequest, get_method

    lm = load(smoke["tiny"])
    settings = get_method("memit").defaults(lm, 1, stats_corpus=smoke["corpus"], stats_tokens=500, v_steps=3,
                                            mom2_update_weight=1.0)
    with EditHistory(lm, tmp_path / "history", lock=True) as history:
        for target in ("Rome", "Berlin"):
            history.edit([EditRequest.create("{} is located in the city of", "The Eiffel Tower", target, "Paris")],
                         "memit", settings, cache_dir=tmp_path / "cache")
    output = bench("layer_norms.py", "--model", smoke["tiny"], "--history", str(tmp_path / "history"), "--out",
                   str(tmp_path / "norms"), env=smoke["env"])
    assert all(f"| {batch} | {layer} |" in output for batch in (1, 2) for layer in (0, 1)), output
    assert len(json.loads((tmp_path / "norms.json").read_text())) == 4


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (factedit[cluster])")
def test_cluster_bench(smoke):
    """One local Ray worker, one record, one repeat."""
    output = bench("cluster_bench.py", "--model", smoke["tiny"], "--data", smoke["counterfact"], "--corpus",
                   smoke["corpus"], "--records", "1", "--v-steps", "1", "--stats-tokens", "256", "--tokens", "256",
                   "--layer", "1", "--repeats", "1", "--workers", "1", env=smoke["env"])
    assert "| 1 Ray worker(s) |" in output


def test_long_runs_script(smoke):
    """The lanes of hour-long runs: the script parses, and its dry run lists each lane's commands, whose
    benchmark scripts and configurations exist."""
    run(["bash", "-n", str(BENCHMARKS / "long_runs.sh")], smoke["env"])
    env = {**smoke["env"], "DRY_RUN": "1"}
    trace = run(["bash", str(BENCHMARKS / "long_runs.sh"), "trace"], env)
    assert "trace-avg" in trace and "--model gemma3-270m" in trace
    edits = run(["bash", str(BENCHMARKS / "long_runs.sh"), "edits"], env)
    assert edits.count("eval ") == 2 and "benchmarks/alphaedit_sweep.py" in edits
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from alphaedit_sweep import CONFIGS
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert "--configs layers-2-8-l2-0.1" in edits and "layers-2-8-l2-0.1" in CONFIGS["alphaedit"]
    usage = subprocess.run(["bash", str(BENCHMARKS / "long_runs.sh")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
