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
# Two processes with two threads each on two cores run ~10x slower: pin the count.
torch.set_num_threads(int(os.environ.get("FACTEDIT_TEST_THREADS", "2")))

# Fixtures that load a bundled pretrained model: every test using one (directly or through another
# fixture) is marked slow.
BUNDLED_MODEL_FIXTURES = {"smollm2", "gemma3"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if BUNDLED_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """One cache folder for the SmolLM2 tests' key statistics (enwiki_sample, 20,000 tokens, the same
    in every module): computed once per run, not once per module."""
    return tmp_path_factory.mktemp("smollm2-cache")


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
