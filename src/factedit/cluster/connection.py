"""Joining a Ray cluster, or starting a local one: Ray is imported here, on demand only.

`auto` joins the cluster `ray start` left running on this machine (or $RAY_ADDRESS), else starts a
local Ray that listens on 127.0.0.1 only. A HOST:PORT is probed with a plain TCP connect first, so
that an unreachable address fails within seconds instead of leaving ray.init retrying for minutes.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FacteditError

PROBE_SECONDS = 3.0
INSTALL_HINT = "pip install 'factedit[cluster]'"
# Ray reads these when it is imported; a local cluster started with them binds to 127.0.0.1 only
# (Ray treats such a node as a single-machine one) and reports no usage statistics.
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


class ClusterError(FacteditError):
    """The cluster cannot be used: Ray is not installed, the address cannot be reached, the cluster
    lacks the resources asked for, or workers keep dying."""


@dataclass(frozen=True)
class ClusterSpec:
    """What --cluster, --workers and --gpus-per-worker ask for."""

    address: str  # "auto", "HOST:PORT" or "ray://HOST:PORT"
    workers: int | None = None  # None: as many as the cluster's CPUs (or GPUs) allow
    gpus_per_worker: float = 0.0


def import_ray(local_only: bool = False):
    """Ray, imported on demand; a clear message naming the extra when it is not installed.
    local_only: before the first import, set what makes a local cluster listen on 127.0.0.1."""
    if local_only and "ray" not in sys.modules:
        for name, value in LOCAL_ONLY_ENV.items():
            os.environ.setdefault(name, value)  # process-wide on purpose: Ray's own processes inherit it
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--cluster needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def parse_address(address: str) -> tuple[str, int]:
    """HOST and PORT of 'HOST:PORT' or 'ray://HOST:PORT'; a ClusterError naming the expected form."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"--cluster {address!r} is not an address: give auto, HOST:PORT (the head node's "
                           "`ray start --head` port, 6379 by default) or ray://HOST:PORT")
    return host, int(port)


def probe(address: str, timeout: float = PROBE_SECONDS) -> None:
    """A plain TCP connect to the address, then the opening of an HTTP/2 connection, which a Ray
    head (its GCS, a gRPC server) answers at once: so that an unreachable address, or one where
    something else listens, fails within `timeout` seconds with a clear message instead of leaving
    ray.init retrying for minutes. (With TLS, $RAY_USE_TLS, only the connect is checked.)"""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
                answered = _answers_http2(sock)
            else:
                answered = True
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({reason} after at most {timeout:g} s); "
                           "start one there with `ray start --head`, check the address and firewall, or use "
                           "--cluster auto for a local one") from None
    if not answered:
        raise ClusterError(f"{address} answers, but not as a Ray head node; give the address `ray start --head` "
                           "printed (HOST:6379 by default)")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _answers_http2(sock: socket.socket) -> bool:
    """Whether the server answers the HTTP/2 client preface with a SETTINGS frame (a 9-byte frame
    header whose type byte is 4), as every gRPC server does first; the socket's timeout applies."""
    sock.sendall(HTTP2_PREFACE)
    header = b""
    try:
        while len(header) < 9:
            data = sock.recv(9 - len(header))
            if not data:
                break
            header += data
    except TimeoutError:
        return False
    return len(header) == 9 and header[3] == 4


def running_cluster_address() -> str | None:
    """The cluster ray.init(address="auto") would join: $RAY_ADDRESS, else the address the last
    `ray start` on this machine wrote to <ray temp dir>/ray_current_cluster; read without importing
    Ray, because a local cluster must be set up before Ray is imported."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    import tempfile

    current = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        return current.read_text().strip() or None
    except OSError:
        return None


@dataclass
class Connection:
    """A connection to Ray; `close` stops the local cluster this process started (and only that)."""

    ray: Any
    address: str  # where it is: the GCS address
    started_here: bool  # this process ran ray.init (and so shuts it down)
    local: bool  # a cluster started by this process on this machine

    def resources(self) -> dict[str, float]:
        return self.ray.cluster_resources()

    def close(self) -> None:
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(spec: ClusterSpec, threads: int = 1) -> Connection:
    """Join the cluster `spec` names (probed first: an unreachable address fails within seconds),
    or for `auto` the one running on this machine, else a new local one (start_local). A process
    that has already called ray.init keeps that connection."""
    address = spec.address
    if address != "auto":
        probe(address)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return Connection(ray, ray.get_runtime_context().gcs_address, started_here=False, local=False)
    where = address
    if address == "auto":
        where = running_cluster_address()
        if not (where and where not in ("auto", "local") and _reachable(where)):
            return start_local(spec, threads)
    ray = import_ray()
    try:  # "auto" lets Ray find the cluster and, for one started here, its authentication token
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError) as err:  # reachable, but refused (a token, another Ray version)
        raise ClusterError(f"could not join the Ray cluster at {where}: {err}. "
                           "If it uses token authentication (`ray start` enables it where a token exists), set "
                           "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or copy ~/.ray/auth_token from the head node); "
                           "check too that it runs Ray " + ray.__version__) from None
    return Connection(ray, ray.get_runtime_context().gcs_address, started_here=True, local=False)


def _reachable(address: str) -> bool:
    try:
        probe(address, timeout=1.0)
    except ClusterError:
        return False  # a file left by a cluster that has stopped
    return True


def start_local(spec: ClusterSpec, threads: int = 1) -> Connection:
    """A Ray on this machine for this process only: on 127.0.0.1, no dashboard, CPUs for
    spec.workers workers of `threads` threads (default: every CPU); close() stops it."""
    ray = import_ray(local_only=True)
    cpus = (spec.workers or max(1, (os.cpu_count() or 1) // threads)) * threads
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return Connection(ray, ray.get_runtime_context().gcs_address, started_here=True, local=True)


def worker_count(spec: ClusterSpec, resources: dict[str, float], threads: int) -> int:
    """spec.workers, or as many as the cluster's CPUs (and GPUs, when workers take GPUs) hold; a
    ClusterError when the cluster cannot place them all (they would wait forever)."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    fit = int(cpus // threads)
    if spec.gpus_per_worker > 0:
        fit = min(fit, int(gpus // spec.gpus_per_worker))
    workers = spec.workers or fit
    if workers < 1 or workers > fit:
        raise ClusterError(f"the cluster has {cpus:g} CPUs and {gpus:g} GPUs: it cannot hold "
                           f"{workers or 1} worker(s) of {threads} CPU(s)"
                           + (f" and {spec.gpus_per_worker:g} GPU(s)" if spec.gpus_per_worker else "")
                           + " each; ask for fewer --workers, fewer --threads or --gpus-per-worker, or add nodes")
    return workers
