"""Dataset loaders (known facts here; CounterFact and zsRE follow)."""

from .known import KnownFact, load_known_facts

__all__ = ["KnownFact", "load_known_facts"]
