"""`mmdata embed` is atomic and resumable, and embeddings never mix encoder set-ups (issue 11).

The tiny open_clip model with random weights; a real SIGKILL of the `mmdata embed` process at
chosen points (``MMDATA_TEST_EMBED_PAUSE`` makes it print a line and sleep after each staged unit
and each switch step, and the test kills it there)."""
import glob
import json
import os
import shutil
import sys

import pytest
from conftest import kill_at_line, run_build
from typer.testing import CliRunner

from mmdata.cli.main import app
from mmdata.config import RUNTIME_FIELDS
from mmdata.errors import UserError
from mmdata.layout import clear_output
from mmdata.tools.reembed import EmbedTask, embed_unit, reembed
from mmdata.storage import OutputDir
from mmdata.tools.verify import verify_report

TINY = dict(model="mmdata-tiny", pretrained="random", embed_batch_size=8)
NEW = dict(model="mmdata-tiny", pretrained="random", model_seed=1)  # the model `mmdata embed` switches to
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """The demo corpus built with the tiny model (seed 0, torch_threads 1): 5 units."""
    out = tmp_path_factory.mktemp("emb_base") / "o"
    run_build(corpus[0], out, workers=1, **TINY)
    return str(out)


def snapshot(out: str) -> dict:
    """What an embed generation consists of: embedding files, indexes, ids, and the facts recorded
    in the manifest and the units' stats (not the timings)."""
    snap = {}
    for pattern in ("embeddings/*/*.npy", "index/*.index", "index/ids.parquet"):
        for path in sorted(glob.glob(os.path.join(out, pattern))):
            snap[os.path.relpath(path, out)] = open(path, "rb").read()
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    snap["manifest"] = {k: manifest.get(k) for k in ("config_hash", "embeddings", "index", "counts")}
    snap["config"] = {k: v for k, v in manifest["config"].items() if k not in RUNTIME_FIELDS}  # not out, engine…
    for path in sorted(glob.glob(os.path.join(out, "shards", "*_stats.json"))):
        stats = json.load(open(path))
        snap[os.path.basename(path)] = {k: stats.get(k) for k in ("config_hash", "encoder", "embeddings", "counts")}
    return snap


def copy(base: str, tmp_path, name: str = "o") -> str:
    out = str(tmp_path / name)
    shutil.copytree(base, out)
    return out


def assert_sound(out: str) -> None:
    problems, _ = verify_report(out)
    assert problems == []


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """An uninterrupted `mmdata embed` of the base output with the new model (local engine)."""
    out = copy(base, tmp_path_factory.mktemp("emb_ref"))
    manifest = reembed(out, workers=1, progress=False, **NEW)
    assert manifest["embeddings"]["encoder"]["seed"] == 1
    assert not os.path.exists(os.path.join(out, ".mmdata-embed"))
    assert_sound(out)
    return snapshot(out)


def run_and_kill(out: str, point: str, count: int = 1) -> list[str]:
    """Start `mmdata embed OUT` (new model); SIGKILL it when it passes ``point`` the ``count``-th time
    (where it then sleeps)."""
    env = dict(os.environ, MMDATA_TEST_EMBED_PAUSE=f"{point}:{count}", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    return kill_at_line([sys.executable, "-m", "mmdata", "embed", out, "--model", "mmdata-tiny", "--pretrained",
                         "random", "--model-seed", "1", "--workers", "1"], env, f"mmdata-embed-pause {point}:{count}")


def test_killed_while_staging_keeps_the_old_generation_and_resumes(base, reference, tmp_path):
    old = snapshot(base)
    out = copy(base, tmp_path)
    run_and_kill(out, "unit", count=2)  # two of five units staged
    staged = sorted(glob.glob(os.path.join(out, ".mmdata-embed", "*", "units", "*.json")))
    assert [os.path.basename(p) for p in staged] == ["00000.json", "00001.json"]
    # the output is the old generation, whole: old model in the manifest, old vectors, old index
    assert snapshot(out) == old
    assert_sound(out)
    # a staged unit is not embedded again on resume (same model, set-up and shard)
    before = os.stat(staged[0]).st_mtime_ns
    stage = os.path.relpath(os.path.dirname(os.path.dirname(staged[0])), out)
    config = _config(out, **NEW)
    assert embed_unit(EmbedTask(out, stage, config, "00000"))["unit"] == "00000"
    assert os.stat(staged[0]).st_mtime_ns == before
    # a resume with another torch thread count refuses, in one line naming the difference
    res = CliRunner().invoke(app, ["embed", out, "--model", "mmdata-tiny", "--pretrained", "random",
                                   "--model-seed", "1", "--workers", "1", "--torch-threads", "2"])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "torch_threads: 1 → 2" in errors[0] and "--reembed-mismatched" in errors[0]
    assert snapshot(out) == old  # refused before touching anything
    # the re-run finishes it: the same bytes as an uninterrupted run
    reembed(out, workers=1, progress=False, **NEW)
    assert snapshot(out) == reference
    assert not os.path.exists(os.path.join(out, ".mmdata-embed"))
    assert_sound(out)


@pytest.mark.parametrize("point,count", [("commit", 1), ("switch", 1), ("switch", 2)])
def test_killed_after_the_commit_point_rolls_forward(base, reference, tmp_path, point, count):
    """Killed once SWITCH.json is written (before or between the switch's renames): the next mmdata
    command that opens the output (here verify) finishes the switch; the output is the new generation."""
    out = copy(base, tmp_path)
    run_and_kill(out, point, count)
    assert glob.glob(os.path.join(out, ".mmdata-embed", "*", "SWITCH.json"))
    if point == "commit":  # a training loader never reads a half-switched output: it refuses in one line
        from mmdata.errors import UserError
        from mmdata.loader import make_loader

        with pytest.raises(UserError, match="switch is committed but unfinished"):
            make_loader(out)
    assert_sound(out)  # finishes the switch first
    assert not os.path.exists(os.path.join(out, ".mmdata-embed"))
    assert snapshot(out) == reference


def _config(out: str, **kw):
    from mmdata.config import BuildConfig

    manifest = json.load(open(os.path.join(out, "manifest.json")))
    return BuildConfig(**{**manifest["config"], "out": out, "workers": 1, **kw})


def test_staged_units_of_another_set_up_refuse_or_are_reembedded(base, tmp_path):
    out = copy(base, tmp_path)
    config = _config(out, **NEW)  # torch_threads 1
    stage = f".mmdata-embed/{config.config_hash}"
    for name in ("00000", "00001"):  # what a run killed after two units leaves
        embed_unit(EmbedTask(out, stage, config, name))
    other = shutil.copytree(out, tmp_path / "other")  # --overwrite removes a staging with the rest of the output
    clear_output(OutputDir(str(other)))
    assert os.listdir(other) == []
    with pytest.raises(UserError, match="2 of 2 staged units .*torch_threads: 1 → 2"):
        reembed(out, workers=1, progress=False, torch_threads=2, **NEW)
    manifest = reembed(out, workers=1, progress=False, torch_threads=2, reembed_mismatched=True, **NEW)
    assert manifest["embeddings"]["encoder"]["torch_threads"] == 2
    for path in glob.glob(os.path.join(out, "shards", "*_stats.json")):
        assert json.load(open(path))["encoder"]["torch_threads"] == 2  # every unit, none of the staged ones left
    assert_sound(out)


def test_build_resume_with_another_set_up_refuses_or_reembeds(base, corpus, tmp_path):
    out = copy(base, tmp_path)
    facts = json.load(open(os.path.join(out, "manifest.json")))["embeddings"]["encoder"]
    assert (facts["device"], facts["precision"], facts["torch_threads"]) == ("cpu", "fp32", 1)
    res = CliRunner().invoke(app, ["build", "-i", corpus[0], "-o", out, "--workers", "1", "--samples-per-shard", "8",
                                   "--model", "mmdata-tiny", "--pretrained", "random", "--embed-batch-size", "8",
                                   "--torch-threads", "3", "--no-progress"])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "5 of 5 committed units" in errors[0] and "torch_threads: 1 → 3" in errors[0]
    manifest = run_build(corpus[0], out, workers=1, torch_threads=3, reembed_mismatched=True, **TINY)
    assert manifest["run"]["units_built"] == 5 and manifest["embeddings"]["encoder"]["torch_threads"] == 3
    assert_sound(out)
    manifest = run_build(corpus[0], out, workers=1, torch_threads=3, **TINY)  # now the same set-up: a no-op resume
    assert manifest["run"]["units_skipped"] == 5


def test_embed_on_dask_gives_the_bytes_of_local(base, reference, tmp_path):
    pytest.importorskip("distributed")
    out = copy(base, tmp_path)
    reembed(out, engine="dask", workers=2, progress=False, **NEW)
    assert snapshot(out) == reference


def test_embed_bad_inputs(tmp_path, base):
    with pytest.raises(UserError, match="not a finished build"):
        reembed(str(tmp_path), **NEW)
    out = copy(base, tmp_path)
    with pytest.raises(UserError, match="torch_threads"):
        reembed(out, torch_threads=0, **NEW)
    assert snapshot(out) == snapshot(base)
