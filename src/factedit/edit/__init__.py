"""Editors: requests -> EditDelta (apply, revert, save, load). Methods live in one registry."""

from .delta import EditDelta, EditFileError, EditStack
from .finetune import FinetuneSettings
from .memit import MemitSettings
from .registry import METHODS, Method, edit, get_method, register
from ..request import EditRequest
from .rome import RomeSettings

__all__ = ["EditDelta", "EditFileError", "EditRequest", "EditStack", "FinetuneSettings", "METHODS", "MemitSettings", "Method",
           "RomeSettings", "edit", "get_method", "register"]
