"""Dataset loaders (known facts here; CounterFact and zsRE follow)."""

from .counterfact import CounterFactRecord, load_counterfact
from .known import DatasetError, KnownFact, load_known_facts

__all__ = ["CounterFactRecord", "DatasetError", "KnownFact", "load_counterfact", "load_known_facts"]
