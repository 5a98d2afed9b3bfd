"""Hand-written edit files for the tiny Llama (tests/tiny.py), valid and malformed in one way each.

Used by the loader's, the CLI's and the server's tests: every malformed file must be refused with an
EditFileError (a one-line CLI error, a 400 from the server) whose message contains `message`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

MODULE = "model.layers.1.mlp.down_proj"  # the tiny Llama's MLP output: d_model 32 x d_mlp 48
REQUEST = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": " Rome",
           "target_true": " Paris"}


def factors(rank: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"{MODULE}::up": 0.01 * torch.randn(32, rank, generator=generator),
            f"{MODULE}::down": torch.randn(rank, 48, generator=generator)}


def write_edit_file(path: Path, fingerprint: str, tensors: dict[str, torch.Tensor] | None = None,
                    **metadata: str | None) -> Path:
    """An edit file with the given tensors (default: a valid rank-one change) and metadata overrides;
    an override of None leaves that field out."""
    fields = {"format": "factedit-edit", "version": "1", "method": "rome", "model_fingerprint": fingerprint,
              "settings": json.dumps({"layer": 1}), "requests": json.dumps([REQUEST]), "info": "{}", **metadata}
    save_file(factors() if tensors is None else tensors, str(path),
              metadata={k: v for k, v in fields.items() if v is not None})
    return path


def _with(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    tensors = factors()
    for part, tensor in changes.items():
        key = f"{MODULE}::{part}"
        if tensor is None:
            tensors.pop(key)
        else:
            tensors[key] = tensor
    return tensors


def _poisoned(part: str, index: tuple[int, int], value: float) -> dict[str, torch.Tensor]:
    tensor = factors()[f"{MODULE}::{part}"].clone()
    tensor[index] = value
    return _with(**{part: tensor})


# name -> (tensors or None for the valid ones, metadata overrides, expected words in the error)
BAD_EDIT_FILES = {
    "nan": (_poisoned("up", (0, 0), float("nan")), {}, "NaN or infinite"),
    "infinity": (_poisoned("down", (0, 3), float("inf")), {}, "NaN or infinite"),
    "mismatched rank": (_with(up=torch.ones(32, 2)), {}, "mismatched rank"),
    "1-D tensor": ({f"{MODULE}::dense": torch.ones(48)}, {}, "is 1-D"),
    "up without down": (_with(down=None), {}, "has the 'up' factor but not the 'down' factor"),
    "down without up": (_with(up=None), {}, "has the 'down' factor but not the 'up' factor"),
    "integer tensor": (_with(up=torch.ones(32, 1, dtype=torch.int64)), {}, "dtype int64"),
    "bool tensor": (_with(down=torch.ones(1, 48, dtype=torch.bool)), {}, "dtype bool"),
    "rank 0": (_with(up=torch.ones(32, 0), down=torch.ones(0, 48)), {}, "rank 0"),
    "requests not a list": (None, {"requests": json.dumps(REQUEST)}, "'requests' must be a list, not an object"),
    "request not an object": (None, {"requests": json.dumps(["Rome"])}, "requests[0] must be an object"),
    "request subject a number": (None, {"requests": json.dumps([{**REQUEST, "subject": 5}])},
                                 "requests[0].subject must be a string, not a number"),
    "settings not an object": (None, {"settings": json.dumps([1, 2])}, "'settings' must be an object, not a list"),
    "settings not JSON": (None, {"settings": "{layer: 1"}, "'settings' is not valid JSON"),
    "info not an object": (None, {"info": "3"}, "'info' must be an object"),
    "no settings": (None, {"settings": None}, "has no 'settings'"),
    "no method": (None, {"method": None}, "has no 'method'"),
    "newer format version": (None, {"version": "2"}, "format version 2 (written by a newer factedit?) is not supported"),
    "unknown format version": (None, {"version": "1.0-beta"}, "unknown format version '1.0-beta'"),
    "no format version": (None, {"version": None}, "no format version"),
    "unexpected tensor": ({**factors(), f"{MODULE}::bias": torch.ones(32, 1)}, {}, "unexpected tensor"),
    "no tensors": ({}, {}, "holds no tensors"),
    "non-ASCII digit version": (None, {"version": "\u00b2"}, "unknown format version '\u00b2'"),  # "²".isdigit()
    "Arabic-Indic digit version": (None, {"version": "\u0661"}, "unknown format version"),  # int("١") == 1
}

# Well-formed files that do not fit the tiny Llama: refused when applied, not when read.
MISFIT_EDIT_FILES = {
    "wrong shape": ({f"{MODULE}::up": torch.ones(16, 1), f"{MODULE}::down": torch.ones(1, 48)},
                    "the edit changes a 16x48 matrix, but the model's weight is 32x48"),
    "transposed dense": ({f"{MODULE}::dense": torch.zeros(48, 32)}, "changes a 48x32 matrix"),
    "unknown module": ({"model.layers.9.mlp.down_proj::dense": torch.zeros(32, 48)}, "has no module"),
    "huge": ({name: 1e15 * t for name, t in factors().items()}, "times the norm of the weight it changes"),
}
