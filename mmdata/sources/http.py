"""Downloading http(s) sources: one small client on httpx, shared by the download threads of a process.

Every URL ends as a :class:`Fetched`: its bytes, or the reason it has none, which becomes the
record's ``failed``/``filtered`` row. Transient problems (timeouts, connection errors, 429 and 5xx
answers, truncated bodies) are retried with exponential backoff and jitter, honouring
``Retry-After`` up to a cap; redirects are followed by hand, a capped number of hops, each hop
checked like the first (:mod:`mmdata.sources.http_net` refuses internal addresses at connect).
Opt-outs are honoured: ``X-Robots-Tag`` directives (``noai`` …) and, when asked, robots.txt.
"""
from __future__ import annotations

import email.utils
import random
import re
import threading
import time
import urllib.robotparser
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpcore
import httpx

from mmdata.errors import SampleError, SampleFailed, SampleFiltered
from mmdata.sources.http_net import (
    AddressBlocked,
    DNSFailed,
    DomainGate,
    GuardedBackend,
    Resolver,
)

OPTOUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
REDIRECTS = (301, 302, 303, 307, 308)
# Reasons a later run may cure (``mmdata build --retry-failed`` re-runs the units that hold them).
TRANSIENT_PREFIXES = ("timeout", "connect", "dns", "truncated", "http:429", "http:5")
# Content types accepted per source slot (and, for any slot, none declared or a generic binary one).
ACCEPTED_TYPES = {"image": ("image/",), "audio": ("audio/", "video/ogg", "video/webm"),
                  "text": ("text/",), "json": ("application/json", "text/")}
GENERIC_TYPES = ("", "application/octet-stream", "binary/octet-stream", "application/binary")


def is_transient(reason: str | None) -> bool:
    """Whether a row's reason is one a retry may cure (``http:503`` yes, ``http:404`` no)."""
    return bool(reason) and reason.startswith(TRANSIENT_PREFIXES)


@dataclass(frozen=True)
class DownloadOptions:
    """How the client downloads; the defaults suit one core downloading from the open web."""

    threads: int = 32
    max_bytes: int = 32 * 2**20
    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    total_timeout: float = 120.0
    retries: int = 2
    backoff: float = 0.5
    max_backoff: float = 20.0
    retry_after_max: float = 60.0
    max_redirects: int = 5
    user_agent: str = "mmdata"
    contact_url: str | None = None
    per_domain_connections: int = 8
    per_domain_rps: float | None = None
    allow_private_addresses: bool = False
    optout_directives: tuple[str, ...] = OPTOUT_DIRECTIVES
    respect_robots_txt: bool = False

    @property
    def user_agent_header(self) -> str:
        return f"{self.user_agent} (+{self.contact_url})" if self.contact_url else self.user_agent

    @property
    def agent_token(self) -> str:
        """The product token (``mmdata`` of ``mmdata/0.1``) that robots rules and ``X-Robots-Tag: <ua>: …`` name."""
        return self.user_agent.split("/", 1)[0].split()[0].lower() if self.user_agent.strip() else "*"


@dataclass
class Fetched:
    """One URL's outcome: ``data``, or ``error`` (a SampleFailed/SampleFiltered with its reason)."""

    url: str
    data: bytes | None = None
    error: SampleError | None = None
    status_code: int | None = None
    final_url: str | None = None
    content_type: str | None = None
    attempts: int = 0
    requests: int = 0  # HTTP requests sent for it: attempts × redirect hops, robots.txt fetched on its way
    bytes: int = 0  # body bytes received, over all its attempts
    seconds: float = 0.0  # from the first request's wait for its slot to the outcome, retries and backoff included
    retry_after: float | None = field(default=None, repr=False)
    transient: bool = field(default=False, repr=False)


def _failed(url: str, reason: str, detail: str = "", transient: bool = False, **kw) -> Fetched:
    return Fetched(url, error=SampleFailed(reason, f"{url}: {detail}" if detail else url), transient=transient, **kw)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def optout_directive(headers: httpx.Headers, directives: Iterable[str], agent: str) -> str | None:
    """The first configured directive an ``X-Robots-Tag`` header gives to everyone or to ``agent``
    (``X-Robots-Tag: noai``, ``X-Robots-Tag: mmdata: noimageai``), else None."""
    wanted = {d.lower() for d in directives}
    if not wanted:
        return None
    for value in headers.get_list("x-robots-tag", split_commas=False):
        target, _, rest = value.partition(":")
        if rest and " " not in target.strip() and target.strip().lower() not in wanted:
            if target.strip().lower() not in (agent, "*"):
                continue
            value = rest
        for directive in (d.strip().lower() for d in value.split(",")):
            if directive in wanted:
                return directive
    return None


class Downloader:
    """Downloads URLs concurrently and politely. One per process (its DNS cache, domain gate and
    connection pool are shared by the threads); ``fetch`` is thread-safe."""

    def __init__(self, options: DownloadOptions):
        self.options = o = options
        self.resolver = Resolver()
        self.gate = DomainGate(o.per_domain_connections, o.per_domain_rps)
        transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=None, max_keepalive_connections=o.threads))
        # the pool httpx would build, connecting through the guard (DNS cache + address check at connect)
        transport._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(), max_connections=None,
                                                  max_keepalive_connections=o.threads,
                                                  network_backend=GuardedBackend(self.resolver, o.allow_private_addresses))
        self.client = httpx.Client(transport=transport, follow_redirects=False, trust_env=False,
                                   timeout=httpx.Timeout(o.read_timeout, connect=o.connect_timeout),
                                   headers={"User-Agent": o.user_agent_header})
        self.pool = ThreadPoolExecutor(max_workers=o.threads, thread_name_prefix="mmdata-download")
        self._robots: dict[str, object] = {}
        self._robots_lock = threading.Lock()
        self._tally = threading.local()  # requests and body bytes of the fetch running in this thread

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()

    def fetch_many(self, items: Iterable[tuple[str, str]], window: int | None = None) -> Iterator[Fetched]:
        """``fetch(url, modality)`` for each ``(url, modality)``, yielded in the items' order while at
        most ``window`` downloads (default: 4 per thread) are in flight or waiting to be taken."""
        window = window or 4 * self.options.threads
        pending: deque = deque()
        for url, modality in items:
            pending.append(self.pool.submit(self.guarded_fetch, url, modality))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def guarded_fetch(self, url: str, modality: str = "image") -> Fetched:
        """``fetch``, with anything unexpected turned into the URL's ``error:<Type>`` failure: one
        URL never ends its unit."""
        try:
            return self.fetch(url, modality)
        except Exception as exc:  # noqa: BLE001 — the record's last guard, as in the record step
            return _failed(url, f"error:{type(exc).__name__}", str(exc)[:300])

    def fetch(self, url: str, modality: str = "image") -> Fetched:
        """The URL's bytes or the reason it has none, after the retries transient problems allow."""
        o = self.options
        attempt = 0
        t = self._tally
        t.requests = t.bytes = 0
        began = time.monotonic()
        while True:
            attempt += 1
            result = self._attempt(url, modality)
            result.attempts = attempt
            result.requests, result.bytes = t.requests, t.bytes
            result.seconds = time.monotonic() - began
            if not result.transient or attempt > o.retries:
                return result
            if result.retry_after is not None:
                if result.retry_after > o.retry_after_max:
                    return result  # the server asks for longer than we wait: a later --retry-failed run
                delay = result.retry_after
            else:
                delay = min(o.max_backoff, o.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            time.sleep(delay)

    def _attempt(self, url: str, modality: str, check_robots: bool = True) -> Fetched:
        o = self.options
        current = url
        started = None  # --download-timeout counts from the first request sent (not the politeness wait)
        for _ in range(o.max_redirects + 1):
            try:
                parsed = httpx.URL(current)
            except (httpx.InvalidURL, ValueError) as exc:
                return _failed(url, "url", str(exc))
            if parsed.scheme not in ("http", "https") or not parsed.host:
                return _failed(url, "url", f"not an http(s) URL: {current}")
            if check_robots and o.respect_robots_txt and not self._robots_allow(parsed):
                return Fetched(url, error=SampleFiltered("optout:robots_txt", current), final_url=current)
            with self.gate.slot(parsed.host):
                started = started or time.monotonic()
                self._count("requests", 1)
                try:
                    with self.client.stream("GET", parsed) as resp:
                        if resp.status_code in REDIRECTS and resp.headers.get("location"):
                            current = str(parsed.join(resp.headers["location"]))
                            continue
                        return self._response(url, current, parsed.host, resp, modality, started)
                except AddressBlocked as exc:
                    return _failed(url, "blocked:address", str(exc))
                except DNSFailed as exc:
                    return _failed(url, "dns", str(exc), transient=exc.transient)
                except httpx.TimeoutException as exc:
                    return _failed(url, "timeout", type(exc).__name__, transient=True)
                except httpx.RemoteProtocolError as exc:
                    return _failed(url, "connect", str(exc), transient=True)
                except (httpx.TransportError, httpx.DecodingError) as exc:
                    return _failed(url, "connect", f"{type(exc).__name__}: {exc}", transient=True)
        return _failed(url, "redirects", f"more than {o.max_redirects} redirects (last: {current})")

    def _response(self, url: str, current: str, host: str, resp: httpx.Response, modality: str,
                  started: float) -> Fetched:
        """The answer of the last hop as the URL's outcome (the body streamed under the caps)."""
        o = self.options
        code = resp.status_code
        mime = re.sub(r"[^a-z0-9.+/_-]", "", resp.headers.get("content-type", "").split(";", 1)[0].strip().lower())[:80]
        facts = {"status_code": code, "final_url": current, "content_type": mime or None}
        if not 200 <= code < 300:
            transient = code == 429 or code >= 500
            wait = parse_retry_after(resp.headers.get("retry-after")) if code in (429, 503) else None
            if wait is not None:
                self.gate.pause(host, min(wait, o.retry_after_max))
            out = _failed(url, f"http:{code}", resp.reason_phrase, transient=transient, **facts)
            out.retry_after = wait
            return out
        directive = optout_directive(resp.headers, o.optout_directives, o.agent_token)
        if directive:
            return Fetched(url, error=SampleFiltered(f"optout:{directive}", f"{current}: X-Robots-Tag"), **facts)
        if mime not in GENERIC_TYPES and not mime.startswith(ACCEPTED_TYPES.get(modality, ("",))):
            return _failed(url, f"content:{mime}", f"not {modality} content", **facts)
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > o.max_bytes:
            return _failed(url, "too_large", f"Content-Length {declared} over --max-download-bytes ({o.max_bytes})", **facts)
        chunks, size = [], 0
        try:
            for chunk in resp.iter_bytes():
                size += len(chunk)
                self._count("bytes", len(chunk))
                if size > o.max_bytes:
                    return _failed(url, "too_large", f"body over --max-download-bytes ({o.max_bytes})", **facts)
                if time.monotonic() - started > o.total_timeout:
                    return _failed(url, "timeout", f"body not done in {o.total_timeout:g} s", transient=True, **facts)
                chunks.append(chunk)
        except httpx.RemoteProtocolError as exc:  # the connection closed before Content-Length bytes came
            return _failed(url, "truncated", str(exc), transient=True, **facts)
        return Fetched(url, data=b"".join(chunks), **facts)

    def _count(self, name: str, n: int) -> None:
        t = self._tally
        setattr(t, name, getattr(t, name, 0) + n)

    def _robots_allow(self, url: httpx.URL) -> bool:
        """robots.txt of the URL's origin (fetched once per process, through the same gate and
        guard) allows our agent. A robots.txt that is missing (4xx but 401/403) allows everything;
        401/403 disallow everything; one that cannot be fetched now allows (it is asked again later)."""
        origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        with self._robots_lock:
            lock = self._robots.setdefault(origin + "#lock", threading.Lock())
        with lock:  # one fetch per origin; other origins go on meanwhile
            parser = self._robots.get(origin)
            if parser is None:
                parser = self._load_robots(origin)
                self._robots[origin] = parser
        return parser.can_fetch(self.options.agent_token, str(url))  # type: ignore[attr-defined]

    def _load_robots(self, origin: str) -> urllib.robotparser.RobotFileParser:
        parser = urllib.robotparser.RobotFileParser()
        fetched = self._attempt(f"{origin}/robots.txt", "text", check_robots=False)
        if fetched.data is not None:
            parser.parse(fetched.data.decode("utf-8", "replace").splitlines())
        elif fetched.status_code in (401, 403):
            parser.disallow_all = True
        else:
            parser.parse([])
        return parser
