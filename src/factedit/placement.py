"""Reading and writing weights wherever a device map put them.

A model loaded with `device_map` (accelerate) may have modules whose weights are offloaded: the
parameter is an empty "meta" tensor and the values live in accelerate's offload map (in CPU memory,
or memory-mapped from disk), loaded onto the execution device for each forward pass. Edits read and
write weights through these two functions, so they work the same on a model in one piece, split
over devices, or offloaded. An edited offloaded weight is kept in the offload map's memory (a
disk-offloaded file is never rewritten).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import FacteditError


class PlacementError(FacteditError, RuntimeError):
    """A weight is offloaded in a way the edit cannot read or write."""


def _offload_map(module: nn.Module, name: str):
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if weights_map is None or not getattr(hook, "offload", False):
        raise PlacementError(f"{type(module).__name__}.{name} is on the meta device and has no accelerate offload "
                             "map to read it from")
    return weights_map


def is_offloaded(module: nn.Module, name: str = "weight") -> bool:
    return getattr(module, name).device.type == "meta"


def read_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The module's tensor `name` with its values: the parameter itself, or the offloaded copy."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    return _offload_map(module, name)[name]


@torch.no_grad()
def write_weight(module: nn.Module, value: torch.Tensor, name: str = "weight") -> None:
    """Set the module's tensor `name` to `value` in place, where it lives."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        tensor.copy_(value.to(tensor.device, tensor.dtype))
        return
    weights_map = _offload_map(module, name)
    store = getattr(weights_map.dataset, "state_dict", None)
    if not isinstance(store, dict):
        raise PlacementError(f"cannot write {type(module).__name__}.{name}: its offload map "
                             f"({type(weights_map.dataset).__name__}) keeps no tensors in memory")
    current = weights_map[name]
    store[weights_map.prefix + name] = value.detach().to(current.device, current.dtype).clone()


def named_tensors(model: nn.Module):
    """(name, values) of every entry of the model's state dict, offloaded ones included."""
    for key in model.state_dict(keep_vars=True):
        module_name, _, name = key.rpartition(".")
        yield key, read_weight(model.get_submodule(module_name), name)
