"""The state behind the web workbench: one model, its applied edits, and a queue of model jobs.

Every use of the model (tracing, editing, prediction, generation, applying or reverting an edit)
runs under one lock, so nothing ever observes a half-applied edit and edits never interleave. Long
work (tracing, editing with a first statistics computation) runs as a job on a single worker thread
and reports progress; the HTTP server stays responsive meanwhile.

Waiting is bounded: at most `max_model_waiters` requests wait for (or use) the model and at most
`max_queued_jobs` jobs wait for the worker; beyond that a request fails at once with Busy (HTTP 503),
since each waiting request holds one of the server's threads. What the page polls (the model's
description, the applied edits, a job's progress) are snapshots read without the lock.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..edit import EditDelta, EditRequest, EditStack, get_method
from ..edit.value import optimisation_summary
from ..errors import FacteditError
from ..generate import greedy_continuation
from ..models import LoadedModel
from ..progress import Step
from ..tokens import check_prompt_length, token_label
from ..trace.runs import last_token_probs, prepare
from ..trace.tracing import heatmaps
from ..workflows import edit_with_report


class JobCancelled(Exception):
    """Raised inside a job's work when the job was cancelled (Workbench.cancel)."""


class Busy(Exception):
    """Too many requests already wait for the model or the job worker: try again after `retry_after`
    seconds (the server answers 503 with a Retry-After header). Not the user's mistake, nor a bug."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


FINISHED = ("done", "error", "cancelled")


@dataclass
class Job:
    id: str
    kind: str
    status: str = "queued"  # queued, running, done, error, cancelled
    phase: str = ""
    done: int = 0
    total: int = 0
    result: dict | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    cancel_requested: bool = False

    def check_cancelled(self) -> None:
        """Stop the work here if the job was cancelled (called between steps)."""
        if self.cancel_requested:
            raise JobCancelled()

    def view(self) -> dict:
        return {"id": self.id, "kind": self.kind, "status": self.status, "phase": self.phase, "done": self.done,
                "total": self.total, "result": self.result, "error": self.error}

    def start_phase(self, name: str, total: int, unit: str = "") -> Step:
        """A progress reporter (factedit.progress.Phases): the job now runs phase `name` of `total` steps."""
        self.phase, self.done, self.total = name, 0, total

        def step(n: int) -> None:
            self.done += n

        return step


@dataclass
class AppliedEdit:
    id: int
    delta: EditDelta
    label: str
    source: str  # "edited here" or "uploaded"


class Workbench:
    def __init__(self, lm: LoadedModel, *, stats_corpus: str | None = None, stats_tokens: int = 100_000,
                 max_jobs_kept: int = 100, max_model_waiters: int = 8, max_queued_jobs: int = 16):
        self.lm = lm
        self.stats_corpus, self.stats_tokens = stats_corpus, stats_tokens
        self.lock = threading.Lock()  # the model's: held while anything uses it
        self.stack = EditStack(lm)
        self.edits: tuple[AppliedEdit, ...] = ()  # replaced whole, under the model lock: readers need no lock
        self._ids = itertools.count(1)
        self.jobs: dict[str, Job] = {}
        self.max_jobs_kept = max_jobs_kept
        self.max_model_waiters, self.max_queued_jobs = max_model_waiters, max_queued_jobs
        self._model_slots = threading.BoundedSemaphore(max_model_waiters)
        self._jobs_lock = threading.Lock()  # guards `jobs` and `_queued` (never held while using the model)
        self._queued: set[str] = set()  # ids of the jobs waiting for the worker, not cancelled
        self._description = {"model": lm.name, "fingerprint": lm.fingerprint, "n_layers": lm.n_layers,
                             "d_model": lm.arch.d_model, "architecture": lm.arch.describe()}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="factedit-model")

    @contextmanager
    def _model(self) -> Iterator[None]:
        """Hold the model lock for a request, waiting only if fewer than `max_model_waiters` requests do."""
        if not self._model_slots.acquire(blocking=False):
            raise Busy(f"the model is busy: {self.max_model_waiters} requests already wait for it or use it (a "
                       f"running job holds it for as long as it runs); try again in a few seconds", retry_after=5)
        try:
            with self.lock:
                yield
        finally:
            self._model_slots.release()

    # ------------------------------------------------------------------------------------- jobs
    def submit(self, kind: str, work: Callable[[Job], dict]) -> Job:
        with self._jobs_lock:
            if len(self._queued) >= self.max_queued_jobs:
                raise Busy(f"{self.max_queued_jobs} jobs already wait for the model; wait for them to finish "
                           f"(or cancel some), then try again", retry_after=10)
            job = Job(uuid.uuid4().hex[:12], kind)
            self.jobs[job.id] = job
            self._queued.add(job.id)
            finished = sorted((j for j in self.jobs.values() if j.status in FINISHED), key=lambda j: j.created)
            for old in finished[:max(0, len(self.jobs) - self.max_jobs_kept)]:
                del self.jobs[old.id]

        def run():
            with self._jobs_lock:
                self._queued.discard(job.id)
            if job.cancel_requested:
                job.status, job.error = "cancelled", "cancelled"
                return
            job.status = "running"
            try:
                with self.lock:
                    job.check_cancelled()
                    job.result = work(job)
                job.status = "done"
            except JobCancelled:
                job.status, job.error = "cancelled", "cancelled"
            except FacteditError as err:  # the user's input: the message is for them
                job.status, job.error = "error", str(err)
            except Exception as err:  # a bug: reported to the page with its type, logged with its traceback
                job.status, job.error = "error", f"{type(err).__name__}: {err}"
                traceback.print_exc()

        self.executor.submit(run)
        return job

    def cancel(self, job: Job) -> Job:
        """Ask a queued or running job to stop: a queued one never starts, a running one stops at its
        next step (only for work that checks, such as tracing; it leaves no state behind)."""
        if job.status in ("queued", "running"):
            job.cancel_requested = True
            with self._jobs_lock:
                self._queued.discard(job.id)  # it will never start: its place in the queue is free
        return job

    # ----------------------------------------------------------------------------- model reads
    def info(self) -> dict:
        return {**self._description, "edits": self.list_edits()}

    def predictions(self, prompt: str, k: int = 10) -> list[dict]:
        with self._model():
            return self._top_unlocked(prompt, k)

    def generate(self, prompt: str, n_new: int = 20) -> str:
        with self._model():
            return greedy_continuation(self.lm, prompt, n_new)

    # ---------------------------------------------------------------------------------- tracing
    def trace_job(self, prompt: str, subject: str, kinds: list[str], samples: int, window: int, seed: int,
                  approx: str | None = None) -> Job:
        """Exact causal-tracing heatmaps (one restoration run per cell), or with approx="atp"
        attribution-patching estimates of every cell from one forward and backward pass (atp.py).
        The result says which: "approx" is null for exact heatmaps, else the approximation's name."""
        def work(job: Job) -> dict:
            run = prepare(self.lm, prompt, subject, samples=samples, seed=seed)
            job.check_cancelled()

            def phases(name: str, total: int, unit: str) -> Step:
                step = job.start_phase(name, total, unit)

                def checked(n: int) -> None:
                    job.check_cancelled()  # between restoration batches
                    step(n)

                return checked

            results = heatmaps(run, kinds, window=window, approx=approx, progress=phases)
            maps = {}
            for kind, result in results.items():
                if not np.isfinite(result.scores).all():  # JSON has no NaN: say so instead of failing the view
                    raise RuntimeError(f"the {kind} heatmap has non-finite values")
                maps[kind] = {"scores": result.scores.tolist(), "window": result.window,
                              "approx": result.approx or None}
            return {"answer": run.answer, "p_clean": run.p_clean, "p_corrupt": run.p_corrupt,
                    "tokens": run.tokenized.tokens, "subject_range": list(run.tokenized.subject_range),
                    "approx": approx or None, "heatmaps": maps, "predictions": self._top_unlocked(prompt)}

        return self.submit("trace", work)

    def _top_unlocked(self, prompt: str, k: int = 10) -> list[dict]:
        with torch.no_grad():
            ids = torch.tensor([check_prompt_length(self.lm, prompt)], device=self.lm.device)
            probs, _ = last_token_probs(self.lm, ids)
        top = probs[0].topk(k)
        return [{"token": token_label(self.lm.tokenizer, int(i)), "p": float(p)} for p, i in zip(top.values, top.indices)]

    # ---------------------------------------------------------------------------------- editing
    def edit_job(self, request: EditRequest, method: str, layer: int | None, paraphrases: list[str]) -> Job:
        spec = get_method(method)

        def work(job: Job) -> dict:
            settings = spec.settings_with(self.lm, layer, stats_corpus=self.stats_corpus, stats_tokens=self.stats_tokens)

            def apply(delta: EditDelta) -> AppliedEdit:
                edited = delta.requests[0]  # with its current target filled in
                label = f"{edited['subject']}: {edited['target_true'].strip()} -> {edited['target_new'].strip()} ({method})"
                return self._apply(delta, label, "edited here")

            made = edit_with_report(self.lm, request, method, settings, paraphrases=paraphrases,
                                    progress=job.start_phase, apply=apply)
            return {"edit": self._view(made.applied), **made.report.to_dict(),
                    "optimisation": optimisation_summary(made.diagnostics)}

        return self.submit("edit", work)

    def _apply(self, delta: EditDelta, label: str, source: str, *, probe: bool = False) -> AppliedEdit:
        # checks the fingerprint, shapes and size first (and with `probe` the predictions after);
        # a refused edit leaves the model unchanged
        self.stack.apply(delta, probe=probe)
        applied = AppliedEdit(next(self._ids), delta, label, source)
        self.edits = (*self.edits, applied)
        return applied

    def upload(self, delta: EditDelta, filename: str) -> dict:
        with self._model():
            label = ", ".join(f"{r['subject']} -> {r['target_new'].strip()}" for r in delta.requests[:3]) or filename
            return self._view(self._apply(delta, f"{label} ({delta.method}, {filename})", "uploaded", probe=True))

    def revert(self, edit_id: int) -> dict:
        with self._model():
            index = next((i for i, e in enumerate(self.edits) if e.id == edit_id), None)
            if index is None:
                raise KeyError(f"no applied edit with id {edit_id}")
            self.stack.revert(index)
            reverted, self.edits = self.edits[index], self.edits[:index] + self.edits[index + 1:]
            return self._view(reverted)

    def get_edit(self, edit_id: int) -> AppliedEdit:
        for applied in self.edits:
            if applied.id == edit_id:
                return applied
        raise KeyError(f"no applied edit with id {edit_id}")

    def list_edits(self) -> list[dict]:
        return [self._view(e) for e in self.edits]

    @staticmethod
    def _view(applied: AppliedEdit) -> dict:
        return {"id": applied.id, "label": applied.label, "method": applied.delta.method, "source": applied.source,
                "requests": applied.delta.requests}
