"""Robust outputs (issue 11): --overwrite deletes only mmdata's files, ids are unique across shards,
source files over --max-source-bytes are never read, a resume never mixes plans."""
import glob
import os
import subprocess
import sys

from conftest import run_build

from mmdata.verify import verify_output

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
