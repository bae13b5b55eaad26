"""End to end: the demo corpus with its broken files through `mmdata build`, read back by
webdataset and a torch DataLoader; determinism across worker counts and runs."""
import glob
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from conftest import run_build
from PIL import Image

from mmdata.tools.verify import verify_output
from pipelines.demo_corpus import BROKEN


def rows(out):
    return [r for f in sorted(glob.glob(f"{out}/shards/*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_counts_reconcile_with_a_reason_for_every_record(corpus, built):
    _, expected = corpus
    out, manifest = built
    c = manifest["counts"]
    assert c["inputs"] == c["written"] + c["filtered"] + c["failed"]
    assert c["written"] == expected["written"]
    assert manifest["reasons"]["failed"] == expected["failed"]
    assert manifest["reasons"]["filtered"] == expected["filtered"]
    table = rows(out)
    assert len(table) == c["inputs"]
    for r in table:
        assert (r["status"] == "written") == (r["reason"] is None), r
    by_key = {r["key"]: r for r in table}
    for rel, reason in BROKEN.items():
        key = os.path.splitext(rel)[0].replace("/", "_")
        assert by_key[key]["reason"] == reason, (key, by_key[key])
    assert "text_encoding:cp1252" in by_key["odd_latin1_caption"]["warnings"]
    assert verify_output(out) == []


def test_sizes_json_and_manifest(built):
    out, manifest = built
    sizes = json.load(open(f"{out}/shards/sizes.json"))
    assert sum(sizes.values()) == manifest["counts"]["written"]
    assert sorted(sizes) == sorted(os.path.basename(p) for p in glob.glob(f"{out}/shards/*.tar"))
    assert manifest["config_hash"] and manifest["versions"]["pillow"]
    assert os.path.exists(f"{out}/plan.parquet")


def test_webdataset_reads_every_written_sample(built):
    out, manifest = built
    by_key = {r["key"]: r for r in rows(out) if r["status"] == "written"}
    urls = sorted(glob.glob(f"{out}/shards/*.tar"))
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        row = by_key[sample["__key__"]]
        assert sample["jpg"].size == (row["width"], row["height"])
        assert min(sample["jpg"].size) == 256
        assert sample["txt"] == row["caption"]
        assert sample["json"]["id"] == row["id"]
        assert sample["tokens.npy"].dtype == np.int32 and sample["tokens.npy"].shape == (77,)
        seen += 1
    assert seen == manifest["counts"]["written"]


def _to_item(sample):
    return sample["__key__"], torch.tensor(np.asarray(sample["jpg"]).shape), sample["txt"]


def test_torch_dataloader_with_two_workers(built):
    out, manifest = built
    urls = sorted(glob.glob(f"{out}/shards/*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only,
                        workersplitter=wds.split_by_worker).decode("rgb8").map(_to_item)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    by_key = {r["key"]: r for r in rows(out) if r["status"] == "written"}
    keys = []
    for key, shape, caption in loader:
        row = by_key[key]
        assert tuple(shape.tolist()) == (row["height"], row["width"], 3)
        assert caption == row["caption"]
        keys.append(key)
    assert sorted(keys) == sorted(by_key)


def test_exif_orientation_and_modes(built):
    out, _ = built
    by_key = {r["key"]: r for r in rows(out)}
    cat = by_key["odd_rotated_cat"]  # stored 300x451 sideways, displayed 451x300
    assert (cat["orig_width"], cat["orig_height"]) == (451, 300)
    assert cat["width"] > cat["height"]
    for key in ("odd_gray16", "odd_palette", "odd_png_named_jpg"):
        assert by_key[key]["status"] == "written", by_key[key]
    assert by_key["odd_png_named_jpg"]["source_format"] == "PNG"


def _digests(out):
    import hashlib

    files = sorted(glob.glob(f"{out}/shards/*.tar") + glob.glob(f"{out}/shards/*.parquet") + [f"{out}/shards/sizes.json"])
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}


def test_deterministic_across_runs_and_worker_counts(corpus, built, tmp_path):
    out2, _ = built
    run_build(corpus[0], tmp_path / "w1", workers=1, tokenize=True)
    run_build(corpus[0], tmp_path / "w1b", workers=1, tokenize=True)
    assert _digests(tmp_path / "w1") == _digests(out2) == _digests(tmp_path / "w1b")


def test_rerun_is_a_noop_and_overwrite_rebuilds(corpus, tmp_path):
    out = tmp_path / "o"
    run_build(corpus[0], out, workers=1)
    before = {f: os.stat(f).st_mtime_ns for f in glob.glob(f"{out}/shards/*.tar")}
    run_build(corpus[0], out, workers=1)
    assert before == {f: os.stat(f).st_mtime_ns for f in glob.glob(f"{out}/shards/*.tar")}
    run_build(corpus[0], out, workers=1, samples_per_shard=100, overwrite=True)
    assert sorted(os.path.basename(f) for f in glob.glob(f"{out}/shards/*.tar")) == ["00000.tar"]


def test_changed_config_without_overwrite_is_refused(corpus, tmp_path):
    from mmdata.errors import UserError

    run_build(corpus[0], tmp_path / "o", workers=1)
    with pytest.raises(UserError, match="another configuration"):
        run_build(corpus[0], tmp_path / "o", workers=1, image_size=128)


def test_output_inside_input_is_not_read_back(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(src / "red.png")
    (src / "red.txt").write_text("a red square")
    for _ in range(2):
        manifest = run_build(src, src / "out", workers=1, overwrite=True)
        assert manifest["counts"]["inputs"] == 1


def _damage(out, how):
    shards = out / "shards"
    if how == "sizes":
        sizes = json.load(open(shards / "sizes.json"))
        name = next(k for k, v in sizes.items() if v > 0)
        sizes[name] += 1
        (shards / "sizes.json").write_text(json.dumps(sizes))
        return name
    if how == "parquet":
        os.remove(shards / "00001.parquet")
        return "00001.parquet: missing"
    if how == "extra_tar":
        shutil.copy(shards / "00000.tar", shards / "00099.tar")
        return "00099.tar: on disk but not in sizes.json"
    if how == "stats":
        stats = json.load(open(shards / "00000_stats.json"))
        stats["counts"]["written"] += 1
        (shards / "00000_stats.json").write_text(json.dumps(stats))
        return "00000_stats.json counts"
    if how == "truncated_tar":
        data = (shards / "00000.tar").read_bytes()
        (shards / "00000.tar").write_bytes(data[: len(data) // 2])
        return "00000.tar"
    raise AssertionError(how)


@pytest.fixture(scope="module")
def small_build(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "o"
    run_build(corpus[0], out, workers=1)
    assert verify_output(str(out)) == []
    return out


@pytest.mark.parametrize("how", ["sizes", "parquet", "extra_tar", "stats", "truncated_tar"])
def test_verify_detects_a_damaged_output(small_build, tmp_path, how):
    out = tmp_path / "copy"
    shutil.copytree(small_build, out)
    expected = _damage(out, how)
    problems = verify_output(str(out))
    assert any(expected in p for p in problems), problems
    res = subprocess.run([sys.executable, "-m", "mmdata", "verify", str(out)], capture_output=True, text=True)
    assert res.returncode == 1 and expected in res.stdout + res.stderr


def test_written_images_decode(built):
    out, _ = built
    for url in sorted(glob.glob(f"{out}/shards/*.tar"))[:2]:
        for sample in wds.WebDataset(url, shardshuffle=False):
            Image.open(io.BytesIO(sample["jpg"])).load()
