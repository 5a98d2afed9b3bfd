"""Shared by the benchmark scripts: median wall time of repeated runs."""

import statistics
import time


def timed(fn, repeats: int):
    """(median seconds, last result) of `repeats` calls of fn."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result
