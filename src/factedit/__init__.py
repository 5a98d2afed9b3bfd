"""factedit: locate and edit factual associations in transformer language models."""

from .models import LoadedModel, load

__all__ = ["LoadedModel", "load"]
