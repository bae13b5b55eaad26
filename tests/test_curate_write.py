"""The write task of a curated shard: its memory follows the shard (its own table and kept samples)
and one input shard at a time, not the input rows it spans; it writes the same bytes from its plan
whatever order the input shards come in; a kept sample without members fails the task, not the shard's bytes.

With 95 % exact duplicates a curated shard of ``UNIQUE`` kept samples spans 20 times as many input
rows. The plan of that shard is recovered from the curated table (input shard and row of each key),
and the task re-run from it in a fresh process that prints its own peak RSS (VmHWM)."""
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_build
from PIL import Image

from mmdata.curate import curate, load_curate_config
from mmdata.curate.features import read_members
from mmdata.curate.write import PLAN_SCHEMA, WriteTask, run_write_task
from mmdata.writers.tar import write_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, UNIQUE = 20_000, 1_000
CHILD = """
import json, sys
from mmdata.curate.write import WriteTask, run_write_task
run_write_task(WriteTask(*sys.argv[1:5], json.loads(sys.argv[5]), sys.argv[6]))
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.fixture(scope="module")
def duplicated(tmp_path_factory):
    """A build of ROWS samples with distinct keys over UNIQUE tiny images (each stored 20 times), and
    its curation (exact image dedup only) into one shard of the UNIQUE kept samples."""
    root = tmp_path_factory.mktemp("dup_in")
    rng = np.random.default_rng(0)
    for i in range(UNIQUE):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    pq.write_table(pa.table({"key": [f"k{i:06d}" for i in range(ROWS)],
                             "image": [str(root / f"{i % UNIQUE}.png") for i in range(ROWS)],
                             "caption": [f"sample number {i}" for i in range(ROWS)]}), root / "m.parquet")
    build = str(tmp_path_factory.mktemp("dup_build"))
    run_build(root / "m.parquet", build, workers=2, key_col="key", samples_per_shard=5000, image_size=16, report=False)
    curated = str(tmp_path_factory.mktemp("dup_curated") / "c")
    manifest = curate(build, curated, load_curate_config(workers=1, samples_per_shard=UNIQUE, exact=["image"],
                                                          phash_max_distance=-1))
    assert manifest["shards"] == ["00000.tar"] and manifest["counts"]["written"] == UNIQUE
    return build, curated, manifest["curate"]["config_hash"]


def where(build):
    """key → (input shard, row) over the build's tables."""
    found = {}
    for path in sorted(glob.glob(f"{build}/shards/*.parquet")):
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        found.update((k, (os.path.basename(path)[: -len(".parquet")], i)) for i, k in enumerate(keys))
    return found


def save_plan(out, name, table, located):
    """The plan of a curated table's rows, as the curation writes it."""
    keys = table.column("key").to_pylist()
    columns = {"in_shard": [located[k][0] for k in keys], "in_pos": [located[k][1] for k in keys]}
    columns.update({f.name: table.column(f.name) for f in PLAN_SCHEMA if f.name not in columns})
    os.makedirs(f"{out}/scratch/units", exist_ok=True)
    pq.write_table(pa.table(columns, schema=PLAN_SCHEMA), f"{out}/scratch/units/{name}.parquet")


def peak_of_write(build, out, config_hash):
    r = subprocess.run([sys.executable, "-c", CHILD, build, out, "scratch", "00000", "[]", config_hash], check=False,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.split()[-1])


def test_memory_follows_the_shard_not_the_input_rows_it_spans(duplicated, tmp_path):
    build, curated, config_hash = duplicated
    table = pq.read_table(f"{curated}/shards/00000.parquet")
    assert table.num_rows == ROWS  # the one shard spans every input row
    located = where(build)
    save_plan(tmp_path / "all", "00000", table, located)
    save_plan(tmp_path / "few", "00000", table.slice(0, 50), located)
    big, small = peak_of_write(build, str(tmp_path / "all"), config_hash), peak_of_write(build, str(tmp_path / "few"), config_hash)
    for rel in ("shards/00000.tar", "shards/00000.parquet", "shards/00000_stats.json"):  # the same bytes as the curation's
        assert (tmp_path / "all" / rel).read_bytes() == Path(curated, rel).read_bytes(), rel
    # holding every spanned input row as Python rows costs ~9 KB a row (~180 MiB here); the shard's
    # own table as Arrow columns, read one input shard at a time, about 55 MiB
    print(f"write task peak {big / 2**20:.0f} MiB for {ROWS} rows, {small / 2**20:.0f} MiB for 50")
    assert big - small < 100 * 2**20, f"peak {big / 2**20:.0f} MiB for {ROWS} rows vs {small / 2**20:.0f} MiB for 50"


def test_interleaved_input_shards_are_written_in_plan_order(duplicated, tmp_path):
    """Input shards need not come one after the other: rows alternate between two here."""
    build, _, config_hash = duplicated
    tables = {s: pq.read_table(f"{build}/shards/{s}.parquet").to_pylist() for s in ("00000", "00001")}
    picks = [(s, i) for i in range(0, 40, 4) for s in ("00001", "00000")]  # 00001 first: not sorted by shard
    status = ["written" if j % 3 else "filtered" for j in range(len(picks))]
    plan = {"in_shard": [s for s, _ in picks], "in_pos": [i for _, i in picks], "status": status,
            "reason": [None if s == "written" else "filter:test" for s in status]}
    plan.update({f.name: [None] * len(picks) for f in PLAN_SCHEMA if f.name not in plan})
    plan["words"] = list(range(len(picks)))
    os.makedirs(tmp_path / "scratch/units")
    pq.write_table(pa.table(plan, schema=PLAN_SCHEMA), tmp_path / "scratch/units/00007.parquet")
    stats = run_write_task(WriteTask(build, str(tmp_path), "scratch", "00007", [], config_hash))
    out = pq.read_table(tmp_path / "shards/00007.parquet").to_pylist()
    assert [r["key"] for r in out] == [tables[s][i]["key"] for s, i in picks]
    assert [r["status"] for r in out] == status and [r["words"] for r in out] == plan["words"]
    assert [r["caption"] for r in out] == [tables[s][i]["caption"] for s, i in picks]
    kept = [tables[s][i]["key"] for (s, i), st in zip(picks, status) if st == "written"]
    assert [r["row"] for r in out if r["status"] == "written"] == list(range(len(kept)))
    assert all(r["row"] is None for r in out if r["status"] != "written")
    members = read_members((tmp_path / "shards/00007.tar").read_bytes())
    assert list(members) == kept
    sources = {s: read_members(Path(build, "shards", f"{s}.tar").read_bytes()) for s in tables}
    assert all(members[tables[s][i]["key"]] == sources[s][tables[s][i]["key"]] for (s, i), st in zip(picks, status) if st == "written")
    assert stats["counts"] == {"records": 20, "inputs": 20, "written": len(kept), "filtered": 20 - len(kept), "failed": 0}
    assert stats["reasons"] == {"filtered": {"filter:test": 20 - len(kept)}, "failed": {}}
    assert json.loads((tmp_path / "shards/00007_stats.json").read_bytes()) == stats


def test_a_kept_sample_without_members_fails_the_task(duplicated, tmp_path):
    build, _, config_hash = duplicated
    broken = tmp_path / "build"
    os.makedirs(broken / "shards")
    shutil.copy(f"{build}/shards/00000.parquet", broken / "shards")
    samples = read_members(Path(build, "shards/00000.tar").read_bytes())
    gone = pq.read_table(f"{build}/shards/00000.parquet").column("key")[3].as_py()
    with open(broken / "shards/00000.tar", "wb") as fh:
        write_tar(fh, [(k, m) for k, m in samples.items() if k != gone])
    plan = {"in_shard": ["00000"] * 5, "in_pos": list(range(5)), "status": ["written"] * 5, "reason": [None] * 5}
    plan.update({f.name: [None] * 5 for f in PLAN_SCHEMA if f.name not in plan})
    os.makedirs(tmp_path / "out/scratch/units")
    pq.write_table(pa.table(plan, schema=PLAN_SCHEMA), tmp_path / "out/scratch/units/00000.parquet")
    with pytest.raises(KeyError, match=gone):
        run_write_task(WriteTask(str(broken), str(tmp_path / "out"), "scratch", "00000", [], config_hash))
    assert not glob.glob(str(tmp_path / "out/shards/*"))  # nothing half-written
    assert not os.path.exists(tmp_path / "out/scratch/done")
