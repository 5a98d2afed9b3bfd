"""Dataset loaders (known facts here; CounterFact and zsRE follow)."""

from .counterfact import CounterFactRecord, load_counterfact
from .known import DatasetError, KnownFact, load_known_facts
from .zsre import ZsreRecord, load_zsre

__all__ = ["CounterFactRecord", "DatasetError", "KnownFact", "ZsreRecord", "load_counterfact", "load_known_facts",
           "load_zsre"]
