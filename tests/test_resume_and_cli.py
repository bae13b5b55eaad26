"""Resume after a real SIGKILL, and the CLI's contract: one line and exit 2 for user errors."""
import glob
import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow.parquet as pq
import pytest
from conftest import run_build

from mmdata.tools.verify import verify_output

MMDATA = [sys.executable, "-m", "mmdata"]


def digests(out):
    files = sorted(glob.glob(f"{out}/shards/*.tar") + glob.glob(f"{out}/shards/*.parquet") + [f"{out}/shards/sizes.json"])
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}


def test_sigkill_mid_run_then_resume_is_identical(big_corpus, tmp_path):
    out = tmp_path / "killed"
    args = ["build", "-i", big_corpus, "-o", str(out), "--workers", "1", "--samples-per-shard", "2", "--no-progress"]
    proc = subprocess.Popen(MMDATA + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(glob.glob(f"{out}/shards/*_stats.json")) < 4:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(glob.glob(f"{out}/shards/*_stats.json"))
    n_units = len(set(pq.read_table(out / "plan.parquet").column("unit").to_pylist()))
    assert 4 <= committed < n_units, f"the kill must land mid-run ({committed} of {n_units} units committed)"
    for tar in glob.glob(f"{out}/shards/*.tar"):  # whatever carries a final name is whole
        with tarfile.open(tar) as t:
            t.getmembers()
    assert not os.path.exists(out / "manifest.json")
    done = subprocess.run(MMDATA + args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert verify_output(str(out)) == []
    assert not glob.glob(f"{out}/**/*.tmp-*", recursive=True)
    run_build(big_corpus, tmp_path / "clean", workers=1, samples_per_shard=2)
    assert digests(out) == digests(tmp_path / "clean")


def cli(*args, cwd=None):
    return subprocess.run(MMDATA + list(args), capture_output=True, text=True, cwd=cwd)


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_missing_input(tmp_path):
    assert_one_line_error(cli("build", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o")), "does not exist")
    assert not (tmp_path / "o").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("build", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o")), "no records")


def test_unwritable_output(tmp_path, corpus):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(cli("build", "-i", corpus[0], "-o", str(blocker / "out")), "not writable")


def test_bad_config_names_the_field(tmp_path, corpus):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("image_size: -3\nresize_mode: stretch\n")
    res = cli("build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--config", str(cfg))
    assert_one_line_error(res, "image_size", "resize_mode")
    cfg.write_text("imagesize: 3\n")
    assert_one_line_error(cli("build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--config", str(cfg)), "imagesize")


def test_config_file_and_flag_precedence(tmp_path, corpus):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("image-size: 64\nsamples_per_shard: 100\nresize_mode: center_crop\n")
    res = cli("build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--config", str(cfg), "--image-size", "32",
              "--workers", "1", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "written" in res.stdout and str(tmp_path / "o") in res.stdout
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "o" / "shards" / "00000.parquet").to_pylist()
    sizes = {(r["width"], r["height"]) for r in table if r["status"] == "written"}
    assert sizes == {(32, 32)}


def test_inspect_and_verify_commands(built, tmp_path):
    out, _ = built
    res = cli("inspect", f"{out}/shards/00000.tar")
    assert res.returncode == 0 and "samples" in res.stdout and "jpg:" in res.stdout
    assert cli("verify", out).returncode == 0
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    assert_one_line_error(cli("inspect", str(junk)), "not a readable tar")


@pytest.mark.parametrize("args,fragment", [
    (["--model", "ViT-B-32"], "HF_HUB_OFFLINE"),                       # a tag whose weights are not cached
    (["--model", "ViT-B-32", "--pretrained", "/no/such/ckpt.pt"], "not found"),
    (["--model", "ViT-B-99"], "unknown model"),
])
def test_a_model_that_cannot_load_fails_before_planning(corpus, tmp_path, args, fragment):
    out = tmp_path / "o"
    res = subprocess.run(MMDATA + ["build", "-i", corpus[0], "-o", str(out), "--no-progress", *args],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(res, fragment)
    assert not (out / "plan.parquet").exists()  # nothing was planned or run
