"""The commands' progress bars. They are drawn on stderr, so that stdout carries only the results
(and can be piped or compared)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def stderr_bar(total: int | None, desc: str, unit: str) -> tqdm:
    """One bar counting `unit`s up to `total` (None: no known end); use it as a context manager."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)


class PhaseBars:
    """A progress reporter (factedit.progress.Phases) that draws one bar with its total per phase on
    stderr, closing the previous phase's bar when the next one starts."""

    def __init__(self, only: tuple[str, ...] | None = None):
        self.bar, self.only = None, only  # only: the phases drawn (eval: the one-time ones); None: all

    def __call__(self, name: str, total: int, unit: str):
        self.close()
        if self.only is not None and name not in self.only:
            return lambda n: None
        self.bar = stderr_bar(total, name, unit)
        return self.bar.update

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            sys.stderr.flush()  # the bar's closing line break, before anything else is printed
            self.bar = None

    def __enter__(self) -> "PhaseBars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
