"""A killed `mmdata curate` resumes: a real SIGKILL of the process group after the n-th done marker of
a stage (``MMDATA_TEST_CURATE_PAUSE`` makes the process print a line and sleep there), then the same
command again gives the bytes of an uninterrupted run, skipping what was done; another config refuses
in one line unless --overwrite."""
import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import kill_at_line, run_build
from mmdata.curate import curate, load_curate_config
from mmdata.tools.verify import verify_output
from pipelines.demo_corpus import PHOTOS, skimage_photo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = ["--workers", "1", "--samples-per-shard", "3", "--semantic", "pair", "--semantic-eps", "0.0001"]


def jpeg(im, quality=90):
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Ten photos with captions, an exact copy and a resized copy, built in shards of four."""
    root = tmp_path_factory.mktemp("resume_in")
    names = sorted(PHOTOS)[:10]
    for name in names:
        (root / f"p_{name.split('.')[0]}.jpg").write_bytes(jpeg(skimage_photo(name)))
        (root / f"p_{name.split('.')[0]}.txt").write_text(PHOTOS[name][1])
    first = skimage_photo(names[0]).convert("RGB")
    (root / "z_copy.jpg").write_bytes((root / f"p_{names[0].split('.')[0]}.jpg").read_bytes())
    (root / "z_copy.txt").write_text("a copy of the first photo")
    (root / "z_small.jpg").write_bytes(jpeg(first.resize((first.width // 2, first.height // 2), Image.LANCZOS)))
    (root / "z_small.txt").write_text("the first photo made smaller")
    out = tmp_path_factory.mktemp("resume_build")
    run_build(root, out, workers=1, image_size=64, samples_per_shard=4, model="mmdata-tiny", pretrained="random",
              embedding_dtype="float32")
    return str(out)


@pytest.fixture(scope="module")
def reference(build, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_ref") / "ref"
    curate(build, str(out), load_curate_config(workers=1, samples_per_shard=3, semantic=["pair"], semantic_eps=0.0001))
    return str(out)


def files(out):
    skip = ("manifest.json", "index/index_infos.json", "report.html")  # timings, the folder's name
    return {os.path.relpath(p, out): open(p, "rb").read() for p in sorted(glob.glob(f"{out}/**/*", recursive=True))
            if os.path.isfile(p) and os.path.relpath(p, out) not in skip}


def command(build, out, *extra):
    return [sys.executable, "-m", "mmdata", "curate", build, "--out", out, *OPTIONS, *extra]


def run_and_kill(build, out, point):
    env = dict(os.environ, MMDATA_TEST_CURATE_PAUSE=point, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    kill_at_line(command(build, out), env, f"mmdata-curate-pause {point}")


def rerun(build, out, *extra):
    return subprocess.run(command(build, out, *extra), check=False, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1"), timeout=300)


@pytest.mark.parametrize("point", ["measure:2", "decide:1", "write:2"])
def test_killed_curate_resumes_to_the_same_bytes(build, reference, tmp_path, point):
    out = str(tmp_path / "c")
    run_and_kill(build, out, point)
    stage, _, n = point.partition(":")
    marks = sorted(glob.glob(f"{out}/.mmdata-curate/**/done/{stage}_*.json", recursive=True))
    assert len(marks) == int(n)
    assert not os.path.exists(f"{out}/shards/sizes.json")  # not finished
    if stage == "write":
        done_tar = f"{out}/shards/00000.tar"
        before = os.stat(done_tar).st_mtime_ns
        # another config does not mix into it: one line, exit 2, nothing touched
        r = rerun(build, out, "--phash-max-distance", "4")
        assert r.returncode == 2 and "unfinished curation" in r.stderr and "--overwrite" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert os.stat(done_tar).st_mtime_ns == before
    r = rerun(build, out)
    assert r.returncode == 0, r.stderr[-3000:]
    if stage == "write":
        assert os.stat(done_tar).st_mtime_ns == before  # a written shard is not written again
    assert files(out) == files(reference)
    assert not os.path.exists(f"{out}/.mmdata-curate")
    assert verify_output(out) == []


def test_killed_between_exact_dedup_bucket_tasks_resumes_to_the_same_bytes(build, reference, tmp_path, monkeypatch):
    """The build's 12 rows cut into 12 exact-dedup buckets (the reference has one: the result does not
    depend on them), killed after the first image bucket task, the image copy's bucket still to do;
    the re-run does the rest."""
    monkeypatch.setenv("MMDATA_TEST_CURATE_BUCKET_ROWS", "1")  # the killed run and the re-run
    out = str(tmp_path / "c")
    run_and_kill(build, out, "exact_image:1")
    done = f"{out}/.mmdata-curate/exact/done"
    assert [len(glob.glob(f"{done}/exact_{m}_*.json")) for m in ("image", "text", "audio")] == [1, 0, 0]
    digests = np.concatenate([np.load(p) for p in sorted(glob.glob(f"{out}/.mmdata-curate/exact/image/*.npy"))])
    _, first, count = np.unique(digests[:, 2:], axis=0, return_index=True, return_counts=True)
    dup_buckets = {int(digests[i, 0]) for i in first[count > 1]}
    assert len(dup_buckets) == 1  # z_copy and the photo it copies
    assert not os.path.exists(f"{done}/exact_image_{min(dup_buckets):05d}.json")  # found by the re-run
    r = rerun(build, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert files(out) == files(reference)
    assert not os.path.exists(f"{out}/.mmdata-curate")
    cli = subprocess.run([sys.executable, "-m", "mmdata", "verify", out], check=False, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1"), timeout=300)
    assert cli.returncode == 0, cli.stdout + cli.stderr


def test_other_config_with_overwrite_starts_over(build, reference, tmp_path):
    out = str(tmp_path / "c")
    run_and_kill(build, out, "write:1")
    r = rerun(build, out, "--phash-max-distance", "4", "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    r = rerun(build, out)  # finished: the same command now needs --overwrite
    assert r.returncode == 2 and "not empty" in r.stderr
    r = rerun(build, out, "--overwrite")
    assert r.returncode == 0 and files(out) == files(reference)


def test_other_partition_or_mmdata_version_refuses(build, reference, tmp_path, monkeypatch):
    """The killed run's markers are of its partition (12 exact-dedup buckets here) and of its mmdata: a
    re-run with other sizing constants (2 buckets), or by another mmdata version, would trust them for
    other task files and miss duplicates: it refuses in one line, touching nothing, unless --overwrite."""
    monkeypatch.setenv("MMDATA_TEST_CURATE_BUCKET_ROWS", "1")
    out = str(tmp_path / "c")
    run_and_kill(build, out, "exact_image:1")
    manifest = open(f"{out}/manifest.json").read()
    monkeypatch.delenv("MMDATA_TEST_CURATE_BUCKET_ROWS")
    r = rerun(build, out)
    assert r.returncode == 2 and "unfinished curation" in r.stderr and "partition differ" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert open(f"{out}/manifest.json").read() == manifest
    monkeypatch.setenv("MMDATA_TEST_CURATE_BUCKET_ROWS", "1")
    unfinished = json.loads(manifest)
    unfinished["curate"]["run"]["mmdata_version"] = "0.0.1"  # started by an older mmdata
    open(f"{out}/manifest.json", "w").write(json.dumps(unfinished))
    r = rerun(build, out)
    assert r.returncode == 2 and "mmdata_version differ" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert len(glob.glob(f"{out}/.mmdata-curate/exact/done/exact_image_*.json")) == 1  # nothing done
    r = rerun(build, out, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert files(out) == files(reference)


def test_semantic_task_marker_of_other_clusters_is_redone(build, reference, tmp_path):
    """A cluster task's marker names its clusters and centres (the grouping depends on the worker
    count): one that names others, with a result that would remove a unique sample, is done again."""
    out = str(tmp_path / "c")
    run_and_kill(build, out, "cluster:1")
    folder = f"{out}/.mmdata-curate/semantic_pair"
    mark = json.load(open(f"{folder}/done/cluster_00000.json"))
    mark.update(clusters=[c + 1000 for c in mark["clusters"]], duplicates=1)
    open(f"{folder}/done/cluster_00000.json", "w").write(json.dumps(mark))
    np.save(f"{folder}/result_00000.npy", np.asarray([[1], [0], np.asarray([1.0]).view(np.int64)], dtype=np.int64))
    r = rerun(build, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert files(out) == files(reference)
