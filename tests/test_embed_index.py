"""Embeddings in the build, the FAISS index at finalize, and `mmdata search` (tiny open_clip model,
random weights, through the real loading code)."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import run_build

from mmdata.search import Retriever

TINY = dict(model="mmdata-tiny", pretrained="random", embed_batch_size=8)
MMDATA = [sys.executable, "-m", "mmdata"]


@pytest.fixture(scope="module")
def embedded(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb")
    manifest = run_build(corpus[0], out, workers=2, fused="mean", embed_in_shards=True, **TINY)
    return str(out), manifest


def written(out):
    return [r for f in sorted(glob.glob(f"{out}/shards/*.parquet")) for r in pq.read_table(f).to_pylist()
            if r["status"] == "written"]


def test_embedding_files_align_with_written_rows(embedded):
    out, manifest = embedded
    assert manifest["embeddings"]["modalities"] == ["image", "text", "fused"]
    enc = manifest["embeddings"]["encoder"]
    assert enc["model"] == "mmdata-tiny" and enc["weights"] == "random" and enc["embed_dim"] == manifest["embeddings"]["dim"]
    sizes = json.load(open(f"{out}/shards/sizes.json"))
    for modality in ("image", "text", "fused"):
        for tar, n in sizes.items():
            arr = np.load(f"{out}/embeddings/{modality}/{tar[:-4]}.npy")
            assert arr.dtype == np.float16 and arr.shape == (n, enc["embed_dim"])
            if n:
                assert np.allclose(np.linalg.norm(arr.astype(np.float32), axis=1), 1, atol=2e-3)


def test_embeddings_in_shards_match_the_npy_files(embedded):
    out, _ = embedded
    arr = np.load(f"{out}/embeddings/image/00000.npy")
    samples = list(wds.WebDataset(f"{out}/shards/00000.tar", shardshuffle=False).decode())
    assert len(samples) == len(arr)
    for i, s in enumerate(samples):
        assert np.array_equal(s["image_emb.npy"], arr[i])


def test_index_files_and_ids(embedded):
    out, manifest = embedded
    infos = json.load(open(f"{out}/index/index_infos.json"))
    assert set(infos) == {"image", "text", "fused"}
    ids = pq.read_table(f"{out}/index/ids.parquet").to_pylist()
    rows = written(out)
    assert sorted(r["id"] for r in ids) == sorted(r["id"] for r in rows)
    assert all(os.path.exists(f"{out}/index/{m}.index") for m in infos)
    assert infos["image"]["recall_at_1"] == 1.0  # small corpus → exact index


def test_each_image_finds_itself_first(embedded):
    out, _ = embedded
    r = Retriever(out)
    for row in written(out):
        own = r.embedding_of(row["key"])
        first = r.search_embedding(own, k=1)[0]
        # first is itself, or a copy of its photo (the corpus holds the cat photo also rotated by
        # EXIF and re-encoded: its stored embedding is the same to 1e-4)
        copy = float(np.dot(r.embedding_of(first.key), own))
        assert first.key == row["key"] or copy >= 0.9999, (row["key"], first, copy)
        assert first.score == pytest.approx(1.0, abs=2e-3)


def test_search_cli_text_key_image_json(embedded, corpus):
    out, _ = embedded
    res = subprocess.run(MMDATA + ["search", out, "--text", "a cat", "-k", "3", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    hits = [json.loads(l) for l in res.stdout.splitlines()]
    assert len(hits) == 3 and [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    res = subprocess.run(MMDATA + ["search", out, "--key", "space_moon", "-k", "4"], capture_output=True, text=True)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 4 and "space_moon " not in res.stdout
    img = [p for p in glob.glob(f"{corpus[0]}/space/moon.*") if not p.endswith(".txt")][0]
    res = subprocess.run(MMDATA + ["search", out, "--image", img, "-k", "1", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    emb = np.load(f"{out}/embeddings/text/00000.npy")[0]
    np.save(f"{out}/q.npy", emb)
    res = subprocess.run(MMDATA + ["search", out, "--embedding", f"{out}/q.npy", "--modality", "text", "-k", "1", "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["row"] == 0


@pytest.mark.parametrize("args,fragment", [
    (["--key", "no_such_key"], "unknown key"),
    (["--image", "/nonexistent.jpg"], "cannot read query image"),
    (["--text", "x", "--modality", "audio"], "not indexed"),
    (["--text", "x", "--model", "ViT-B-32"], "built with mmdata-tiny"),
    (["--text", "x", "--key", "y"], "exactly one"),
])
def test_search_bad_queries_exit_2(embedded, args, fragment):
    out, _ = embedded
    res = subprocess.run(MMDATA + ["search", out] + args, capture_output=True, text=True)
    assert res.returncode == 2 and fragment in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_search_an_unindexed_output_exits_2(built):
    out, _ = built
    res = subprocess.run(MMDATA + ["search", out, "--text", "x"], capture_output=True, text=True)
    assert res.returncode == 2 and "no index" in res.stderr


def test_deterministic_embeddings_and_results(corpus, embedded, tmp_path):
    out, _ = embedded
    run_build(corpus[0], tmp_path / "again", workers=1, fused="mean", embed_in_shards=True, **TINY)
    for f in sorted(glob.glob(f"{out}/embeddings/*/*.npy")):
        rel = os.path.relpath(f, out)
        assert open(f, "rb").read() == open(tmp_path / "again" / rel, "rb").read(), rel
    a, b = Retriever(out), Retriever(str(tmp_path / "again"))
    assert [h.to_dict() for h in a.search_text("a rocket", k=5)] == [h.to_dict() for h in b.search_text("a rocket", k=5)]


def test_checkpoint_path_loads_the_same_weights(corpus, embedded, tmp_path):
    import torch

    from mmdata.encoders.clip import ClipEncoder

    enc = ClipEncoder(model="mmdata-tiny", pretrained=None, seed=0)
    enc.setup()
    ckpt = tmp_path / "tiny.pt"
    torch.save(enc._loaded.model.state_dict(), ckpt)
    out = tmp_path / "ckpt"
    manifest = run_build(corpus[0], out, workers=1, model="mmdata-tiny", pretrained=str(ckpt), embed_batch_size=8)
    assert manifest["embeddings"]["encoder"]["checkpoint_sha256"]
    ref, _ = embedded
    assert np.array_equal(np.load(out / "embeddings" / "image" / "00000.npy"), np.load(f"{ref}/embeddings/image/00000.npy"))
    ckpt.write_bytes(b"garbage")
    res = subprocess.run(MMDATA + ["search", str(out), "--text", "x"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr


def test_ids_survive_a_rebuild_with_extra_files(corpus, embedded, tmp_path):
    out, _ = embedded
    grown = tmp_path / "grown"
    shutil.copytree(corpus[0], grown)
    (grown / "zz_new").mkdir()
    shutil.copy([p for p in glob.glob(f"{corpus[0]}/space/moon.*") if not p.endswith(".txt")][0], grown / "zz_new" / "moon.jpg")
    (grown / "zz_new" / "moon.txt").write_text("another moon")
    (grown / "aa_first.txt").write_text("a caption sorted first")
    run_build(grown, tmp_path / "o2", workers=1, **TINY)
    before = {r["key"]: r["id"] for r in pq.read_table(f"{out}/index/ids.parquet").to_pylist()}
    after = {r["key"]: r["id"] for r in pq.read_table(tmp_path / "o2" / "index" / "ids.parquet").to_pylist()}
    assert set(before) < set(after)
    assert all(after[k] == v for k, v in before.items())


def test_reembed_with_another_model(corpus, tmp_path):
    out = tmp_path / "o"
    run_build(corpus[0], out, workers=1, **TINY)
    first = np.load(out / "embeddings" / "image" / "00000.npy")
    first_text = np.load(out / "embeddings" / "text" / "00000.npy")
    res = subprocess.run(MMDATA + ["embed", str(out), "--model", "mmdata-tiny", "--pretrained", "random"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    again = np.load(out / "embeddings" / "image" / "00000.npy").astype(np.float32)
    # the build embeds the image before JPEG encoding; `embed` decodes the stored JPEG: close, not equal
    assert np.all(np.sum(first.astype(np.float32) * again, axis=1) > 0.99)
    assert np.array_equal(first_text, np.load(out / "embeddings" / "text" / "00000.npy"))  # captions are stored as they were
    from mmdata.tools.reembed import reembed

    manifest = reembed(str(out), model="mmdata-tiny", pretrained="random", model_seed=1)
    assert manifest["embeddings"]["encoder"]["seed"] == 1
    assert not np.array_equal(first, np.load(out / "embeddings" / "image" / "00000.npy"))
    assert Retriever(str(out)).search_text("a cat", k=2)
    # without an index, the old model's index does not linger beside the new embeddings
    manifest = reembed(str(out), model="mmdata-tiny", pretrained="random", model_seed=2, index=False)
    assert not (out / "index").exists() and "index" not in manifest


def test_reembed_refuses_in_shard_copies(embedded, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(embedded[0], out)  # built with --embed-in-shards
    res = subprocess.run(MMDATA + ["embed", str(out), "--model", "mmdata-tiny", "--pretrained", "random"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--embed-in-shards" in res.stderr and "Traceback" not in res.stderr


def test_forced_index_key_and_its_errors(corpus, embedded, tmp_path):
    """``index_key`` forces the faiss type; one that cannot work is one clear error. index_key is not part of
    the config hash, so these re-runs skip every committed unit and only rebuild the index."""
    from mmdata.errors import UserError

    out = tmp_path / "o"
    shutil.copytree(embedded[0], out)
    same = dict(workers=1, fused="mean", embed_in_shards=True, **TINY)
    manifest = run_build(corpus[0], out, index_key="HNSW16", **same)
    assert {i["index_key"] for i in manifest["index"].values()} == {"HNSW16"}
    infos = json.load(open(out / "index" / "index_infos.json"))
    assert set(infos["image"]["search_params"]) == {"efSearch"} and not infos["image"].get("distributed")
    row = written(out)[0]
    hits = Retriever(str(out)).search_key(row["key"], k=3)
    assert len(hits) == 3 and row["key"] not in [h.key for h in hits]
    with pytest.raises(UserError, match=r"index_key 'IVF8,PQ5' does not fit the image embeddings \(\d+ vectors of "
                                        r"dim 32\): The dimension of the vector \(d\) should be a multiple"):
        run_build(corpus[0], out, index_key="IVF8,PQ5", **same)
    with pytest.raises(UserError, match=r"index_key 'IVF256,Flat' does not fit .*Number of training points \(\d+\) "
                                        r"should be at least as large as number of clusters \(256\)"):
        run_build(corpus[0], out, index_key="IVF256,Flat", index_distributed="on", **same)
    with pytest.raises(UserError, match="index_distributed 'on' needs an index that merges"):
        run_build(corpus[0], out, index_key="HNSW16", index_distributed="on", **same)


def test_a_bad_index_key_is_one_line_before_the_build(corpus, tmp_path):
    res = subprocess.run(MMDATA + ["build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--model", "mmdata-tiny",
                                   "--pretrained", "random", "--index-key", "IVFx,Flat"], capture_output=True, text=True)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and lines == ["error: bad index_key 'IVFx,Flat': could not parse index string IVFx,Flat"], res.stderr
    assert not glob.glob(f"{tmp_path}/o/shards/*.tar")


def test_distributed_index_on_remote_storage_equals_the_single_process_one(corpus, tmp_path):
    """Parts go through the output's storage (fsspec memory:// here, as s3:// on a cluster), and the merged
    index is the single-process index byte for byte."""
    import fsspec

    forced = dict(workers=1, index_key="IVF4,Flat", **TINY)
    run_build(corpus[0], tmp_path / "single", index_distributed="off", **forced)
    manifest = run_build(corpus[0], "memory://dist-index/out", index_distributed="on", **forced)
    fs = fsspec.filesystem("memory")
    infos = json.loads(fs.cat_file("/dist-index/out/index/index_infos.json"))
    assert all(i["distributed"] and i["n_partials"] >= 2 for i in infos.values()) and set(infos) == {"image", "text"}
    assert sorted(fs.ls("/dist-index/out/index", detail=False)) == [
        f"/dist-index/out/index/{f}" for f in ("ids.parquet", "image.index", "index_infos.json", "text.index")]
    for f in ("ids.parquet", "image.index", "text.index"):
        assert fs.cat_file(f"/dist-index/out/index/{f}") == (tmp_path / "single" / "index" / f).read_bytes(), f
    assert manifest["index"] == json.load(open(tmp_path / "single" / "manifest.json"))["index"]
    fs.rm("/dist-index", recursive=True)
