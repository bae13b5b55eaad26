"""report.html: written by finalize and by `mmdata report`, self-contained, bounded, and saying what the
build holds (counts equal manifest.json, every reason with examples, samples, audio, views, neighbours)."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mmdata.storage import OutputDir
from tests.conftest import run_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "pipelines", "configs", "augment_example.yaml")
TINY = {"model": "mmdata-tiny", "pretrained": "random"}


def write_mixed_corpus(root, photos):
    """A few photos of the demo corpus, its broken files, and two recordings with srt transcripts."""
    sf = pytest.importorskip("soundfile")
    for sub in ("animals", "broken", "space"):
        shutil.copytree(os.path.join(photos, sub), os.path.join(root, sub))
    os.makedirs(os.path.join(root, "talks"))
    sr = 16000
    t = np.arange(int(sr * 3.0)) / sr
    for i, freq in enumerate((220.0, 440.0)):
        sf.write(os.path.join(root, "talks", f"talk{i}.wav"), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32),
                 sr, subtype="PCM_16")
        with open(os.path.join(root, "talks", f"talk{i}.srt"), "w") as fh:
            fh.write("1\n00:00:00,000 --> 00:00:01,200\nhello there\n\n2\n00:00:01,400 --> 00:00:02,600\n"
                     f"a tone of {freq:.0f} hertz\n\n3\n00:00:09,000 --> 00:00:10,000\npast the end\n")
    with open(os.path.join(root, "talks", "broken.wav"), "wb") as fh:
        fh.write(b"RIFF not really a wave file")
    with open(os.path.join(root, "talks", "broken.txt"), "w") as fh:
        fh.write("a recording that does not decode")
    return root


@pytest.fixture(scope="module")
def mixed(corpus, tmp_path_factory):
    root = write_mixed_corpus(str(tmp_path_factory.mktemp("mixed")), corpus[0])
    out = tmp_path_factory.mktemp("mixed_out")
    manifest = run_build(root, out, workers=2, require=["text"], augment=EXAMPLE, views=1, fused="mean",
                         audio_encoder="mel-stats", **TINY)
    return str(out), manifest


def page(out):
    with open(os.path.join(out, "report.html"), encoding="utf-8") as fh:
        return fh.read()


def test_report_counts_and_reasons_match_the_manifest(mixed):
    out, manifest = mixed
    html = page(out)
    counts = dict(re.findall(r'data-count="(\w+)">(\d+)<', html))
    assert {k: int(v) for k, v in counts.items()} == {"records": manifest["records"], **manifest["counts"]}
    listed = dict(re.findall(r'data-reason="([^"]+)" data-n="(\d+)"', html))
    expected = {r: n for status in ("filtered", "failed") for r, n in manifest["reasons"][status].items()}
    assert expected and {r: int(n) for r, n in listed.items()} == expected
    assert "decode:image" in listed and any(r.startswith("segment:") for r in listed)


def test_report_is_self_contained_and_bounded(mixed):
    out, _ = mixed
    html = page(out)
    srcs = re.findall(r'\ssrc="([^"]*)"', html) + re.findall(r'\shref="([^"]*)"', html) + \
        re.findall(r"\shref='([^']*)'", html)
    assert srcs and all(s.startswith("data:") for s in srcs), [s[:60] for s in srcs if not s.startswith("data:")]
    assert "<script src" not in html and "@import" not in html and "url(http" not in html
    assert len(html) < 20 * 2**20
    thumbs = re.findall(r'<img src="data:image/jpeg;base64,', html)
    assert 0 < len(thumbs) <= 400


def test_report_shows_audio_views_neighbours_plots_and_provenance(mixed):
    out, manifest = mixed
    html = page(out)
    assert re.search(r'<audio controls preload="none" src="data:audio/flac;base64,', html)
    assert re.search(r"\d+\.\d\d–\d+\.\d\d s", html)  # a transcript segment's times
    assert "hello there" in html
    assert '<div class="views">' in html  # augmented views beside their parent
    assert html.count('class="card query"') >= 1 and "score " in html
    for title in ("Image sizes (source)", "Caption length", "Audio duration", "Embeddings by modality (PCA)"):
        assert title in html, title
    assert html.count("<svg") >= 5
    assert manifest["config_hash"] in html and manifest["versions"]["numpy"] in html
    assert "mmdata-tiny" in html
    # examples of removed samples: the decode:image row of the broken jpeg names its detail
    block = html[html.index('data-reason="decode:image"'):]
    example = block[block.index('class="examples"'):block.index("</div></td></tr>")]
    assert "broken_" in example


def test_mmdata_report_remakes_the_same_file(mixed, tmp_path):
    out = tmp_path / os.path.basename(mixed[0])  # the page is titled by the folder's name
    shutil.copytree(mixed[0], out)
    first = (out / "report.html").read_bytes()
    (out / "report.html").unlink()
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "mmdata", "report", str(out)], check=False, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out / "report.html")
    assert (out / "report.html").read_bytes() == first  # same output, same page


def test_mmdata_report_refuses_what_is_not_a_build(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"name": "not ours"}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    for folder in ("empty", "other", "broken", "missing"):
        res = subprocess.run([sys.executable, "-m", "mmdata", "report", str(tmp_path / folder)], check=False, capture_output=True,
                             text=True, env=env)
        assert res.returncode == 2, (folder, res.stdout, res.stderr)
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr


def test_no_report_flag(corpus, tmp_path):
    run_build(corpus[0], tmp_path / "o", workers=1, report=False)
    assert not (tmp_path / "o" / "report.html").exists()
    assert OutputDir(str(tmp_path / "o")).exists("manifest.json")
