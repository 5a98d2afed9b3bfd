"""Joining a Ray cluster, or starting a local one: Ray is imported here, on demand only.

`auto` joins the cluster `ray start` left running on this machine (or $RAY_ADDRESS), else starts a
local Ray that listens on 127.0.0.1 only. A HOST:PORT is probed first (a connect, then one request to
Ray's GCS, all within PROBE_SECONDS), so that an unreachable address, or one where something other
than a Ray head listens, fails within seconds instead of leaving ray.init retrying for many seconds.
"""

from __future__ import annotations

import os
import socket
import sys
import time
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
    """Check within `timeout` seconds in all that a Ray head listens at the address: a TCP connect,
    then one gRPC request a Ray GCS answers at once (GetClusterId, see _gcs_verdict). So an
    unreachable address, or one where another server listens (HTTP/2 or gRPC servers included), fails
    with a clear message instead of leaving ray.init retrying. (With TLS, $RAY_USE_TLS, only the
    connect is checked.)"""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
                authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 in brackets
                verdict = _gcs_verdict(sock, authority, deadline, timeout)
            else:
                verdict = None
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({reason} after at most {timeout:g} s); "
                           "start one there with `ray start --head`, check the address and firewall, or use "
                           "--cluster auto for a local one") from None
    if verdict is not None:
        raise ClusterError(f"{address} answers, but not as a Ray head node ({verdict}); give the address "
                           "`ray start --head` printed (HOST:6379 by default)")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GCS_PROBE_PATH = b"/ray.rpc.NodeInfoGcsService/GetClusterId"  # the first call of every Ray client
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY = 0, 1, 3, 4, 7  # HTTP/2 frame types (RFC 9113)
_END_STREAM, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x4, 0x8, 0x20
_GRPC_UNIMPLEMENTED = 12


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _hpack_string(text: bytes) -> bytes:
    """An HPACK string literal, not Huffman-coded: its length as a 7-bit-prefix integer, then the bytes."""
    n, prefix = len(text), []
    if n < 127:
        return bytes([n]) + text
    n -= 127
    while n >= 128:
        prefix.append(n % 128 + 128)
        n //= 128
    return bytes([127, *prefix, n]) + text


def _gcs_request(authority: str) -> bytes:
    """The HTTP/2 client preface, an empty SETTINGS frame and a gRPC call of GetClusterId (an empty
    request message) on stream 1; header fields as HPACK literals without indexing (RFC 7541 6.2.2)."""
    fields = ((b":method", b"POST"), (b":scheme", b"http"), (b":path", GCS_PROBE_PATH),
              (b":authority", authority.encode()), (b"content-type", b"application/grpc"), (b"te", b"trailers"))
    block = b"".join(b"\x00" + _hpack_string(name) + _hpack_string(value) for name, value in fields)
    return (HTTP2_PREFACE + _frame(_SETTINGS, 0, 0, b"") + _frame(_HEADERS, _END_HEADERS, 1, block)
            + _frame(_DATA, _END_STREAM, 1, b"\x00" + (0).to_bytes(4, "big")))


def _receive(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    """Exactly n bytes, None if the server closes first; TimeoutError at the deadline."""
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _unpad(payload: bytes, flags: int, kind: int) -> bytes:
    """A DATA or HEADERS frame's content without its padding (and a HEADERS frame's priority fields)."""
    pad = 0
    if flags & _PADDED and payload:
        pad, payload = payload[0], payload[1:]
    if kind == _HEADERS and flags & _PRIORITY:
        payload = payload[5:]
    return payload[:len(payload) - pad]


def _grpc_status(block: bytes) -> int | None:
    """grpc-status of a header block, where it is written as a plain literal (as grpc-core, which Ray's
    GCS is built on, writes it); None where it is not readable without a full HPACK decoder."""
    at = block.find(b"\x0bgrpc-status")
    rest = block[at + 12:] if at >= 0 else b""
    if not rest or rest[0] & 0x80:  # absent, or Huffman-coded
        return None
    value = rest[1:1 + rest[0]]
    return int(value) if value.isdigit() else None


def _has_cluster_id(message: bytes) -> bool:
    """Whether `message` is a protocol buffer with a non-empty bytes field 2: GetClusterIdReply's
    cluster_id (field 1 is its status)."""
    i, found = 0, False
    while i < len(message):
        key, i = _varint(message, i)
        if key is None:
            return False
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(message, i)
            if value is None:
                return False
        elif wire == 2:
            size, i = _varint(message, i)
            if size is None or i + size > len(message):
                return False
            found = found or (field == 2 and size > 0)
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            return False
    return found and i == len(message)


def _varint(data: bytes, i: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while i < len(data) and shift < 64:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7
    return None, i


def _gcs_verdict(sock: socket.socket, authority: str, deadline: float, timeout: float) -> str | None:
    """None if the server answers GetClusterId as a Ray GCS does (a reply carrying a cluster id), or
    refuses it as a gRPC server that has the method may (token authentication: the refusal's status
    is left to ray.init to explain); otherwise why it is not a Ray head. A server that says nothing
    (any HTTP/2 server that does not speak gRPC may just wait) fails at the deadline."""
    message, status_line = b"", None
    try:
        sock.sendall(_gcs_request(authority))
        while True:
            header = _receive(sock, 9, deadline)
            if header is None:
                return "it closed the connection without a gRPC answer"
            if int.from_bytes(header[:3], "big") > 1 << 20:  # e.g. "HTTP/1.1 400": not an HTTP/2 frame
                return "it does not speak HTTP/2"
            payload = _receive(sock, int.from_bytes(header[:3], "big"), deadline)
            kind, flags, stream = header[3], header[4], int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
            if payload is None:
                return "it closed the connection"
            if kind == _GOAWAY:
                return "it closed the HTTP/2 connection without answering"
            if stream != 1:  # the server's SETTINGS, WINDOW_UPDATE, PING: not the answer
                continue
            if kind == _RST_STREAM:
                return "it refused the gRPC request"
            if kind == _HEADERS:
                block = _unpad(payload, flags, kind)
                if status_line is None:
                    status_line = block[:1]
                    if status_line != b"\x88":  # HPACK's static entry for ":status: 200", as gRPC answers
                        return "an HTTP/2 server that is not a gRPC server"
                if flags & _END_STREAM:  # a gRPC refusal without a reply
                    if _grpc_status(block) == _GRPC_UNIMPLEMENTED:
                        return "a gRPC server without Ray's GCS service"
                    return None
            elif kind == _DATA:
                message += _unpad(payload, flags, kind)
                if len(message) >= 5:
                    size = int.from_bytes(message[1:5], "big")
                    if message[0] != 0 or size > 1 << 16:
                        return "its answer is not a Ray GCS reply"
                    if len(message) >= 5 + size:
                        return None if _has_cluster_id(message[5:5 + size]) else "its answer is not a Ray GCS reply"
                if flags & _END_STREAM:
                    return "its answer is not a Ray GCS reply"
    except TimeoutError:
        return f"no gRPC answer within {timeout:g} s" if status_line is None else "its answer stopped short"
    except OSError as err:
        return f"the connection failed: {err.strerror or err}"


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
