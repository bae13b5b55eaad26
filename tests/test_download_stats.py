"""Download statistics (issue 12): each unit's ``_stats.json`` counts its URLs, HTTP requests,
retries, body bytes received, download seconds and outcomes; ``manifest.json`` sums them and
report.html shows them. The numbers are checked against what the local server observed."""
import glob
import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import run_build
from test_download import FAST, Handler, serving, jpeg, manifest


class Counting(Handler):
    """The fault server, noting every response's status and body length (what it served)."""

    def send(self, code, body=b"", ctype="image/jpeg", length=None, **headers):
        with self.server.lock:
            self.server.served.append((self.path, code, len(body), bool(headers.get("X_Robots_Tag"))))
        super().send(code, body, ctype, length, **headers)


@pytest.fixture()
def server():
    with serving(Counting, served=[]) as srv:
        yield srv


def test_download_statistics_match_what_the_server_saw(server, tmp_path):
    b = server.base
    urls = {f"ok{i}": f"{b}/img/ok{i}.jpg" for i in range(7)}
    urls.update({"hops": f"{b}/redirect/2/r.jpg", "missing": f"{b}/status/404/a.jpg",
                 "busy": f"{b}/status/503/a.jpg", "optout": f"{b}/optout/noai/o.jpg", "html": f"{b}/html/h.jpg"})
    # no URL here is slow: generous timeouts, so a loaded machine (CI) cannot turn an answer into a
    # timeout and its retry (CI once saw 18 requests for 15)
    m = run_build(manifest(tmp_path, urls), tmp_path / "out", key_col="key", image_col="url",
                  **{**FAST, "samples_per_shard": 4, "connect_timeout": 30.0, "read_timeout": 30.0,
                     "download_timeout": 60.0})
    d = m["downloads"]
    # the server's view: every request it received, and the bodies the client read (answers it took)
    assert d["requests"] == len(server.log) == len(server.served)
    assert d["requests"] == 7 + 3 + 1 + 2 + 1 + 1  # a redirect chain of 2 hops, 503 retried once (download_retries=1)
    read = [n for path, code, n, optout in server.served if code == 200 and not optout and not path.startswith("/html")]
    assert d["bytes"] == sum(read) == sum(len(jpeg(f"ok{i}.jpg")) for i in range(7)) + len(jpeg("r.jpg"))
    assert d["urls"] == len(urls) and d["retries"] == 1
    assert d["outcomes"] == {"ok": 8, "http:404": 1, "http:503": 1, "optout:noai": 1, "content:text/html": 1}
    assert d["seconds"] >= 1.0  # the 503's Retry-After: 1 was waited for
    # the manifest sums the units' own statistics
    units = [json.loads(pathlib.Path(f).read_text()) for f in sorted(glob.glob(f"{tmp_path}/out/shards/*_stats.json"))]
    assert len(units) == 3 and all(u["downloads"]["urls"] == u["counts"]["records"] for u in units)
    for k in ("urls", "requests", "retries", "bytes"):
        assert sum(u["downloads"][k] for u in units) == d[k]
    assert abs(sum(u["downloads"]["seconds"] for u in units) - d["seconds"]) < 0.01
    line = f"Downloads: 12 URLs, {d['requests']} HTTP requests (1 retries), {d['bytes']:,} body bytes"
    assert line in (tmp_path / "out" / "report.html").read_text()
    # `mmdata report OUT` in a fresh process makes it again (it failed on `pa.compute` not imported)
    (tmp_path / "out" / "report.html").unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "mmdata", "report", str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert line in (tmp_path / "out" / "report.html").read_text()


def test_a_build_without_urls_has_no_download_statistics(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a")
    m = run_build(tmp_path, tmp_path / "out", workers=1)
    assert "downloads" not in m and m["counts"]["written"] == 1
    assert "Downloads:" not in (tmp_path / "out" / "report.html").read_text()
