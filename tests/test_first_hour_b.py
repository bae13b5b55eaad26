"""Issue 16 (the first hour of a new user): the flags reach the build, offline model errors,
the max_pixels detail, the demo's closing hints."""
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MMDATA = [sys.executable, "-m", "mmdata"]


def cli(*args, **kw):
    return subprocess.run(MMDATA + list(args), capture_output=True, text=True, **kw)


def one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_max_caption_chars_flag_truncates(corpus, tmp_path):
    out = tmp_path / "o"
    res = cli("build", "-i", corpus[0], "-o", str(out), "--max-caption-chars", "10", "--workers", "1",
              "--no-progress", "--samples-per-shard", "100")
    assert res.returncode == 0, res.stderr
    rows = [r for r in pq.read_table(out / "shards" / "00000.parquet").to_pylist() if r["status"] == "written"]
    assert rows and all(len(r["caption"]) <= 10 for r in rows)
    assert any(len(r["caption"]) == 10 for r in rows)


def test_bad_value_of_a_new_flag_names_the_field(corpus, tmp_path):
    one_line_error(cli("build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--max-caption-chars", "0"),
                   "max_caption_chars")
    one_line_error(cli("build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--index-recall-target", "2"),
                   "index_recall_target")


@pytest.mark.parametrize("args,fragments", [
    (["--model", "mmdata-tiny"], ["--pretrained random", "checkpoint"]),   # no tags at all
    (["--model", "ViT-B-32"], ["HF_HUB_OFFLINE", "checkpoint", "--model mmdata-tiny --pretrained random"]),
    (["--model", "ViT-B-32", "--pretrained", "nosuchtag"], ["nosuchtag", "random"]),
])
def test_a_model_without_offline_weights_names_the_remedies(corpus, tmp_path, args, fragments):
    res = cli("build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--no-progress", *args,
              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    one_line_error(res, *fragments)


@pytest.fixture(scope="module")
def offline_build(corpus, tmp_path_factory):
    """The README's offline path, through the CLI with 2 workers and the progress bar on."""
    out = tmp_path_factory.mktemp("offline") / "o"
    res = cli("build", "-i", corpus[0], "-o", str(out), "--workers", "2", "--samples-per-shard", "16",
              "--model", "mmdata-tiny", "--pretrained", "random", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    return str(out), res


def test_the_documented_offline_path_builds_embeddings(offline_build):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "--model mmdata-tiny --pretrained random" in readme
    out, _ = offline_build
    assert os.path.exists(os.path.join(out, "embeddings", "image", "00000.npy"))


def test_random_weights_warning_prints_once(offline_build):
    _, res = offline_build
    assert res.stderr.count("random weights") == 1, res.stderr
    assert "initialized randomly" not in res.stderr  # open_clip's own, once per worker


@pytest.mark.parametrize("max_pixels,size", [(1000, 100), (100_000_000, 65500), (50_000_000, 20000)])
def test_max_pixels_detail_quotes_the_configured_limit(max_pixels, size):
    from PIL import Image

    from mmdata.errors import SampleFiltered
    from mmdata.transforms.image import ImageOptions, ImageTransform
    from pipelines.demo_corpus import huge_header_png

    with pytest.raises(SampleFiltered) as exc:
        ImageTransform(ImageOptions(max_pixels=max_pixels))(huge_header_png(size, size))
    assert exc.value.reason == "max_pixels"
    assert f"> {max_pixels} pixels" in exc.value.detail, exc.value.detail
    assert str(size * size) in exc.value.detail
    assert str(2 * Image.MAX_IMAGE_PIXELS) not in exc.value.detail  # not Pillow's own limit


def test_max_pixels_above_pillows_limit_is_honoured():
    from mmdata.errors import SampleFailed
    from mmdata.transforms.image import ImageOptions, ImageTransform
    from pipelines.demo_corpus import huge_header_png

    # 20000 x 20000 = 4e8 pixels: over Pillow's default bomb limit, under the configured 5e8, so
    # it passes the guard and fails later only because its pixel data is missing
    with pytest.raises(SampleFailed) as exc:
        ImageTransform(ImageOptions(max_pixels=500_000_000))(huge_header_png(20000, 20000))
    assert exc.value.reason == "decode:image"


def test_setup_declares_its_data_without_setuptools_warnings(tmp_path):
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(ROOT, "setup.py"), src)
    for pkg in ("mmdata", "pipelines"):
        shutil.copytree(os.path.join(ROOT, pkg), src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "setup.py", "build_py", "--build-lib", str(tmp_path / "lib")],
                         cwd=src, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "absent from the" not in res.stdout + res.stderr
    assert (tmp_path / "lib" / "mmdata" / "encoders" / "model_configs" / "mmdata-tiny.json").is_file()
    # pipelines/ holds programs run from the repository: not installed as a top-level package
    assert not (tmp_path / "lib" / "pipelines").exists()


def demo_next(out, *args):
    return subprocess.run([sys.executable, "-m", "pipelines.demo_next", out, *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_demo_next_steps_run_as_printed(offline_build):
    import json
    import shlex

    out, _ = offline_build
    mmdata = " ".join(shlex.quote(a) for a in MMDATA)
    res = demo_next(out, "--mmdata", mmdata, "--python", shlex.quote(sys.executable))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    n = len(json.load(open(os.path.join(out, "shards", "sizes.json"))))
    assert n > 1 and f"{out}/shards/{{00000..{n - 1:05d}}}.tar" in text
    assert "random weights" in text and "mmdata-tiny" in text
    assert text.splitlines()[-2] == f"  report.html:      {out}/report.html  (open it in a browser)"
    assert os.path.isfile(os.path.join(out, "report.html"))
    assert text.splitlines()[-1].startswith(f"  search page:      {mmdata} serve {shlex.quote(out)}")
    commands = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
                for line in text.splitlines() if line.startswith("  ") and ":" in line}
    for label, expect in [("inspect a shard", "samples"), ("search", "  1  "), ("load a batch", "'image': (4, 3,")]:
        run = subprocess.run(commands[label], shell=True, capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT})
        assert run.returncode == 0 and expect in run.stdout, (label, commands[label], run.stdout, run.stderr)


def test_shard_pattern_and_a_missing_build(tmp_path):
    from pipelines.demo_next import shard_pattern

    assert shard_pattern("d", ["00001.tar", "00000.tar", "00002.tar"]) == "d/shards/{00000..00002}.tar"
    assert shard_pattern("d/", ["00000.tar"]) == "d/shards/00000.tar"
    assert shard_pattern("d", ["00000.tar", "00003.tar"]) == "d/shards/{00000,00003}.tar"
    res = demo_next(str(tmp_path / "nothing"))
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "not a finished build" in res.stderr
