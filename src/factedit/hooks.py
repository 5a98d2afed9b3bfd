"""One small hook primitive: read or replace a module's input or output, optionally stop the forward.

    with Hook(block, keep_output=True) as h:            # record
        model(**batch)
    h.output

    with Hook(mlp_out, keep_input=True, stop=True) as h:  # record the key and stop there
        model(**batch)                                    # returns early, no error
    h.input

    with Hook(block, edit_output=lambda out: out * 0):  # replace
        model(**batch)

Modules whose output is a tuple (older block implementations) are handled: `output` and the
`edit_output` callback see the first element, which is the hidden state.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Callable

import torch
from torch import nn

Edit = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised inside a hook to end the forward pass early; swallowed by the Hook that raised it."""


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(value, new):
    if isinstance(value, tuple):
        return (new,) + value[1:]
    if isinstance(value, list):
        return [new] + value[1:]
    return new


class Hook:
    """Context manager around one module. All options are independent:

    keep_input / keep_output: store the (first positional) input / the output tensor.
    edit_input / edit_output: callbacks returning the tensor to use instead.
    skip: a callback computing the output from the input instead of running the module at all
          (used to reuse activations computed earlier); forward hooks still run after it.
    stop: raise StopForward after this module ran; the `with` block swallows it.
    detach: detach stored tensors (default True); set False to keep gradients.
    """

    def __init__(self, module: nn.Module, *, keep_input: bool = False, keep_output: bool = False,
                 edit_input: Edit | None = None, edit_output: Edit | None = None,
                 skip: Callable[..., object] | None = None, stop: bool = False, detach: bool = True):
        self.module = module
        self.keep_input, self.keep_output = keep_input, keep_output
        self.edit_input, self.edit_output = edit_input, edit_output
        self.skip, self.stop, self.detach = skip, stop, detach
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._handles: list = []
        self._saved_forward = None

    def _store(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if self.detach else tensor

    def _pre_hook(self, module, args, kwargs):
        if args:
            x = args[0]
        elif kwargs:
            key = next(iter(kwargs))  # blocks called with hidden_states=... by keyword
            x = kwargs[key]
        else:
            return None
        if self.edit_input is not None:
            x = self.edit_input(x)
            if args:
                args = (x,) + tuple(args[1:])
            else:
                kwargs = {**kwargs, key: x}
        if self.keep_input:
            self.input = self._store(x)
        return args, kwargs

    def _post_hook(self, module, args, kwargs, output):
        if self.edit_output is not None:
            output = _replace_first(output, self.edit_output(_first(output)))
        if self.keep_output:
            self.output = self._store(_first(output))
        if self.stop:
            raise StopForward
        return output

    def __enter__(self) -> "Hook":
        self._handles.append(self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._handles.append(self.module.register_forward_hook(self._post_hook, with_kwargs=True))
        if self.skip is not None:
            # Replacing the instance's forward keeps nn.Module.__call__'s hook machinery intact.
            self._saved_forward = self.module.__dict__.get("forward")
            self.module.forward = self.skip
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.skip is not None:
            if self._saved_forward is None:
                del self.module.forward
            else:
                self.module.forward = self._saved_forward
        return exc_type is StopForward and self.stop


class Hooks(ExitStack):
    """Several hooks at once: `with Hooks({name: Hook(...)}) as hs: ... hs[name].output`.

    A StopForward raised by any of them is swallowed here."""

    def __init__(self, hooks: dict[str, Hook] | list[Hook]):
        super().__init__()
        self.hooks = hooks if isinstance(hooks, dict) else dict(enumerate(hooks))

    def __enter__(self) -> "Hooks":
        super().__enter__()
        for hook in self.hooks.values():
            self.enter_context(hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        suppressed = super().__exit__(exc_type, exc, tb)
        return bool(suppressed) or exc_type is StopForward

    def __getitem__(self, key) -> Hook:
        return self.hooks[key]
