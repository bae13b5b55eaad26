"""Issue 16 (the first hour of a new user): every config field is a flag, offline model errors,
the max_pixels detail, the demo's closing hints."""
import subprocess
import sys

import pyarrow.parquet as pq

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
