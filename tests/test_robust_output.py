"""Robust outputs (issue 11): --overwrite deletes only mmdata's files, ids are unique across shards,
source files over --max-source-bytes are never read, a resume never mixes plans."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import run_build
from PIL import Image

from mmdata.config import load_config
from mmdata.errors import UserError
from mmdata.pipeline.finalize import finalize
from mmdata.pipeline.plan import load_plan
from mmdata.schema import SHARD_SCHEMA
from mmdata.storage import OutputDir
from mmdata.tools.verify import verify_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "pipelines", "configs", "augment_example.yaml")

MMDATA = [sys.executable, "-m", "mmdata"]


def cli(*args):
    return subprocess.run(MMDATA + list(args), check=False, capture_output=True, text=True)


def one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_overwrite_keeps_files_mmdata_did_not_write(corpus, tmp_path):
    out = tmp_path / "out"
    run_build(corpus[0], out, samples_per_shard=8)
    (out / "shards" / "thesis.tex").write_text("\\documentclass{article}")
    (out / "index").mkdir(exist_ok=True)
    (out / "index" / "notes.md").write_text("# notes")
    (out / "shards" / "99999.tar.tmp-0123456789ab").write_bytes(b"half")  # a killed run's temporary
    stale = out / "shards" / "09999.parquet"  # a shard of an earlier, bigger plan: mmdata's, removed
    stale.write_bytes(b"old")
    res = cli("build", "-i", corpus[0], "-o", str(out), "--samples-per-shard", "16", "--no-progress", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert (out / "shards" / "thesis.tex").read_text() == "\\documentclass{article}"
    assert (out / "index" / "notes.md").read_text() == "# notes"
    assert not stale.exists() and not glob.glob(f"{out}/**/*.tmp-*", recursive=True)
    assert verify_output(str(out)) == []


def test_overwrite_refuses_a_folder_that_is_not_an_mmdata_output(corpus, tmp_path):
    out = tmp_path / "home"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "thesis.tex").write_text("chapter 1")
    (out / "manifest.json").write_text('{"name": "some other tool"}')  # not mmdata's manifest
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    res = cli("build", "-i", corpus[0], "-o", str(out), "--no-progress", "--overwrite")
    one_line_error(res, "not an mmdata output")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (out / "shards" / "thesis.tex").read_text() == "chapter 1"
    empty = tmp_path / "empty"
    os.makedirs(empty / "shards")  # empty folders are not files: building there is fine
    res = cli("build", "-i", corpus[0], "-o", str(empty), "--no-progress", "--overwrite")
    assert res.returncode == 0, res.stderr


def _parquet_rows(path):
    return pq.read_table(path).to_pylist()


def test_verify_and_finalize_catch_an_id_written_in_two_shards(corpus, tmp_path):
    out = tmp_path / "dup"
    run_build(corpus[0], out, samples_per_shard=8)
    assert verify_output(str(out)) == []
    first, second = sorted(glob.glob(f"{out}/shards/*.parquet"))[:2]
    donor = next(r for r in _parquet_rows(first) if r["status"] == "written")
    rows = _parquet_rows(second)
    victim = next(r for r in rows if r["status"] == "written")
    victim["id"] = donor["id"]  # the same sample id in two shards
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), second)
    problems = verify_output(str(out))
    assert len(problems) == 1, problems
    assert all(f in problems[0] for f in (str(donor["id"]), donor["key"], victim["key"], "more than once")), problems
    res = cli("verify", str(out))
    assert res.returncode == 1 and donor["key"] in res.stdout + res.stderr
    with pytest.raises(UserError, match="more than once"):  # finalize of the same units refuses it
        finalize(load_config(input=corpus[0], out=str(out), samples_per_shard=8, progress=False), OutputDir(str(out)),
                 load_plan(OutputDir(str(out)))[0], 1.0)


def test_finalize_count_invariant_is_a_real_check(corpus, tmp_path):
    out = tmp_path / "counts"
    run_build(corpus[0], out, samples_per_shard=8)
    stats_file = Path(min(glob.glob(f"{out}/shards/*_stats.json")))
    stats = json.loads(stats_file.read_text())
    stats["counts"]["inputs"] += 1  # a unit whose ledger does not add up
    stats_file.write_text(json.dumps(stats))
    with pytest.raises(UserError, match="do not reconcile"):
        finalize(load_config(input=corpus[0], out=str(out), samples_per_shard=8, progress=False), OutputDir(str(out)),
                 load_plan(OutputDir(str(out)))[0], 1.0)


def tone(seconds, sr=16000):
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.mark.parametrize("views", [0, 1])
def test_derived_keys_never_meet_a_record_key_in_another_shard(tmp_path, views):
    """cat.wav + cat.srt make segments cat_s0000, cat_s0001; a real cat_s0001.jpg (and cat_s0000_v01.jpg)
    fall in other units with --samples-per-shard 1: every written key and id is still unique."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    sf.write(corpus / "cat.wav", tone(2.0), 16000, subtype="PCM_16")
    (corpus / "cat.srt").write_text("1\n00:00:00,100 --> 00:00:00,900\nmeow\n\n2\n00:00:01,000 --> 00:00:01,900\npurr\n")
    for name in ("cat_s0001", "cat_s0000_v01", "cat_v01"):
        Image.new("RGB", (64, 48), (200, 10, 10)).save(corpus / f"{name}.jpg")
        (corpus / f"{name}.txt").write_text(f"a photo called {name}")
    kw = {"require": ["text"], **({"augment": EXAMPLE, "views": 1} if views else {})}
    out = tmp_path / "out"
    manifest = run_build(corpus, out, samples_per_shard=1, workers=1, **kw)
    rows = [r for f in sorted(glob.glob(f"{out}/shards/*.parquet")) for r in _parquet_rows(f)]
    written = [r for r in rows if r["status"] == "written"]
    assert len({r["key"] for r in written}) == len({r["id"] for r in written}) == len(written) == manifest["counts"]["written"]
    assert {"cat_s0001", "cat_s0000_v01", "cat_v01"} <= {r["key"] for r in written}  # real records keep their keys
    segments = [r for r in written if r["parent_key"] == "cat" and r["view_of"] is None]
    assert len(segments) == 2 and "cat_s0000" in {r["key"] for r in segments}
    assert verify_output(str(out)) == []
    again = tmp_path / "again"  # stable across runs
    run_build(corpus, again, samples_per_shard=1, workers=1, **kw)
    assert sorted(r["key"] for f in glob.glob(f"{again}/shards/*.parquet") for r in _parquet_rows(f)) == \
        sorted(r["key"] for r in rows)


def test_a_source_over_max_source_bytes_fails_without_being_read(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i, side in enumerate((32, 400)):  # the second photo's file is far bigger
        Image.effect_noise((side, side), 64).convert("RGB").save(corpus / f"p{i}.png")
        (corpus / f"p{i}.txt").write_text(f"photo {i}")
    (corpus / "p2.jpg").write_bytes(b"\xff\xd8" + b"\0" * 50_000)  # would fail decode:image if it were read
    (corpus / "p2.txt").write_text("photo 2")
    limit = 20_000
    assert (corpus / "p0.png").stat().st_size < limit < (corpus / "p1.png").stat().st_size
    out = tmp_path / "out"
    res = cli("build", "-i", str(corpus), "-o", str(out), "--max-source-bytes", str(limit), "--no-progress")
    assert res.returncode == 0, res.stderr
    rows = {r["key"]: r for f in glob.glob(f"{out}/shards/*.parquet") for r in _parquet_rows(f)}
    assert rows["p0"]["status"] == "written"
    for key in ("p1", "p2"):
        assert (rows[key]["status"], rows[key]["reason"]) == ("failed", "too_large:source"), rows[key]
        assert rows[key]["image_sha256"] is None  # the image was never read: only its caption's bytes count
        assert rows[key]["source_bytes"] == (corpus / f"{key}.txt").stat().st_size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reasons"]["failed"] == {"too_large:source": 2} and manifest["config"]["max_source_bytes"] == limit
    assert verify_output(str(out)) == []
    res = cli("build", "-i", str(corpus), "-o", str(tmp_path / "bad"), "--max-source-bytes", "0", "--no-progress")
    one_line_error(res, "max_source_bytes")


def test_index_temporaries_are_unique_and_leave_nothing_behind(tmp_path):
    import faiss

    from mmdata.index.backend import write_index_atomic

    path = str(tmp_path / "index" / "image.index")
    os.makedirs(os.path.dirname(path))
    stale = f"{path}.tmp-{os.getpid()}"  # a killed run's leftover under this pid (pids repeat in containers)
    os.makedirs(stale)
    index = faiss.IndexFlatIP(8)
    index.add(np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32))
    size = write_index_atomic(faiss, index, path)
    assert size == os.path.getsize(path) and faiss.read_index(path).ntotal == 5
    assert os.path.isdir(stale) and sorted(os.listdir(os.path.dirname(path))) == sorted(
        [os.path.basename(path), os.path.basename(stale)])


class _Payload:
    """An arbitrary object a checkpoint must not be able to smuggle in."""


def test_torch_load_refuses_pickled_objects_by_default(tmp_path):
    """setup.py requires torch>=2.6: torch.load defaults to weights_only, so --pretrained PATH cannot run code."""
    import pickle

    import torch
    from packaging.requirements import Requirement

    reqs = Path(ROOT, "setup.py").read_text()
    torch_req = next(Requirement(line.split('"')[1]) for line in reqs.splitlines() if line.strip().startswith('"torch>='))
    assert "2.5.1" not in torch_req.specifier and "2.6.0" in torch_req.specifier
    assert torch.__version__.split("+")[0] in torch_req.specifier
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload()}, ckpt)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt)
    assert torch.equal(torch.load(ckpt, weights_only=False)["state_dict"]["w"], torch.zeros(2))


def _photo(corpus, key):
    Image.new("RGB", (40, 30), (len(key) * 20 % 256, 90, 30)).save(corpus / f"{key}.jpg")
    (corpus / f"{key}.txt").write_text(f"photo {key}")


def test_a_resume_never_mixes_plans(tmp_path):
    """plan.parquet deleted, three records added, re-run: committed units of the old plan are rebuilt,
    every record is written exactly once."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i in range(9):  # three full units: on main the re-run skipped them and wrote m6..m8 twice
        _photo(corpus, f"m{i}")
    out = tmp_path / "out"
    args = ("build", "-i", str(corpus), "-o", str(out), "--samples-per-shard", "3", "--no-progress", "--workers", "1")
    assert cli(*args).returncode == 0
    (out / "plan.parquet").unlink()
    (out / "manifest.json").unlink()
    for key in ("m2a", "m2b", "m2c"):  # sorted among the old keys: every later unit shifts
        _photo(corpus, key)
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    keys = [r["key"] for f in sorted(glob.glob(f"{out}/shards/*.parquet")) for r in _parquet_rows(f)
            if r["status"] == "written"]
    assert sorted(keys) == sorted([f"m{i}" for i in range(9)] + ["m2a", "m2b", "m2c"])
    assert verify_output(str(out)) == []
    assert json.loads((out / "manifest.json").read_text())["counts"]["written"] == 12
    before = {f: os.path.getmtime(f) for f in glob.glob(f"{out}/shards/*.tar")}
    assert cli(*args).returncode == 0  # an unchanged plan resumes: nothing is rebuilt
    assert {f: os.path.getmtime(f) for f in glob.glob(f"{out}/shards/*.tar")} == before
    assert len(json.loads((out / "shards" / "00000_stats.json").read_text())["plan_digest"]) == 32
