"""Helpers of the browser tests: headless Debian chromium driven by Playwright, a demo-like build,
and `mmdata serve` on a free port (started and stopped by the test)."""
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from mmdata.build import build
from mmdata.config import load_config

CHROMIUM = "/usr/bin/chromium"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "pipelines", "configs", "demo.yaml")


def demo_build(corpus_root, out):
    """The demo build (pipelines/configs/demo.yaml: tiny random-weight model, fused, tokens, index)."""
    return build(load_config(DEMO_CONFIG, input=str(corpus_root), out=str(out), progress=False, workers=2,
                             samples_per_shard=8))


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (install Debian's chromium: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def open_page(browser, **kw):
    """A new page whose waits give up after 120 s, not Playwright's 30 s (a loaded machine renders slowly)."""
    page = browser.new_page(**kw)
    page.set_default_timeout(120_000)
    return page


def watch(page):
    """Console errors, page errors and failed requests of ``page``, as a list that fills as it runs."""
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"requestfailed: {r.url[:80]} {r.failure}"))
    return problems


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, data=None, headers=None, method=None):
    """(status, body bytes) of a request to the local server; 4xx/5xx are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Served:
    """``mmdata serve OUT`` in a child process on 127.0.0.1 and a free port; ``stop()`` ends it."""

    def __init__(self, out, *args):
        for _ in range(3):  # the free port can be taken by another process before the server binds it
            if self.start(out, *args):
                return
        raise AssertionError(f"mmdata serve found its port taken three times: {self.stderr}")

    def start(self, out, *args) -> bool:
        """True once the server answers; False if its port was taken meanwhile."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mmdata", "serve", str(out), "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 300  # a loaded machine can take minutes to start it
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.stderr = self.proc.stderr.read()
                if "address already in use" in self.stderr.lower():
                    return False
                raise AssertionError(f"mmdata serve exited {self.proc.returncode}: {self.stderr}")
            try:
                if get(self.url + "/api/info")[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("mmdata serve did not answer within 300 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
