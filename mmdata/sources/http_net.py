"""The network side of the download client: a DNS cache, the address guard and per-domain politeness.

The guard sits where httpx opens a TCP connection (an httpcore network backend), so every
connection — the first request, each redirect hop, a host whose DNS answer changed since — is
checked against the addresses it really connects to, from the same cached resolution.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import httpcore


class AddressBlocked(Exception):
    """The host resolves to a loopback, link-local, private or otherwise internal address."""


class DNSFailed(Exception):
    """The host name does not resolve (``transient``: the resolver could not answer now)."""

    def __init__(self, host: str, detail: str, transient: bool):
        super().__init__(f"{host}: {detail}")
        self.transient = transient


def is_public_address(ip: str) -> bool:
    """False for loopback, link-local (169.254.0.0/16: the cloud metadata endpoint), private,
    shared (100.64.0.0/10), multicast, reserved and unspecified addresses, v4 or v6 (v4-mapped
    v6 addresses are judged as their v4 address)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
                or addr.is_reserved or addr.is_unspecified or addr in _SHARED)


_SHARED = ipaddress.ip_network("100.64.0.0/10")


class Resolver:
    """``getaddrinfo`` with a cache (answers kept ``ttl`` seconds, failures ``negative_ttl``), shared
    by the threads of a process: a corpus with a million URLs on one CDN resolves it once."""

    def __init__(self, ttl: float = 300.0, negative_ttl: float = 30.0):
        self.ttl, self.negative_ttl = ttl, negative_ttl
        self._cache: dict[tuple[str, int], tuple[float, object]] = {}
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], threading.Lock] = {}
        self.lookups = 0  # real resolver calls (the cache's misses)

    def resolve(self, host: str, port: int) -> list[str]:
        with self._lock:
            one = self._pending.setdefault((host, port), threading.Lock())
        with one:  # threads asking for the same name while it resolves wait for that one answer
            return self._resolve(host, port)

    def _resolve(self, host: str, port: int) -> list[str]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((host, port))
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], DNSFailed):
                raise hit[1]
            return hit[1]  # type: ignore[return-value]
        self.lookups += 1
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            answer: object = list(dict.fromkeys(info[4][0] for info in infos))
            expiry = now + self.ttl
        except (socket.gaierror, UnicodeError) as exc:
            transient = isinstance(exc, socket.gaierror) and exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", -11))
            answer = DNSFailed(host, getattr(exc, "strerror", None) or str(exc), transient)
            expiry = now + self.negative_ttl
        if not (isinstance(answer, DNSFailed) and answer.transient):  # a resolver that could not answer now is asked again
            with self._lock:
                self._cache[(host, port)] = (expiry, answer)
        if isinstance(answer, DNSFailed):
            raise answer
        return answer  # type: ignore[return-value]


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's synchronous backend, connecting through :class:`Resolver` to addresses the guard
    allows (all of them with ``allow_private``). TLS still verifies the host name (SNI), not the IP."""

    def __init__(self, resolver: Resolver, allow_private: bool):
        self.inner = httpcore.SyncBackend()
        self.resolver, self.allow_private = resolver, allow_private

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        addresses = self.resolver.resolve(host, port)
        if not self.allow_private:
            blocked = [a for a in addresses if not is_public_address(a)]
            if blocked:  # one internal answer is enough to refuse: a name that points inside is not public
                raise AddressBlocked(f"{host} resolves to {blocked[0]} (--allow-private-addresses to fetch it)")
        last: Exception | None = None
        for address in addresses:
            try:
                return self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                              socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        raise last if last is not None else httpcore.ConnectError(f"{host}: no address")

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are not fetched")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class DomainGate:
    """Per-domain politeness: at most ``connections`` requests in flight to one host from this
    process, and request starts spaced ``1 / rps`` seconds apart for the whole machine — every
    process of the build (local, Dask or Beam workers) claims its start time from one small
    file per domain under a lock, so the server sees at most ``rps`` requests in any second. A
    ``Retry-After`` pauses the host for everyone."""

    def __init__(self, connections: int, rps: float | None, state_dir: str | None = None):
        self.connections, self.rps = connections, rps
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._paused: dict[str, float] = {}  # without a rate, a Retry-After pauses the host in this process
        self.state_dir = state_dir or os.path.join(tempfile.gettempdir(), f"mmdata-domains-{_uid()}")

    @contextlib.contextmanager
    def slot(self, host: str) -> Iterator[None]:
        with self._lock:
            sem = self._slots.setdefault(host, threading.BoundedSemaphore(self.connections))
        sem.acquire()
        try:
            if self.rps:
                spacing = 1.0 / self.rps
                while True:  # a thread that wakes up after its slot passed (a stalled process) books another:
                    start = self._claim(host, spacing)  # late requests never go out in a burst
                    if start > time.time():
                        time.sleep(start - time.time())
                    if time.time() - start < spacing:
                        break
            else:
                with self._lock:
                    wait = self._paused.get(host, 0.0) - time.time()
                if wait > 0:
                    time.sleep(wait)
            yield
        finally:
            sem.release()

    def pause(self, host: str, seconds: float) -> None:
        """No new request to ``host`` for ``seconds`` (a 429/503 ``Retry-After``)."""
        if self.rps:
            self._claim(host, 0.0, not_before=time.time() + seconds)
        else:
            with self._lock:
                self._paused[host] = max(self._paused.get(host, 0.0), time.time() + seconds)

    def _claim(self, host: str, spacing: float, not_before: float = 0.0) -> float:
        """The start time given to this request (wall clock, shared by the machine's processes)."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.state_dir, hashlib.sha256(host.encode()).hexdigest()[:24])
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 32, 0).strip()
            try:
                booked = float(raw) if raw else 0.0
            except ValueError:
                booked = 0.0
            start = max(time.time(), booked, not_before)
            os.pwrite(fd, f"{start + spacing:.6f}".ljust(32).encode(), 0)
            return start
        finally:
            os.close(fd)  # releases the lock


def _uid() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else "user"
