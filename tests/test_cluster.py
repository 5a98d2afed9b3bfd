"""Work spread over Ray workers (factedit.cluster): the results and files equal a single-process run's.

A local Ray with 2 one-thread workers, started on 127.0.0.1 by a module fixture and stopped by it
(no gcs_server or raylet of its session left). Run on the tiny Llama saved as a model folder (what
is tested is that work spread over processes gives the single process's results, not what a model
does; the workers load it in a moment): 3 CounterFact records with ROME at a fixed number of value
steps, key statistics over 4096 tokens, causal traces of facts the tiny model gets right or wrong
(2 wanted of 4).

The tests that start Ray are slow, and skipped when Ray (the extra factedit[cluster]) is not
installed, except in CI (CI set, as .ci/run does): there a missing Ray fails them. The others (bad
options refused, no command imports Ray, the message naming the extra) need no Ray and always run.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

# Only the tests that start Ray: slow, and skipped without Ray outside CI (in CI they fail instead).
needs_ray = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None and not os.environ.get("CI"),
                       reason="ray is not installed: pip install 'factedit[cluster]' (make setup-test installs it)"),
]


def with_ray(test):
    for mark in needs_ray:
        test = mark(test)
    return test

TOLERANCE = 1e-5
N_RECORDS = 3  # the killed-worker test resumes after the first: one batch here, one on a worker


def ray_processes(session: str) -> list[str]:
    """The processes whose command line names this Ray session (gcs_server, raylet, workers, ...)."""
    found = subprocess.run(["pgrep", "-af", session], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "pgrep" not in line]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The single-process runs with one thread too, as the workers: same arithmetic, same results
    (and no oversubscribed cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for 2 one-thread workers, on 127.0.0.1; at the end shut down, and none of its
    processes left running."""
    import psutil

    from factedit.cluster import ClusterSpec, start_local

    connection = start_local(ClusterSpec("auto", workers=2), threads=1)
    assert connection.address.startswith("127.0.0.1:")
    gcs = [p for p in psutil.Process().children(recursive=True) if p.name() == "gcs_server"]
    session = next(arg for arg in gcs[0].cmdline() if "session_" in arg).split("session_")[1].split("/")[0]
    try:
        yield connection
    finally:
        connection.close()
        deadline = time.monotonic() + 30
        while ray_processes(session) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray_processes(session) == [], "Ray processes left running after ray.shutdown()"


@pytest.fixture(scope="module")
def model(tiny_folder):
    """The tiny Llama, loaded from the folder the workers load it from."""
    from factedit import load

    return load(str(tiny_folder))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """Text of the tiny vocabulary's words, in documents: the key statistics' corpus."""
    import random

    from tiny import VOCAB_WORDS

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "words.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(VOCAB_WORDS[3:]) for _ in range(300))}) + "\n"
                            for _ in range(30)))
    return path


@pytest.fixture(scope="module")
def rome_settings(model, corpus_file, tmp_path_factory) -> Path:
    """ROME with statistics over 4096 tokens and 1,000 value steps that always run (early_stop_loss 0):
    an edit of a few seconds, long enough for a worker to be killed in the middle of it."""
    from factedit.edit import get_method

    settings = get_method("rome").settings_with(model, 1, stats_corpus=str(corpus_file), stats_tokens=4096,
                                                v_steps=1000, early_stop_loss=0.0)
    path = tmp_path_factory.mktemp("settings") / "rome.json"
    settings.save(path)
    return path


@pytest.fixture(scope="module")
def single_run(model, data_dir, rome_settings, tmp_path_factory) -> Path:
    """The single-process evaluation of the first 3 records: what the cluster runs must equal."""
    from factedit.edit import get_method
    from factedit.evaluate.runner import run_evaluation

    out = tmp_path_factory.mktemp("single")
    run_evaluation(model, "rome", "counterfact", out, data=str(data_dir / "counterfact" / "counterfact_dev.json"),
                   n=N_RECORDS, settings=get_method("rome").load_settings(model, rome_settings))
    return out


def assert_close(a, b, where: str = "") -> None:
    """Equal structure and values: numbers within TOLERANCE, everything else exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if key != "edit_seconds" and key != "seconds":  # timings differ
                assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=TOLERANCE), where
    else:
        assert a == b, where


def assert_same_cases(single: Path, cluster: Path, n: int) -> None:
    names = sorted(p.name for p in (single / "cases").glob("*.json"))
    got = sorted(p.name for p in (cluster / "cases").glob("*.json"))
    assert len(got) == n and set(got) <= set(names)
    for name in got:
        assert_close(json.loads((single / "cases" / name).read_text()),
                     json.loads((cluster / "cases" / name).read_text()), name)


def invoke(args: list[str]):
    from factedit.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


@with_ray
def test_eval_on_two_workers_equals_the_single_process_run(local_ray, tiny_folder, single_run, rome_settings, data_dir,
                                                           tmp_path):
    out = tmp_path / "cluster"
    result = invoke(["eval", "--model", str(tiny_folder), "--threads", "1", "--method", "rome", "--dataset", "counterfact", "--n", str(N_RECORDS),
                     "--data", str(data_dir / "counterfact" / "counterfact_dev.json"),
                     "--settings", str(rome_settings), "--out", str(out), "--cluster", "auto"])
    assert result.exit_code == 0, result.output
    assert "cluster: 2 worker(s) of 1 thread(s)" in result.output
    assert_same_cases(single_run, out, N_RECORDS)
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (out, single_run))
    assert summary["cases"] == N_RECORDS
    assert_close({k: expected[k] for k in ("pre", "post")}, {k: summary[k] for k in ("pre", "post")})


@with_ray
def test_a_killed_worker_has_its_batch_run_again(local_ray, tiny_folder, model, single_run, rome_settings, data_dir,
                                                 tmp_path):
    """A run resumed after its first case: this process edits the second batch, a worker the third,
    and that worker is killed in the middle of it. The batch runs again on another worker, a fresh
    worker takes the dead one's place, and every case equals the single-process run."""
    import shutil

    from factedit.cluster import ClusterRun, ClusterSpec, WorkerModel, evaluation_dispatch
    from factedit.data import load_counterfact
    from factedit.edit import get_method
    from factedit.evaluate.runner import run_evaluation

    data = str(data_dir / "counterfact" / "counterfact_dev.json")
    first = load_counterfact(data, 1)[0].case_id
    (tmp_path / "cases").mkdir()
    shutil.copy(single_run / "cases" / f"{first}.json", tmp_path / "cases")  # done before the "interruption"
    killed: list = []

    def kill_one_mid_batch(pool):
        deadline = time.monotonic() + 120
        while not pool.running_actors() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # a batch takes several seconds (1,000 value steps): the worker is in the middle of it
        running = pool.running_actors()
        if running:
            local_ray.ray.kill(running[0], no_restart=True)
            killed.append(running[0])

    with ClusterRun(ClusterSpec("auto"), WorkerModel(str(tiny_folder), threads=1)) as run:
        pool = run.pool(model.fingerprint)
        pool.start()
        killer = threading.Thread(target=kill_one_mid_batch, args=(pool,), daemon=True)
        killer.start()
        run_evaluation(model, "rome", "counterfact", tmp_path, n=3, data=data,
                       settings=get_method("rome").load_settings(model, rome_settings),
                       dispatch=evaluation_dispatch(pool))
        killer.join()
        assert killed, "no worker was busy to be killed"
        assert pool.deaths == 1 and pool.reruns == 1
        assert killed[0] not in pool.actors  # replaced by a fresh worker
    assert_same_cases(single_run, tmp_path, 3)


@with_ray
def test_sharded_statistics_equal_the_single_process_ones_in_the_same_cache_file(local_ray, tiny_folder, model,
                                                                                    corpus_file, tmp_path):
    from safetensors import safe_open

    from factedit.stats import SecondMoment, collect_second_moments, corpus_from, stats_cache_path

    own_file = tmp_path / "words.jsonl"  # a file of its own: never in the cache yet
    own_file.write_text(corpus_file.read_text())
    corpus = corpus_from(str(own_file))
    path = stats_cache_path(model, 1, corpus, 4096)
    try:
        result = invoke(["stats", "--model", str(tiny_folder), "--threads", "1", "--layer", "1", "--corpus",
                         str(own_file), "--tokens", "4096", "--cluster", "auto"])
        assert result.exit_code == 0, result.output
        assert f"computed C at layer 1: 4096 keys, d_mlp {model.arch.d_mlp}, {path}" in result.output
        sharded = SecondMoment.load(path)
        single = collect_second_moments(model, [1], corpus, 4096)[1]
        assert sharded.count == single.count == 4096
        assert torch.allclose(sharded.sum_outer, single.sum_outer, rtol=1e-5, atol=1e-6 * single.sum_outer.abs().max())
        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["info"])
        assert info == {"model": model.name, "fingerprint": model.fingerprint, "layer": 1, "corpus": corpus.name,
                        "corpus_identity": corpus.identity, "tokens_requested": 4096}
    finally:
        path.unlink(missing_ok=True)


@with_ray
def test_trace_average_on_workers_writes_the_same_facts(local_ray, tiny_folder, model, tmp_path):
    """4 facts, 2 wanted: the run stops at the second one the model gets right (the third fact), also
    when the workers have started on the fourth; the same rows either way."""
    from factedit.data.known import load_known_facts
    from factedit.trace.average import _top_token, average_effects

    prompts = [("Michael Jordan", "{} plays"), ("The Eiffel Tower", "{} is located in the city of"),
               ("Seattle", "{} is located in the city of"), ("France", "The capital of {} is")]
    facts = []
    for known_id, (subject, template) in enumerate(prompts):
        answer = _top_token(model, template.format(subject)).strip()
        right = known_id in (1, 2)  # the model gets the second and third right, the first and fourth wrong
        facts.append({"known_id": known_id, "subject": subject, "attribute": answer if right else "qqq",
                      "prompt": template.format(subject), "template": template})
    facts_file = tmp_path / "facts.json"
    facts_file.write_text(json.dumps(facts))
    average_effects(model, load_known_facts(str(facts_file)), "mlp", n=2, samples=2, window=2, seed=0,
                    out_dir=tmp_path / "single")
    result = invoke(["trace-avg", "--model", str(tiny_folder), "--threads", "1", "--facts", str(facts_file), "--kind",
                     "mlp", "--n", "2", "--samples", "2", "--window", "2", "--out", str(tmp_path / "cluster"),
                     "--cluster", "auto"])
    assert result.exit_code == 0, result.output
    rows = [[json.loads(line) for line in (tmp_path / run / "facts.jsonl").read_text().splitlines()]
            for run in ("single", "cluster")]
    assert [r["known_id"] for r in rows[1]] == [0, 1, 2]
    assert [r["correct"] for r in rows[1]] == [False, True, True]
    assert_close(rows[0], rows[1], "facts.jsonl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@with_ray
def test_an_unreachable_address_fails_within_seconds(local_ray, tmp_path):
    port = free_port()
    began = time.monotonic()
    result = invoke(["eval", "--method", "rome", "--dataset", "counterfact", "--n", "1", "--out", str(tmp_path),
                     "--cluster", f"127.0.0.1:{port}"])
    assert time.monotonic() - began < 10
    assert result.exit_code == 2
    assert f"error: cannot reach a Ray cluster at 127.0.0.1:{port}" in result.output
    assert "loading" not in result.output  # refused before the model loads


@pytest.mark.parametrize("args, message", [
    (["--cluster", "nowhere"], "is not an address"),
    (["--workers", "2"], "--workers and --gpus-per-worker need --cluster"),
    (["--cluster", "auto", "--sequential"], "--cluster cannot run --sequential"),
])
def test_bad_cluster_options_are_refused_before_any_work(args, message, tmp_path):
    result = invoke(["eval", "--method", "rome", "--dataset", "counterfact", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def run_python(code: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_without_ray_the_message_names_the_extra():
    code = ("import sys; sys.modules['ray'] = None  # as if not installed\n"
            "from click.testing import CliRunner; from factedit.cli import main\n"
            "r = CliRunner().invoke(main, ['stats', '--layer', '0', '--cluster', 'auto'])\n"
            "print(r.exit_code, r.output)")
    out = run_python(code, {"RAY_ADDRESS": ""})
    assert out.startswith("2 ") and "pip install 'factedit[cluster]'" in out


@pytest.mark.slow  # a subprocess computing statistics: about 8 s (needs no Ray: never skipped)
def test_no_command_without_cluster_imports_ray(tiny_folder, word_corpus):
    code = ("import sys, torch; torch.set_num_threads(1)\n"
            "from click.testing import CliRunner; from factedit.cli import main\n"
            "assert 'ray' not in sys.modules, 'importing the CLI imported ray'\n"
            f"args = ['stats', '--model', {str(tiny_folder)!r}, '--layer', '0', '--tokens', '64']\n"
            "r = CliRunner().invoke(main, args)\n"
            "assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    assert run_python(code) == "[]"
