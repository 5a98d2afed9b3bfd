import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Two processes with two threads each on two cores run ~10x slower: pin the count.
torch.set_num_threads(int(os.environ.get("FACTEDIT_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("FACTEDIT_DATA_DIR", Path(__file__).parents[1] / ".." / "shared" / "data"))
    if not (path / "known_1000.json").exists():
        pytest.fail(f"benchmark data not found at {path}; set FACTEDIT_DATA_DIR")
    return path.resolve()


@pytest.fixture(scope="session")
def smollm2():
    from factedit import load

    return load("smollm2-135m")


@pytest.fixture()
def tiny_llama():
    from tiny import tiny_model, word_tokenizer

    from factedit.models import from_model

    return from_model(tiny_model("llama"), word_tokenizer(), name="tiny-llama")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny Llama saved as a model folder, for the command line."""
    from tiny import tiny_model, word_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


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
