"""Who may use the workbench, following Jupyter's rules: only requests addressed to a trusted host
(stops DNS rebinding), state-changing requests only from the workbench's own page or from
non-browser clients (stops other sites' pages: cross-site request forgery), and a token wherever one
is set (always when `factedit serve` listens beyond loopback)."""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import InputError

STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address (IPv4-mapped IPv6 addresses as IPv4), or None for a name."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])  # without an IPv6 zone (%eth0)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def host_key(host: str) -> str:
    """A host name or address as compared: lower case, no trailing dot, addresses in one spelling."""
    host = host.strip().lower().rstrip(".")
    address = _ip(host)
    return str(address) if address else host


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address, no port) means this machine only: localhost or a loopback address."""
    address = _ip(host)
    return address.is_loopback if address else host_key(host) == "localhost"


def is_wildcard(host: str) -> bool:
    """Whether binding `host` listens on every interface (0.0.0.0, ::)."""
    address = _ip(host)
    return bool(address and address.is_unspecified)


def _split_netloc(netloc: str) -> tuple[str, int | None] | None:
    """The host and port of a Host header ("127.0.0.1:8000", "[::1]", "name"); None if malformed."""
    try:
        parts = urlsplit("//" + netloc)
        hostname, port = parts.hostname, parts.port  # .port raises ValueError for a bad port
    except ValueError:
        return None
    return (host_key(hostname), port) if hostname else None


def _default_port(scheme: str) -> int | None:
    return {"http": 80, "https": 443}.get(scheme)


class Access:
    """Who may use the workbench.

    - Every request must be addressed (its Host header) to a trusted host: a loopback name or address,
      the address the request arrived at, or one of `allowed_hosts`. A page on another site that
      re-points its own name at this machine (DNS rebinding) sends its own name, and is refused.
    - A state-changing request (POST, PUT, PATCH, DELETE) whose Origin (or, without one, Referer)
      is another origin is refused: browsers send multipart forms to other origins without asking
      first, so a page elsewhere could otherwise change the model. Requests with neither header
      (curl, httpx, notebooks) are not from a page, and are allowed.
    - With a `token`, every request must carry it: as ?token= (which also sets an HttpOnly,
      SameSite=Strict cookie, so the page's own requests carry it), in an Authorization header
      ("Bearer <token>" or "token <token>"), or in that cookie.
    """

    def __init__(self, token: str | None = None, allowed_hosts: Iterable[str] = ()):
        if token is not None and not token.strip():
            raise InputError("the workbench token is empty; give one with at least one character, or none")
        for name in allowed_hosts:
            if not (_ip(name) or re.fullmatch(r"[A-Za-z0-9_.-]+", name.strip())):
                raise InputError(f"allowed host {name!r} is not a host name or address; give it without "
                                 f"scheme or port, e.g. workbench.example.org")
        self.token = token
        self.allowed_hosts = frozenset(host_key(name) for name in allowed_hosts)

    def refusal(self, request: Request) -> JSONResponse | None:
        """The response refusing `request`, or None when it may go on."""
        host = self._trusted_host(request)
        if host is None:
            return JSONResponse({"detail": f"untrusted Host header {request.headers.get('host', '')!r}: the "
                                           f"workbench answers only to localhost, loopback addresses and the "
                                           f"address it serves (factedit serve --allow-host NAME adds a name)"},
                                status_code=400)
        if self.token is not None and not self.has_token(request):
            return JSONResponse({"detail": "this workbench needs its token: open the URL that factedit serve "
                                           "printed (ending in ?token=...), or send the header "
                                           "'Authorization: Bearer <token>'"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if request.method in STATE_CHANGING_METHODS:
            source = request.headers.get("origin") or request.headers.get("referer")
            if source is not None and not self._same_origin(source, host, request.url.scheme):
                return JSONResponse({"detail": f"refusing a {request.method} request from {source[:200]!r}: the "
                                               f"workbench accepts changes only from its own page"},
                                    status_code=403)
        return None

    def _trusted_host(self, request: Request) -> tuple[str, int | None] | None:
        """The request's Host header as (host, port) if the host is trusted, else None."""
        host = _split_netloc(request.headers.get("host", ""))
        if host is None:
            return None
        served = request.scope.get("server")  # the address the connection arrived at, e.g. ("10.0.0.5", 8000)
        arrived_at = host_key(str(served[0])) if served else None
        return host if is_loopback(host[0]) or host[0] in self.allowed_hosts or host[0] == arrived_at else None

    @staticmethod
    def _same_origin(source: str, host: tuple[str, int | None], scheme: str) -> bool:
        """Whether the origin of URL `source` is the workbench's own (the same host and port: like
        Jupyter, the scheme is not compared, so that a proxy adding TLS in front of it works)."""
        try:
            parts = urlsplit(source)
            their = (host_key(parts.hostname or ""), parts.port or _default_port(parts.scheme))
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and their == (host[0], host[1] or _default_port(scheme))

    def has_token(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        offered = [request.query_params.get("token"), request.cookies.get(self.cookie_name(request))]
        if scheme.lower() in ("bearer", "token"):
            offered.append(credentials.strip())
        return any(value and self.is_token(value) for value in offered)

    def is_token(self, value: str) -> bool:
        return self.token is not None and secrets.compare_digest(value.encode(), self.token.encode())

    @staticmethod
    def cookie_name(request: Request) -> str:
        # Cookies ignore ports: the port in the name keeps two workbenches on one machine apart.
        return f"factedit-token-{request.url.port or _default_port(request.url.scheme)}"
