"""Editors: requests -> EditDelta (apply, revert, save, load). Methods live in one registry.

One module per method (rome, memit, alphaedit, encore, finetune, kn). What methods share lives in modules
named after the step, never in a method's module: prefixes (the context templates), layers (the
default layer), value (the value optimisation), targets (the mass editors' targets z), mass_edit
(their settings and the spreading of a residual over layers), prompts and mlp_change; the key
statistics are factedit.stats'. No method module imports another's (tests/test_structure.py)."""

from .alphaedit import AlphaEditSettings
from .delta import EditDelta, EditFileError, EditStack
from .encore import EncoreSettings
from .finetune import FinetuneSettings
from .history import EditHistory, HistoryError
from .memit import MemitSettings
from .registry import METHODS, Method, edit, get_method, register
from ..request import EditRequest
from .rome import RomeSettings

__all__ = ["AlphaEditSettings", "EditDelta", "EditHistory", "HistoryError", "EditFileError", "EditRequest", "EditStack", "EncoreSettings", "FinetuneSettings", "METHODS", "MemitSettings", "Method",
           "RomeSettings", "edit", "get_method", "register"]
