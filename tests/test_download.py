"""URL manifests: every http(s) source is downloaded inside its unit, and every way a download goes
wrong ends as that record's row with a reason the user can act on; the build still exits 0 and
``inputs = written + filtered + failed``. A real HTTP server on 127.0.0.1 (a free port, threads,
stopped by the tests and by itself after a while) injects the faults."""
import contextlib
import csv
import glob
import hashlib
import io
import itertools
import os
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import run_build
from mmdata.cli.main import app
from mmdata.sources.http import DownloadOptions, Downloader, optout_directive, parse_retry_after
from mmdata.sources.http_net import is_public_address

SERVER_LIFETIME_S = 300  # the server stops itself after this, whatever the tests do
HOLD_S = 120  # how long the slow routes hold a request whose client has not given up
# The settings of the builds against the local server (a private address). Its answers come at once,
# but CI's loaded 2-core machine once took over a second for one: timeouts far from anything a slow
# machine does, so an answer never turns into a timeout and a retry. Only SLOW (below) is short, and only
# the slow routes, which hold far longer than it, are built with it.
FAST = dict(allow_private_addresses=True, connect_timeout=30.0, read_timeout=30.0, download_timeout=60.0,
            download_retries=1, retry_after_max=2.0, max_download_bytes=100_000, workers=1, samples_per_shard=8)
# A first byte that never comes hits the read timeout; a body dripping a byte every 0.1 s never does
# (0.1 s against 5 s), only the whole download's 2 s.
SLOW = {**FAST, "read_timeout": 5.0, "download_timeout": 2.0}


def jpeg(name: str) -> bytes:
    """A small JPEG whose colour depends on ``name``."""
    h = hashlib.sha256(name.encode()).digest()
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), tuple(h[:3])).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def send(self, code: int, body: bytes = b"", ctype: str = "image/jpeg", length: int | None = None, **headers):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def hold(self) -> None:
        """Keep the request unanswered until the client hangs up (or HOLD_S)."""
        deadline = time.monotonic() + HOLD_S
        while time.monotonic() < deadline:
            if select.select([self.connection], [], [], 0.1)[0]:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        break
                except OSError:
                    break
        self.close_connection = True

    def do_GET(self):  # noqa: C901 — one route per fault
        srv = self.server
        with srv.lock:
            srv.log.append((time.monotonic(), self.headers.get("Host"), self.path, self.headers.get("User-Agent")))
        parts = self.path.split("?")[0].strip("/").split("/")
        kind, name = parts[0], parts[-1]
        if kind == "img":
            self.send(200, jpeg(name))
        elif kind == "slowfirst":  # no first byte until the client gives up
            self.hold()
        elif kind == "slowbody":  # a byte every 0.1 s until the client gives up: no read times out, the download does
            body = jpeg(name).ljust(50_000, b"\0")
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            deadline = time.monotonic() + HOLD_S
            for i in range(len(body)):
                try:
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                except OSError:  # the client gave up
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            self.close_connection = True
        elif kind == "status":
            code = int(parts[1])
            extra = {"Retry_After": "1"} if code in (429, 503) else {}
            self.send(code, b"no", ctype="text/plain", **extra)
        elif kind == "redirect":
            n = int(parts[1])
            self.send(302, b"", Location=f"/redirect/{n - 1}/{name}" if n > 1 else f"/img/{name}")
        elif kind == "loop":
            self.send(302, b"", Location=self.path)
        elif kind == "html":
            self.send(200, b"<html>not found</html>", ctype="text/html; charset=utf-8")
        elif kind == "truncated":
            self.send(200, jpeg(name)[:100], length=10_000)
            self.close_connection = True
        elif kind == "big":  # declared too big
            self.send(200, b"", length=5_000_000)
        elif kind == "bigstream":  # no length: found too big while reading
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(30):
                try:
                    self.wfile.write(b"\xff" * 10_000)
                except OSError:
                    break
            self.close_connection = True
        elif kind == "optout":
            self.send(200, jpeg(name), X_Robots_Tag=parts[1].replace("_", " "))
        elif kind == "notimage":
            self.send(200, b"GIF89a but not really an image at all", ctype="image/gif")
        elif kind == "robots.txt":
            self.send(200, b"User-agent: mmdata\nDisallow: /private/\n\nUser-agent: *\nDisallow: /\n", ctype="text/plain")
        elif kind == "private":
            self.send(200, jpeg(name))
        elif kind == "flaky":
            if srv.down:
                self.send(503, b"down", ctype="text/plain")
            else:
                self.send(200, jpeg(name))
        else:
            self.send(404, b"?", ctype="text/plain")


@contextlib.contextmanager
def serving(handler, **state):
    """A threaded HTTP server on 127.0.0.1 (free port) with ``handler``, shut down by itself after
    SERVER_LIFETIME_S; ``state`` adds attributes the handler keeps its logs in."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    srv.handle_error = lambda request, address: None  # a client that hangs up is no error here
    srv.log, srv.lock, srv.down = [], threading.Lock(), False
    for name, value in state.items():
        setattr(srv, name, value)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    stopper = threading.Timer(SERVER_LIFETIME_S, srv.shutdown)
    stopper.daemon = True
    stopper.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield srv
    finally:
        stopper.cancel()
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def server():
    with serving(Handler) as srv:
        yield srv


@contextlib.contextmanager
def closed_port():
    """A port of 127.0.0.1 that refuses connections: bound (so no one else takes it meanwhile), not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def manifest(tmp_path, urls: dict[str, str], name="urls.csv") -> str:
    """A csv manifest: key, url, caption."""
    path = tmp_path / name
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "url", "caption"])
        for key, url in urls.items():
            w.writerow([key, url, f"a photo {key}"])
    return str(path)


def rows(out) -> dict:
    found = {}
    for f in sorted(glob.glob(f"{out}/shards/*.parquet")):
        for r in pq.read_table(f).to_pylist():
            found[r["key"]] = r
    return found


def check_accounting(m: dict, n: int) -> None:
    c = m["counts"]
    assert c["inputs"] == n == c["written"] + c["filtered"] + c["failed"]


def test_every_fault_ends_in_its_row_with_a_precise_reason(server, tmp_path):
    b = server.base
    server.log.clear()
    with closed_port() as port:  # bound for the whole build, not listening: nothing else can take it meanwhile
        expected = {  # key: (url, status, reason)
            "ok": (f"{b}/img/ok.jpg", "written", None),
            "forbidden": (f"{b}/status/403/a.jpg", "failed", "http:403"),
            "missing": (f"{b}/status/404/a.jpg", "failed", "http:404"),
            "gone": (f"{b}/status/410/a.jpg", "failed", "http:410"),
            "too_many": (f"{b}/status/429/a.jpg", "failed", "http:429"),
            "server_error": (f"{b}/status/500/a.jpg", "failed", "http:500"),
            "unavailable": (f"{b}/status/503/a.jpg", "failed", "http:503"),
            "redirected": (f"{b}/redirect/3/r.jpg", "written", None),
            "redirect_chain": (f"{b}/redirect/9/r.jpg", "failed", "redirects"),
            "redirect_loop": (f"{b}/loop/l.jpg", "failed", "redirects"),
            "html_page": (f"{b}/html/a.jpg", "failed", "content:text/html"),
            "truncated": (f"{b}/truncated/t.jpg", "failed", "truncated"),
            "declared_big": (f"{b}/big/a.jpg", "failed", "too_large"),
            "streamed_big": (f"{b}/bigstream/a.jpg", "failed", "too_large"),
            "optout_noai": (f"{b}/optout/noai/a.jpg", "filtered", "optout:noai"),
            "optout_ours": (f"{b}/optout/mmdata:_noimageai,_nofollow/a.jpg", "filtered", "optout:noimageai"),
            "optout_other_bot": (f"{b}/optout/otherbot:_noai/o.jpg", "written", None),
            "not_an_image": (f"{b}/notimage/a.jpg", "failed", "decode:image"),
            "refused": (f"http://127.0.0.1:{port}/img/a.jpg", "failed", "connect"),
            "not_http": ("ftp://127.0.0.1/a.jpg", "failed", None),
            "bad_name": (f"http://{'a' * 64}.test/a.jpg", "failed", "dns"),  # refused before any query
        }
        m = run_build(manifest(tmp_path, {k: v[0] for k, v in expected.items()}), tmp_path / "out", key_col="key",
                      image_col="url", **FAST)
    check_accounting(m, len(expected))
    got = rows(tmp_path / "out")
    for key, (_, status, reason) in expected.items():
        assert got[key]["status"] == status, (key, got[key])
        if reason is not None:
            assert got[key]["reason"] == reason, (key, got[key])
    assert got["ok"]["image_sha256"] == hashlib.sha256(jpeg("ok.jpg")).hexdigest()
    assert got["not_http"]["reason"].startswith(("read:", "error:"))
    paths = [p for _, _, p, _ in server.log]
    assert paths.count("/status/404/a.jpg") == 1 and paths.count("/status/403/a.jpg") == 1  # not retried
    assert paths.count("/status/500/a.jpg") == 2  # retried once
    t429 = [t for t, _, p, _ in server.log if p == "/status/429/a.jpg"]
    assert len(t429) == 2 and t429[1] - t429[0] >= 0.95  # Retry-After: 1 honoured
    assert paths.count("/loop/l.jpg") == 6  # the first request and 5 redirects, then it stops
    assert all(ua == "mmdata/0.1" for *_, ua in server.log)
    assert "timeout" not in m["reasons"]["failed"]


def test_a_slow_first_byte_and_a_slow_body_time_out_and_are_retried_once(server, tmp_path):
    """The two routes hold a request for HOLD_S unless the client gives up: the build ends well before
    only if both timeouts work (the read timeout on the first byte, the whole download's on the body)."""
    b = server.base
    urls = {"slow_first_byte": f"{b}/slowfirst/a.jpg", "slow_body": f"{b}/slowbody/a.jpg"}
    server.log.clear()
    started = time.monotonic()
    m = run_build(manifest(tmp_path, urls), tmp_path / "out", key_col="key", image_col="url", **SLOW)
    took = time.monotonic() - started
    check_accounting(m, 2)
    got = rows(tmp_path / "out")
    assert {k: (r["status"], r["reason"]) for k, r in got.items()} == dict.fromkeys(urls, ("failed", "timeout"))
    assert m["reasons"]["failed"] == {"timeout": 2}
    paths = [p for _, _, p, _ in server.log]
    assert paths.count("/slowfirst/a.jpg") == 2 and paths.count("/slowbody/a.jpg") == 2  # retried once
    assert took < HOLD_S * 3 / 4, took  # about 15 s; a timeout that does not work holds the build for HOLD_S


def test_opt_outs_can_be_emptied_and_the_size_cap_moved(server, tmp_path):
    b = server.base
    urls = {"noai": f"{b}/optout/noai/n.jpg", "big": f"{b}/img/big.jpg"}
    m = run_build(manifest(tmp_path, urls), tmp_path / "out", key_col="key", image_col="url",
                  **{**FAST, "optout_directives": "", "max_download_bytes": 200})
    got = rows(tmp_path / "out")
    assert got["noai"]["status"] == "failed" and got["noai"]["reason"] == "too_large"
    assert got["big"]["reason"] == "too_large"
    check_accounting(m, 2)
    m = run_build(manifest(tmp_path, urls), tmp_path / "out2", key_col="key", image_col="url",
                  **{**FAST, "optout_directives": ""})
    assert m["counts"]["written"] == 2


def test_robots_txt_when_asked(server, tmp_path):
    b = server.base
    urls = {"public": f"{b}/img/pub.jpg", "private": f"{b}/private/p.jpg", "private2": f"{b}/private/q.jpg"}
    server.log.clear()
    m = run_build(manifest(tmp_path, urls), tmp_path / "out", key_col="key", image_col="url",
                  **{**FAST, "respect_robots_txt": True})
    check_accounting(m, 3)
    got = rows(tmp_path / "out")
    assert got["public"]["status"] == "written"  # the rules for mmdata, not those for "*", apply
    assert got["private"]["reason"] == got["private2"]["reason"] == "optout:robots_txt"
    paths = [p for _, _, p, _ in server.log]
    assert paths.count("/robots.txt") == 1 and not any(p.startswith("/private/") for p in paths)
    m = run_build(manifest(tmp_path, urls), tmp_path / "out2", key_col="key", image_col="url", **FAST)
    assert m["counts"]["written"] == 3  # off by default


def test_private_addresses_are_refused_by_default(server, tmp_path):
    urls = {f"k{i}": f"{server.base}/img/{i}.jpg" for i in range(3)}
    urls["name"] = f"http://localhost:{server.server_address[1]}/img/x.jpg"
    server.log.clear()
    m = run_build(manifest(tmp_path, urls), tmp_path / "out", key_col="key", image_col="url",
                  **{**FAST, "allow_private_addresses": False})
    check_accounting(m, 4)
    assert m["reasons"]["failed"] == {"blocked:address": 4}
    assert server.log == []  # not one request reached the server
    for ip in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "::1", "fe80::1",
               "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1", "fc00::1"):
        assert not is_public_address(ip), ip
    for ip in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "151.101.1.1"):
        assert is_public_address(ip), ip


def test_per_domain_rate_is_kept_across_workers(server, tmp_path):
    """Two worker processes, 8 threads each, share one 5 requests/s budget for the host. The server sees
    a request some time after the gate let it go (later still on a loaded machine): the bounds below
    allow each arrival a second of such delay, and still fail a budget kept per process (twice the
    rate: 4 s for the 41 requests) or a burst."""
    n = 41
    urls = {f"p{i:02d}": f"{server.base}/img/p{i}.jpg" for i in range(n)}
    server.log.clear()
    m = run_build(manifest(tmp_path, urls), tmp_path / "out", key_col="key", image_col="url",
                  **{**FAST, "per_domain_rps": 5, "workers": 2, "download_threads": 8, "samples_per_shard": 21})
    assert m["counts"]["written"] == n
    times = sorted(t for t, host, _, _ in server.log)
    assert len(times) >= n
    assert times[-1] - times[0] >= (n - 1) / 5 - 1.2, times[-1] - times[0]  # 8 s at 5 requests/s
    # each request leaves in its own 0.2 s slot: any 11 consecutive arrivals span 10 slots (2 s) less one
    # slot and the delay of the first; a burst of late requests spans next to nothing
    spans = [times[i + 10] - times[i] for i in range(len(times) - 10)]
    assert min(spans) >= 0.8, spans


def test_the_domain_gate_spaces_claims_across_processes(tmp_path):
    """The cross-process part of the rate, without timing: two gates that share only their state folder
    (as two worker processes do) give concurrent claimants start times a full spacing apart."""
    from mmdata.sources.http_net import DomainGate

    gates = [DomainGate(8, 5, state_dir=str(tmp_path / "domains")) for _ in range(2)]
    starts, lock = [], threading.Lock()

    def claim(gate):
        for _ in range(10):
            start = gate._claim("example.org", 0.2)
            with lock:
                starts.append(start)

    threads = [threading.Thread(target=claim, args=(gates[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts.sort()
    assert len(starts) == 60
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.2 - 1e-5  # the file keeps 6 decimals
    other = DomainGate(8, 5, state_dir=str(tmp_path / "domains"))._claim("other.org", 0.2)
    assert other < starts[-1]  # another host has its own budget


def test_client_caches_dns_and_parses_headers(server):
    import httpx

    d = Downloader(DownloadOptions(threads=4, allow_private_addresses=True, contact_url="https://example.org/bot"))
    try:
        port = server.server_address[1]
        server.log.clear()
        got = list(d.fetch_many([(f"http://localhost:{port}/img/{i}.jpg", "image") for i in range(6)]))
        assert [g.data for g in got] == [jpeg(f"{i}.jpg") for i in range(6)]
        assert d.resolver.lookups == 1  # one resolution for six downloads
        assert server.log[0][3] == "mmdata (+https://example.org/bot)"
    finally:
        d.close()
    assert parse_retry_after("7") == 7.0 and parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0 + 1e-9
    h = httpx.Headers([("X-Robots-Tag", "googlebot: noindex"), ("X-Robots-Tag", "NoAI")])
    assert optout_directive(h, ("noai", "noindex"), "mmdata") == "noai"
    assert optout_directive(httpx.Headers({"X-Robots-Tag": "googlebot: noindex"}), ("noindex",), "mmdata") is None
    assert optout_directive(h, (), "mmdata") is None


def digests(out) -> dict:
    files = sorted(f for p in ("shards/*.tar", "shards/*.parquet", "shards/sizes.json")
                   for f in glob.glob(os.path.join(str(out), p)))
    return {os.path.relpath(f, out): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}


def test_retry_failed_rebuilds_only_units_with_transient_failures(server, tmp_path):
    b = server.base
    urls = {**{f"a{i}": f"{b}/flaky/a{i}.jpg" for i in range(3)}, "a3": f"{b}/img/a3.jpg",  # unit 0
            **{f"b{i}": f"{b}/img/b{i}.jpg" for i in range(4)},  # unit 1
            "c0": f"{b}/status/404/c0.jpg", "c1": f"{b}/img/c1.jpg"}  # unit 2: a permanent failure
    src, out = manifest(tmp_path, urls), tmp_path / "out"
    kw = dict(key_col="key", image_col="url", **{**FAST, "samples_per_shard": 4, "download_retries": 0})
    server.down = True
    try:
        m1 = run_build(src, out, **kw)
    finally:
        server.down = False
    assert m1["reasons"]["failed"] == {"http:503": 3, "http:404": 1} and m1["counts"]["written"] == 6
    before = digests(out)
    stamps = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in before}
    # the server has recovered: the command line needs only the output folder
    res = CliRunner().invoke(app, ["build", "-o", str(out), "--retry-failed", "--no-progress"])
    assert res.exit_code == 0, res.output
    after = digests(out)
    m2 = __import__("json").load(open(out / "manifest.json"))
    check_accounting(m2, 10)
    assert m2["counts"]["written"] == 9 and m2["reasons"]["failed"] == {"http:404": 1}
    assert m2["run"]["units_built"] == 1 and m2["run"]["units_skipped"] == 2
    assert {k: r["status"] for k, r in rows(out).items() if k.startswith("a")} == dict.fromkeys(
        ["a0", "a1", "a2", "a3"], "written")
    changed = {f for f in after if after[f] != before[f]}
    assert changed == {"shards/00000.tar", "shards/00000.parquet", "shards/sizes.json"}
    for f in ("shards/00001.tar", "shards/00001.parquet", "shards/00002.tar", "shards/00002.parquet"):
        assert os.stat(os.path.join(out, f)).st_mtime_ns == stamps[f], f  # not even rewritten
    # nothing transient left: a second retry builds nothing
    res = CliRunner().invoke(app, ["build", "-o", str(out), "--retry-failed", "--no-progress"])
    assert res.exit_code == 0 and digests(out) == after


def test_retry_failed_needs_a_build(tmp_path):
    res = CliRunner().invoke(app, ["build", "-o", str(tmp_path / "none"), "--retry-failed"])
    assert res.exit_code == 2 and "holds no mmdata build" in res.output


def test_same_url_build_on_local_dask_and_beam(server, tmp_path):
    b = server.base
    urls = {**{f"k{i:02d}": f"{b}/img/k{i}.jpg" for i in range(8)}, "r": f"{b}/redirect/2/r.jpg",
            "m": f"{b}/status/404/m.jpg", "o": f"{b}/optout/noai/o.jpg", "h": f"{b}/html/h.jpg"}
    src = manifest(tmp_path, urls)
    kw = dict(image_col="url", **{**FAST, "samples_per_shard": 4})
    ref = run_build(src, tmp_path / "local", **kw)
    check_accounting(ref, len(urls))
    expected = digests(tmp_path / "local")
    assert len([f for f in expected if f.endswith(".tar")]) == 3
    for name, extra in {"dask": dict(engine="dask", workers=2), "beam": dict(engine="beam", workers=1)}.items():
        m = run_build(src, tmp_path / name, **{**kw, **extra})
        assert digests(tmp_path / name) == expected, name
        assert m["counts"] == ref["counts"] and m["reasons"] == ref["reasons"], name
