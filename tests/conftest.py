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
