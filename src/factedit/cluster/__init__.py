"""Work spread over many processes and machines with Ray (the optional extra factedit[cluster]).

`factedit eval`, `stats` and `trace-avg` take `--cluster auto|HOST:PORT`: the driver (the command's
own process) loads the model, checks the input and writes every output file as today; Ray actors
("workers"), each holding the model once, do the heavy part:
- eval: batches of records (edit, score against the unedited model, revert; runner.batch_cases);
- stats: whole batches of the corpus's token chunks, their sums of k k^T merged in the driver;
- trace-avg: facts, their records handed back in the facts' order.
A worker that dies has its pending item run again on another worker (or a fresh one), so results
and files equal a single-process run's.

`auto` connects to the cluster `ray start` left running on this machine (or $RAY_ADDRESS), else
starts a local Ray that listens on 127.0.0.1 only and is stopped when the command ends. A HOST:PORT
is first probed with a plain TCP connect, so an unreachable address fails within seconds. Ray is
imported only here and only when a command is given --cluster.

Modules: connection.py (joining or starting a cluster, the address probe), pool.py (the workers, how
items are handed out and run again), work.py (what eval, stats and trace-avg send to the workers).
"""

from .connection import (ClusterError, ClusterSpec, Connection, connect, import_ray, parse_address, probe,
                         running_cluster_address, start_local, worker_count)
from .pool import ClusterRun, ModelWorker, WorkerModel, WorkerPool
from .work import evaluation_dispatch, fact_records, sharded_moments

__all__ = ["ClusterError", "ClusterRun", "ClusterSpec", "Connection", "ModelWorker", "WorkerModel", "WorkerPool",
           "connect", "evaluation_dispatch", "fact_records", "import_ray", "parse_address", "probe",
           "running_cluster_address", "sharded_moments", "start_local", "worker_count"]
