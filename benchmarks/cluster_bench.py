"""Throughput with Ray workers (factedit.cluster) against one process, on this machine.

    python benchmarks/cluster_bench.py [--records 4] [--v-steps 4] [--tokens 8192] [--repeats 2]
                                       [--workers 1 2] [--model smollm2-135m]

Prints, as medians of --repeats runs: CounterFact evaluation records per second (ROME) in one
process and with 1 and 2 local Ray workers of one thread each; key-statistics tokens per second
computed in one process and sharded over the same workers; and each ratio to the single process.
Every process uses one torch thread. The workers are started (model loaded) before the clock runs;
the start-up time is printed apart. In a cluster run the driver edits the first batch itself
(filling the caches), so "1 worker" means two processes working. On a 2-core machine shared with
other jobs the numbers are noisy: compare ratios, and rerun.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from common import Stopwatch, data_file, timed

from factedit import load
from factedit.cluster import ClusterRun, ClusterSpec, WorkerModel, evaluation_dispatch, sharded_moments, start_local
from factedit.edit import get_method
from factedit.evaluate.runner import run_evaluation
from factedit.stats import collect_second_moments, corpus_from


def fingerprint(lm, _item) -> str:
    """A call that returns once a worker has loaded its model."""
    return lm.fingerprint


def evaluate(lm, settings, args, dispatch=None) -> None:
    with tempfile.TemporaryDirectory() as out:
        run_evaluation(lm, "rome", "counterfact", out, data=args.data, n=args.records, settings=settings,
                       dispatch=dispatch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=data_file("counterfact", "counterfact_dev.json"))
    parser.add_argument("--corpus", default=data_file("wiki", "enwiki_sample.jsonl"))
    parser.add_argument("--records", type=int, default=4, help="CounterFact records per evaluation run")
    parser.add_argument("--v-steps", type=int, default=4, help="ROME's value steps (its default is 100)")
    parser.add_argument("--stats-tokens", type=int, default=4096, help="statistics tokens ROME's edits read")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens for the statistics throughput")
    parser.add_argument("--layer", type=int, default=3, help="layer of the statistics throughput")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    lm = load(args.model)
    settings = get_method("rome").settings_with(lm, None, stats_corpus=args.corpus, stats_tokens=args.stats_tokens,
                                                v_steps=args.v_steps)
    corpus = corpus_from(args.corpus)
    evaluate(lm, settings, argparse.Namespace(**{**vars(args), "records": 1}))  # fill the caches first
    rows = [("single process", timed(lambda: evaluate(lm, settings, args), args.repeats)[0],
             timed(lambda: collect_second_moments(lm, [args.layer], corpus, args.tokens), args.repeats)[0])]
    for workers in args.workers:
        clock = Stopwatch()
        connection = start_local(ClusterSpec("auto", workers=workers), threads=1)
        try:
            with ClusterRun(ClusterSpec("auto", workers=workers), WorkerModel(args.model, threads=1)) as run:
                pool = run.pool(lm.fingerprint)
                list(pool.run(fingerprint, range(workers)))  # every worker up, its model loaded
                started = clock.seconds
                sum_chunks = sharded_moments(pool)
                rows.append((f"{workers} Ray worker(s)",
                             timed(lambda: evaluate(lm, settings, args, evaluation_dispatch(pool)), args.repeats)[0],
                             timed(lambda: collect_second_moments(lm, [args.layer], corpus, args.tokens,
                                                                  sum_chunks=sum_chunks), args.repeats)[0]))
                print(f"{workers} worker(s): Ray and workers started in {started:.1f} s", file=sys.stderr)
        finally:
            connection.close()
    single_eval, single_stats = rows[0][1], rows[0][2]
    print(f"{args.model}, ROME ({args.v_steps} value steps) on {args.records} CounterFact records; statistics over "
          f"{args.tokens} tokens at layer {args.layer}; 1 torch thread per process; median of {args.repeats} run(s); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared machine: noisy)")
    print("| run | eval records/s | vs single | statistics tokens/s | vs single |")
    print("|---|---|---|---|---|")
    for name, eval_seconds, stats_seconds in rows:
        print(f"| {name} | {args.records / eval_seconds:.3f} | {single_eval / eval_seconds:.2f}x | "
              f"{args.tokens / stats_seconds:.0f} | {single_stats / stats_seconds:.2f}x |")


if __name__ == "__main__":
    main()
