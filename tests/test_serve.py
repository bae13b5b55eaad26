"""`mmdata serve` on a demo build: the search page in headless chromium (text query, click for
neighbours, image upload), the JSON API, clip-retrieval's endpoints, and 4xx for bad requests."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from mmdata.search import Retriever
from tests.browser import ROOT, Served, browser, demo_build, get, open_page, watch  # noqa: F401  (browser is a fixture)


@pytest.fixture(scope="module")
def demo(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_serve")
    demo_build(corpus[0], out)
    return str(out)


@pytest.fixture(scope="module")
def served(demo):
    srv = Served(demo)
    try:
        yield srv
    finally:
        srv.stop()


def api(served, path, **kw):
    status, body = get(served.url + path, **kw)
    return status, json.loads(body)


def test_text_query_and_neighbours_in_the_page(browser, served, tmp_path):  # noqa: F811
    page = open_page(browser, viewport={"width": 1280, "height": 900})
    problems = watch(page)
    page.goto(served.url + "/")
    page.fill("#q", "a photo of a cat")
    page.click("#go")
    page.wait_for_selector("#results .card")
    cards = page.locator("#results .card")
    assert cards.count() == 12
    _, expected = api(served, "/api/search?text=a+photo+of+a+cat&k=12&modality=image")
    assert [c.get_attribute("data-key") for c in cards.all()] == [r["key"] for r in expected["results"]]
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(tmp_path / "serve_text.png"), full_page=True)
    first = cards.first.get_attribute("data-key")
    cards.first.click()
    page.wait_for_function(f"document.querySelector('#status').textContent.includes('neighbours of {first}')")
    page.wait_for_selector("#results .card")
    shown = [c.get_attribute("data-key") for c in page.locator("#results .card").all()]
    _, neighbours = api(served, f"/api/search?key={first}&k=12&modality=image")
    assert shown == [r["key"] for r in neighbours["results"]] and first not in shown
    page.screenshot(path=str(tmp_path / "serve_neighbours.png"), full_page=True)
    assert not problems, problems
    page.close()


def test_image_upload_in_the_page(browser, served, corpus):  # noqa: F811
    page = open_page(browser)
    problems = watch(page)
    page.goto(served.url + "/")
    page.set_input_files("#file", os.path.join(corpus[0], "animals", "chelsea.png"))
    page.wait_for_function("document.querySelector('#status').textContent.includes('similar to chelsea.png')")
    assert page.locator("#results .card").count() == 12
    assert not problems, problems
    # a 50 MB upload sent by the browser itself is refused with 413 and a message
    status, message = page.evaluate("""async () => {
        const res = await fetch('/api/search?kind=image', {method: 'POST', body: new Uint8Array(50 * 2 ** 20)});
        return [res.status, (await res.json()).error];
    }""")
    assert status == 413 and "limit" in message
    page.close()


def test_clip_retrieval_back_end(served, demo):
    status, names = api(served, "/indices-list")
    assert status == 200 and names == [os.path.basename(demo)]
    r = Retriever(demo)
    key = "animals_horse"
    vec = r.embedding_of(key, "image").tolist()
    body = {"text": None, "image": None, "image_url": None, "embedding_input": vec, "modality": "image",
            "num_images": 5, "indice_name": names[0], "num_result_ids": 5, "use_mclip": False, "deduplicate": True,
            "use_safety_model": False, "use_violence_detector": False, "aesthetic_score": "", "aesthetic_weight": 0.0}
    status, hits = api(served, "/knn-service", data=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    assert status == 200 and len(hits) == 5
    assert hits[0]["similarity"] == pytest.approx(1.0, abs=1e-3) and key in [h["key"] for h in hits]
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(hits[0]["image"]))).size[0] > 0
    body.update(embedding_input=None, text="a horse")
    status, text_hits = api(served, "/knn-service", data=json.dumps(body).encode())
    assert status == 200 and [h["key"] for h in text_hits] == [h.key for h in r.search_text("a horse", 5, "image")]
    status, metas = api(served, "/metadata", data=json.dumps({"ids": [h["id"] for h in hits], "indice_name": names[0]}).encode())
    assert status == 200 and [m["metadata"]["key"] for m in metas] == [h["key"] for h in hits]


def test_members_and_thumbnails_by_offset(served, demo):
    status, res = api(served, "/api/search?key=animals_horse&k=3")
    assert status == 200 and len(res["results"]) == 3
    hit = res["results"][0]
    status, thumb = get(hit["thumbnail"])
    assert status == 200 and thumb[:2] == b"\xff\xd8"
    status, txt = get(f"{served.url}/member/{hit['key']}/txt")
    assert status == 200 and txt.decode() == hit["caption"]


@pytest.mark.parametrize("path,kw,code", [
    ("/api/search?key=no_such_key", {}, 400),
    ("/api/search?text=x&k=0", {}, 400),
    ("/api/search?text=x&k=many", {}, 400),
    ("/api/search?text=x&colour=red", {}, 400),
    ("/api/search?text=x&modality=audio", {}, 400),
    ("/api/search", {}, 400),
    ("/api/search?kind=image", {"data": b"GIF89a not really"}, 400),
    ("/api/search?kind=image", {"data": b""}, 400),
    ("/api/search?kind=image", {"data": b"\0" * (50 * 2**20)}, 413),
    ("/knn-service", {"data": b"{not json"}, 400),
    ("/knn-service", {"data": b'{"image": "@@@"}'}, 400),
    ("/knn-service", {"data": b'{"text": "x", "indice_name": "elsewhere"}'}, 400),
    ("/knn-service", {"data": b'{"embedding_input": [1, 2]}'}, 400),
    ("/knn-service", {"data": b'{"image_url": "http://example.invalid/a.jpg"}'}, 400),
    ("/metadata", {"data": b'{"ids": [1]}'}, 404),
    ("/metadata", {"data": b'{"ids": ["a"]}'}, 400),
    ("/metadata", {"data": b'{"ids": [99999999999999999999999]}'}, 400),
    ("/thumb/no_such_key", {}, 404),
    ("/member/animals_horse/exe", {}, 404),
])
def test_bad_requests_get_4xx_with_a_message(served, path, kw, code):
    status, body = get(served.url + path, **kw)
    assert status == code, body
    assert json.loads(body)["error"]


def test_refuses_an_output_without_an_index(demo, tmp_path):
    out = tmp_path / "noindex"
    shutil.copytree(demo, out)
    shutil.rmtree(out / "index")
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "mmdata", "serve", str(out), "--port", "1"], capture_output=True,
                         text=True, env=env, timeout=300, check=False)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "no index" in res.stderr


def test_binds_loopback_by_default():
    import inspect

    from mmdata.cli.serve import serve

    assert inspect.signature(serve).parameters["host"].default.default == "127.0.0.1"


def test_audio_upload_searches_the_audio_index(tmp_path):
    """A recording POSTed to /api/search finds the segments it was cut into (mel-stats audio index)."""
    sf = pytest.importorskip("soundfile")
    import numpy as np

    from tests.conftest import run_build

    src = tmp_path / "talks"
    src.mkdir()
    sr = 16000
    t = np.arange(sr * 2) / sr
    for i, freq in enumerate((220.0, 1760.0)):
        sf.write(src / f"talk{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")
        (src / f"talk{i}.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n\n"
                                          "2\n00:00:01,000 --> 00:00:02,000\nworld\n")
    run_build(src, tmp_path / "out", workers=1, require=["audio"], audio_encoder="mel-stats")
    srv = Served(tmp_path / "out")
    try:
        data = (src / "talk1.wav").read_bytes()
        status, body = get(srv.url + "/api/search?kind=audio&ext=wav&k=2", data=data,
                           headers={"Content-Type": "audio/wav"})
        res = json.loads(body)
        assert status == 200, res
        assert res["modality"] == "audio" and {r["key"] for r in res["results"]} == {"talk1_s0000", "talk1_s0001"}
        status, flac = get(res["results"][0]["audio"])
        assert status == 200 and flac[:4] == b"fLaC"
        status, body = get(srv.url + "/api/search?kind=audio&ext=wav", data=b"not a recording")
        assert status == 400 and "the uploaded audio" in json.loads(body)["error"]
        status, body = get(srv.url + "/api/search?text=hello&modality=audio")
        assert status == 400 and "text tower" in json.loads(body)["error"]
    finally:
        srv.stop()


def test_cors_is_off_unless_asked(demo):
    """Any page open in a browser could query a server that allows every origin: only --cors allows it."""
    from starlette.testclient import TestClient

    from mmdata.serve.app import make_app

    origin = {"Origin": "http://example.invalid"}
    with TestClient(make_app(demo), base_url="http://127.0.0.1") as client:
        res = client.get("/indices-list", headers=origin)
        assert res.status_code == 200 and "access-control-allow-origin" not in res.headers
    with TestClient(make_app(demo, cors=True), base_url="http://127.0.0.1") as client:
        res = client.get("/indices-list", headers=origin)
        assert res.status_code == 200 and res.headers.get("access-control-allow-origin") in ("*", origin["Origin"])
