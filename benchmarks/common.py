"""Shared by the benchmark scripts (`from common import ...`; a script's own folder is on sys.path):
wall time, the benchmark data folder, and the MLP keys of a forward pass."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from factedit.hooks import Hook, Hooks

REPOSITORY = Path(__file__).resolve().parents[1]


class Stopwatch:
    """Wall time since it was made, frozen when its `with` block ends:

        with Stopwatch() as clock:
            work()
        clock.seconds
    """

    def __init__(self):
        self.began, self.ended = time.perf_counter(), None

    def __enter__(self) -> "Stopwatch":
        self.began = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.ended = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (time.perf_counter() if self.ended is None else self.ended) - self.began


def timed(fn, repeats: int):
    """(median seconds, last result) of `repeats` calls of fn."""
    times, result = [], None
    for _ in range(repeats):
        with Stopwatch() as clock:
            result = fn()
        times.append(clock.seconds)
    return statistics.median(times), result


def data_dir() -> Path:
    """The benchmark data: $FACTEDIT_DATA_DIR, else ../shared/data beside the repository. Set as
    $FACTEDIT_DATA_DIR for the rest of the process, so that the library's defaults (load_counterfact(None),
    load_known_facts(None), ...) read the same folder."""
    path = Path(os.environ.get("FACTEDIT_DATA_DIR") or REPOSITORY.parent / "shared" / "data")
    os.environ["FACTEDIT_DATA_DIR"] = str(path)
    return path


def data_file(*parts: str) -> str:
    """A file of the benchmark data folder, e.g. data_file("counterfact", "counterfact_lite.json")."""
    return str(data_dir().joinpath(*parts))


@torch.no_grad()
def mlp_keys(lm, ids: torch.Tensor, layers: list[int], *, stop: bool = True) -> dict[int, torch.Tensor]:
    """The MLP keys (the input of each layer's MLP output projection) of every token of `ids` at `layers`,
    (tokens, d_mlp) per layer, from one forward pass that stops after the deepest of them (stop=False: runs
    the whole model)."""
    hooks = {layer: Hook(lm.arch.blocks[layer].mlp_out, keep_input=True, stop=stop and layer == max(layers))
             for layer in layers}
    with Hooks(hooks):
        lm.model(input_ids=ids, use_cache=False)
    return {layer: hook.input.reshape(-1, hook.input.shape[-1]) for layer, hook in hooks.items()}
