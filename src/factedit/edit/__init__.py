"""Editors: requests -> EditDelta (apply, revert, save, load). Methods live in one registry."""

from .alphaedit import AlphaEditSettings
from .delta import EditDelta, EditFileError, EditStack
from .finetune import FinetuneSettings
from .history import EditHistory, HistoryError
from .memit import MemitSettings
from .registry import METHODS, Method, edit, get_method, register
from ..request import EditRequest
from .rome import RomeSettings

__all__ = ["AlphaEditSettings", "EditDelta", "EditHistory", "HistoryError", "EditFileError", "EditRequest", "EditStack", "FinetuneSettings", "METHODS", "MemitSettings", "Method",
           "RomeSettings", "edit", "get_method", "register"]
