"""The workers: Ray actors that each load the model once, and the loop that hands them items, runs
an item again elsewhere when its worker dies, and replaces the dead worker."""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from ..errors import FacteditError
from .connection import ClusterError, ClusterSpec, Connection, connect, worker_count


@dataclass(frozen=True)
class WorkerModel:
    """The model each worker loads for itself (the fields of the CLI's ModelChoice), and its threads."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    device_map: str | None = None

    @classmethod
    def of(cls, choice) -> "WorkerModel":
        """From a cli.options.ModelChoice; workers default to one torch thread each (the CPUs Ray gives them)."""
        return cls(choice.name, choice.device, choice.dtype, choice.threads or 1, choice.device_map)

    def on_gpu(self) -> "WorkerModel":
        """The model on the worker's GPU when it was asked for the CPU (Ray makes the GPUs it gives an
        actor its only visible ones, so "cuda" is that GPU)."""
        if self.device == "cpu" and self.device_map is None:
            return WorkerModel(self.name, "cuda", self.dtype, self.threads, self.device_map)
        return self


class ModelWorker:
    """The body of a Ray actor: loads the model once and runs functions of (model, item) on it.

    A user error while loading (a model that this node cannot find, other weights than the
    driver's) is kept and raised by each call, so that the driver shows its message; an actor whose
    constructor raised would only report that it died."""

    def __init__(self, model: WorkerModel, fingerprint: str | None):
        import torch

        from ..models import load

        torch.set_num_threads(model.threads)
        self.lm, self.error = None, None
        try:
            self.lm = load(model.name, device=model.device, dtype=model.dtype, device_map=model.device_map)
            if fingerprint is not None and self.lm.fingerprint != fingerprint:
                raise ClusterError(f"a worker on {socket.gethostname()} loaded {model.name} with weights "
                                   f"{self.lm.fingerprint}, not the driver's {fingerprint}; give every node the "
                                   "same model files")
        except FacteditError as err:
            self.error = err

    def call(self, fn: Callable[[Any, Any], Any], item: Any) -> Any:
        if self.error is not None:
            raise self.error
        return fn(self.lm, item)


@dataclass
class WorkerPool:
    """Ray actors that each hold the model, started on first use and killed on close.

    run() hands items out one per idle worker; an item whose worker died (killed, out of memory,
    its node lost) goes to another worker, and a fresh worker takes the dead one's place, up to
    `max_deaths` deaths in all (then a ClusterError, rather than a loop that never ends)."""

    connection: Connection
    model: WorkerModel
    spec: ClusterSpec
    fingerprint: str | None = None
    max_deaths: int | None = None  # default: twice the number of workers
    reruns: int = 0  # items run again because their worker died
    deaths: int = 0
    _size: int | None = field(default=None, init=False)
    _actors: list = field(default_factory=list, init=False)
    _busy: set = field(default_factory=set, init=False)  # id() of the actors that hold an item

    @property
    def size(self) -> int:
        """How many workers (checked against the cluster's resources once)."""
        if self._size is None:
            self._size = worker_count(self.spec, self.connection.resources(), self.model.threads)
        return self._size

    @property
    def actors(self) -> list:
        """The live workers' actor handles (started on first use)."""
        return list(self._actors)

    def running_actors(self) -> list:
        """The workers that hold an item now."""
        return [a for a in self._actors if id(a) in self._busy]

    def _new_actor(self):
        ray = self.connection.ray
        model = self.model.on_gpu() if self.spec.gpus_per_worker > 0 else self.model
        remote = ray.remote(ModelWorker).options(num_cpus=self.model.threads, num_gpus=self.spec.gpus_per_worker,
                                                 max_restarts=0, max_concurrency=1)
        return remote.remote(model, self.fingerprint)

    def start(self) -> None:
        """Start the workers (they load the model in the background; calls wait for that)."""
        if not self._actors:
            self._actors = [self._new_actor() for _ in range(self.size)]

    def _replace(self, dead, err) -> Any:
        self.deaths += 1
        limit = self.max_deaths if self.max_deaths is not None else 2 * len(self._actors)
        if getattr(err, "actor_init_failed", False):
            raise ClusterError(f"a worker could not start: {err}") from None
        if self.deaths > limit:
            raise ClusterError(f"{self.deaths} workers died (more than {limit}); the last: {err}") from None
        self.connection.ray.kill(dead, no_restart=True)
        fresh = self._new_actor()
        self._actors[self._actors.index(dead)] = fresh
        return fresh

    def run(self, fn: Callable[[Any, Any], Any], items: Iterable, *, ordered: bool = False,
            window: int | None = None) -> Iterator[tuple[int, Any]]:
        """(index, fn(model, item)) for each item, as they finish (ordered: in the items' order, with
        at most `window` items taken ahead of the first not yet yielded, so that a consumer that stops
        early wastes little). Items are read lazily. A user error (FacteditError) raised by fn on a
        worker is raised here as itself."""
        ray = self.connection.ray
        self.start()
        source, exhausted = enumerate(items), False
        retry: deque = deque()
        running: dict = {}  # object ref -> (actor, index, item)
        idle = list(self._actors)
        finished: dict[int, Any] = {}
        taken = next_out = 0
        try:
            while True:
                while idle:
                    if retry:
                        index, item = retry.popleft()
                    elif not exhausted and (window is None or taken - next_out < window):
                        try:
                            index, item = next(source)
                        except StopIteration:
                            exhausted = True
                            continue
                        taken += 1
                    else:
                        break
                    actor = idle.pop()
                    self._busy.add(id(actor))
                    running[actor.call.remote(fn, item)] = (actor, index, item)
                if not running:
                    return
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor, index, item = running.pop(ref)
                self._busy.discard(id(actor))
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as err:  # the worker died: the item goes elsewhere
                    idle.append(self._replace(actor, err))
                    retry.append((index, item))
                    self.reruns += 1
                    continue
                except ray.exceptions.RayTaskError as err:
                    if isinstance(err.cause, FacteditError):
                        raise err.cause from None
                    raise
                idle.append(actor)
                if not ordered:
                    yield index, result
                    continue
                finished[index] = result
                while next_out in finished:
                    yield next_out, finished.pop(next_out)
                    next_out += 1
        finally:
            for ref in running:  # items nobody waits for any more: dropped if queued, else run out
                try:
                    ray.cancel(ref)
                except Exception:  # already finished or its worker gone: nothing to stop
                    pass
            self._busy.clear()

    def close(self) -> None:
        for actor in self._actors:
            self.connection.ray.kill(actor, no_restart=True)
        self._actors = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ClusterRun:
    """A command's use of the cluster: connected on entry (so that a bad address fails before the
    model loads), workers made once the driver knows the model's fingerprint (pool), everything
    stopped on exit: workers killed, a local cluster shut down."""

    def __init__(self, spec: ClusterSpec, model) -> None:
        self.spec, self.model = spec, WorkerModel.of(model) if not isinstance(model, WorkerModel) else model
        self.connection: Connection | None = None
        self.workers: WorkerPool | None = None

    def __enter__(self) -> "ClusterRun":
        self.connection = connect(self.spec, self.model.threads)
        return self

    def pool(self, fingerprint: str | None) -> WorkerPool:
        if self.workers is None:
            self.workers = WorkerPool(self.connection, self.model, self.spec, fingerprint)
        return self.workers

    def describe(self) -> str:
        where = "a local Ray on 127.0.0.1" if self.connection.local else f"the Ray cluster at {self.connection.address}"
        size = self.workers.size if self.workers is not None else "?"
        return f"{size} worker(s) of {self.model.threads} thread(s) on {where}"

    def __exit__(self, *exc) -> None:
        try:
            if self.workers is not None:
                self.workers.close()
        finally:
            self.connection.close()
