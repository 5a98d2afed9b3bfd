"""Shared fixtures, and the rule that splits the tests in two tiers.

`make test` runs everything; `make test-fast` (pytest -m "not slow") is the edit-test loop: tiny
models and checks that need no bundled model, no Ray, no browser, no notebook. A test is `slow`
when it
- requests a fixture that loads a bundled model (BUNDLED_MODEL_FIXTURES: smollm2, gemma3): marked
  here, by pytest_collection_modifyitems, so such a test cannot be left unmarked;
- or is marked in its module: Ray (test_cluster.py), a browser (test_browser*.py), the notebook,
  and what runs for more than ~5 s on a 2-core machine.
A test that is not slow and loads a bundled model anyway (by name, or through the CLI's default
--model) fails, naming itself (the guard `fast_tests_load_no_bundled_model`).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# `make test` runs the tests in parallel processes (pytest-xdist, -n); each takes its share of the
# cores. More threads than cores run ~10x slower (OpenMP threads spin while waiting for a core), so
# the count is pinned, for this process and, through OMP_NUM_THREADS, for the commands it starts.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = int(os.environ.get("FACTEDIT_TEST_THREADS", max(1, (os.cpu_count() or 2) // WORKERS)))
torch.set_num_threads(THREADS)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

# Fixtures that load a bundled pretrained model: every test using one (directly or through another
# fixture) is marked slow.
BUNDLED_MODEL_FIXTURES = {"smollm2", "gemma3"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if BUNDLED_MODEL_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
    if WORKERS > 1:
        # `make test` hands out whole files in this order (--dist loadfile --no-loadscope-reorder: a
        # module's fixtures, e.g. its local Ray, are set up once; xdist's own order, by number of
        # tests, would start the many fast tests first and leave the few slow ones for the end). The
        # heaviest files first, so that the processes finish together: weight 3 for a test of a
        # bundled model, 1 for another slow test; the fast files fill the gaps at the end.
        weight = {}
        for item in items:
            slow = item.get_closest_marker("slow") is not None
            bundled = bool(BUNDLED_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())))
            weight[item.path] = weight.get(item.path, 0) + (3 if bundled else 1 if slow else 0)
        items.sort(key=lambda item: -weight[item.path])


@pytest.fixture(autouse=True)
def fast_tests_load_no_bundled_model(request, monkeypatch):
    """The guard: in a test not marked slow, loading a bundled model (in this process) fails the test."""
    if request.node.get_closest_marker("slow") is not None:
        return
    from factedit import models

    def refuse(name):
        def bundled():
            pytest.fail(f"{request.node.nodeid} loads the bundled model {name} but is not marked slow: request the "
                        f"smollm2 or gemma3 fixture (tests/conftest.py), or mark it @pytest.mark.slow", pytrace=False)
        return bundled

    for name in list(models.BUNDLED_MODELS):
        monkeypatch.setitem(models.BUNDLED_MODELS, name, refuse(name))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("FACTEDIT_DATA_DIR", Path(__file__).parents[1] / ".." / "shared" / "data"))
    if not (path / "known_1000.json").exists():
        pytest.fail(f"benchmark data not found at {path}; set FACTEDIT_DATA_DIR")
    return path.resolve()


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M, loaded once per run (tests that change its weights revert them)."""
    from factedit import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """The bundled Gemma 3 270M (the gemma extra), loaded once per run."""
    from factedit import load

    return load("gemma3-270m")


def run_folder(tmp_path_factory) -> Path:
    """A folder shared by every process of this test run (pytest-xdist's workers each have a base
    folder of their own, inside the run's)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory, smollm2, data_dir) -> Path:
    """One cache folder for the SmolLM2 tests' key statistics (enwiki_sample, 20,000 tokens, the same
    in every module), computed once per run for every layer the editors' defaults use, in one pass:
    by the first process that gets here, while the others wait for it (a file lock), then read."""
    import fcntl

    from factedit.edit import get_method
    from factedit.stats import corpus_from, second_moments

    path = run_folder(tmp_path_factory) / "smollm2-cache"
    path.mkdir(exist_ok=True)
    layers = {get_method("rome").defaults(smollm2).layer, 5, *get_method("memit").defaults(smollm2).layers,
              *get_method("alphaedit").defaults(smollm2).layers}
    with open(path / "computing.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        second_moments(smollm2, sorted(layers), corpus_from(str(data_dir / "wiki" / "enwiki_sample.jsonl")), 20_000,
                       cache_dir=path)
    return path


@pytest.fixture()
def tiny_llama():
    from tiny import tiny_model, word_tokenizer

    from factedit.models import from_model

    return from_model(tiny_model("llama"), word_tokenizer(), name="tiny-llama")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny Llama saved as a model folder, for the command line."""
    from tiny import saved_folder

    return saved_folder("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def word_corpus(tmp_path, monkeypatch) -> Path:
    """Random words of the tiny models' vocabulary (varied text: well-conditioned key statistics),
    set as the statistics corpus, with a fresh cache folder."""
    import random

    from tiny import VOCAB_WORDS

    path = tmp_path / "corpus.txt"
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(VOCAB_WORDS[3:]) for _ in range(3000)))
    monkeypatch.setenv("FACTEDIT_STATS_CORPUS", str(path))
    monkeypatch.setenv("FACTEDIT_CACHE_DIR", str(tmp_path / "cache"))
    return path
