"""What `factedit eval`, `stats` and `trace-avg` send to the workers, in the shapes the runner,
the statistics and the tracing averages take (their `dispatch`, `collect` and `records` hooks)."""

from __future__ import annotations

from contextlib import closing

from .pool import WorkerPool


def evaluation_dispatch(pool: WorkerPool):
    """For runner.run_evaluation(dispatch=...): its batches on the workers, each yielded with its
    case dicts as it finishes."""
    from ..evaluate.runner import batch_cases

    def dispatch(jobs):
        for index, cases in pool.run(batch_cases, jobs):
            yield jobs[index], cases

    return dispatch


def chunk_moments(lm, item: tuple[list[int], list[list[int]], int]) -> dict:
    """A worker's share of the statistics: the sums of k k^T of whole batches of token chunks."""
    from ..stats import moments_of_chunks

    layers, chunks, batch_size = item
    return moments_of_chunks(lm, layers, chunks, batch_size=batch_size)


def sharded_moments(pool: WorkerPool, shards_per_worker: int = 4):
    """For stats.collect_second_moments(sum_chunks=...): the driver takes the token chunks a single
    process would, hands out whole batches of them in contiguous shards (each batch the same as in a
    single-process run), and merges the workers' sums in shard order."""

    def sum_chunks(lm, layers, chunks, *, batch_size=8, progress=None):
        from ..stats import SecondMoment

        pool.start()  # the workers load the model while this process cuts the corpus into chunks
        chunks = list(chunks)
        batches = [chunks[i:i + batch_size] for i in range(0, len(chunks), batch_size)]
        n_shards = max(1, min(len(batches), pool.size * shards_per_worker))
        bounds = [round(i * len(batches) / n_shards) for i in range(n_shards + 1)]
        shards = [[c for batch in batches[a:b] for c in batch] for a, b in zip(bounds, bounds[1:])]
        parts: dict[int, dict] = {}
        for index, part in pool.run(chunk_moments, [(layers, shard, batch_size) for shard in shards]):
            parts[index] = part
            if progress:
                progress(part[max(layers)].count)
        total = {layer: SecondMoment.empty(lm.arch.d_mlp) for layer in layers}
        for index in sorted(parts):
            for layer in layers:
                total[layer].merge(parts[index][layer])
        return total

    return sum_chunks


def trace_fact(lm, item: tuple) -> dict:
    """A worker's fact: average.fact_record."""
    from ..trace.average import fact_record

    fact, kinds, settings, replacements = item
    return fact_record(lm, fact, kinds, settings, pool=replacements)


def fact_records(pool: WorkerPool, lookahead: int = 2):
    """For trace.average.average_effects(records=...): facts traced on the workers, handed back in
    the facts' order, at most `lookahead` facts per worker ahead of the one awaited."""

    def records(facts, kinds, settings, replacements):
        items = ((fact, kinds, settings, replacements) for fact in facts)
        with closing(pool.run(trace_fact, items, ordered=True, window=lookahead * pool.size)) as results:
            for _, record in results:  # closed early: the facts still in flight are dropped
                yield record

    return records
