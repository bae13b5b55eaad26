"""The external sort of the plan (issue 12, planning at any size): with key ranges forced tiny, every
awkward input (repeats, names that sanitise alike, names that look like repeats or derived keys,
unicode, empty and over-long names, a folder) plans to the same plan.parquet, byte for byte, as the
in-memory sort; ranges whose keys reach across a splitter are merged."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_plan_scale import png, tricky_rows, write

from mmdata.config import load_config
from mmdata.errors import UserError
from mmdata.pipeline import plan, plan_sort
from mmdata.storage import OutputDir


def plan_bytes(config):
    out = OutputDir(config.out)
    out.ensure_writable()
    units = plan.save_plan(out, config)
    return out.read_bytes("plan.parquet"), units


def both_ways(monkeypatch, config, range_rows):
    """plan.parquet planned in memory, then by the external sort with ranges of ``range_rows`` records;
    the number of range groups the external sort planned."""
    expected, units = plan_bytes(config)
    groups = []
    real = plan._ranged

    def counting(*args):
        for table in real(*args):
            groups.append(table.num_rows)
            yield table

    with monkeypatch.context() as m:
        m.setattr(plan, "IN_MEMORY_ROWS", 0)
        m.setattr(plan, "RANGE_ROWS", range_rows)
        m.setattr(plan, "_ranged", counting)
        got, units2 = plan_bytes(config)
    assert units2 == units
    assert got == expected
    assert sum(groups) == sum(u.n_records for u in units)
    return groups


def awkward_keys():
    """Raw keys that exercise every rule that relates one record's key to another's."""
    keys = ["a", "a", "a", "a", "a#1", "a_1", "a_2", "a b", "a_b", "a-b", "a.b", "x_1", "x", "x", "x_1_1",
            "cat", "cat_v01", "cat_s0001", "cat_s0001_p01", "cat_s0001_v02", "cat_s0001_p01_v03", "cat0", "catA", "cat-",
            "", "", "", ".", ".", "..", "#1", "#2", "1", "2", "3", "k", "K", "k", "é", "é", "ünï", "ünï_v01", "日本",
            "b" * 140, "b" * 140, "b" * 140 + "c", "b" * 99 + "_" * 60 + "z", "b" * 99 + "-" * 60 + "z", "b" * 127,
            "b" * 127, "c" * 100, "c" * 100, "c" * 101, "IMG_0001", "IMG", "IMG", "IMG_1", "IMG_0001_v01"]
    keys += [str(i) for i in range(1, 400)] + [f"n{i}" for i in range(0, 300, 7)] * 2
    rng = np.random.default_rng(5)
    alphabet = list("ab_-. #/1") + ["é"]
    keys += ["".join(rng.choice(alphabet, rng.integers(0, 6))) for _ in range(600)]
    return keys


def manifest(tmp_path, keys, name="m.parquet"):
    n = len(keys)
    pq.write_table(pa.table({"path": [f"imgs/{k}.png" for k in keys], "text": [f"t{i}" for i in range(n)],
                             "key": keys}), tmp_path / name, row_group_size=97)
    return str(tmp_path / name)


@pytest.mark.parametrize("range_rows", [3, 7, 200])
@pytest.mark.parametrize("key_col", ["key", None])
def test_awkward_keys_plan_the_same_bytes_in_tiny_ranges(tmp_path, monkeypatch, range_rows, key_col):
    path = manifest(tmp_path, awkward_keys())
    config = load_config(input=path, out=str(tmp_path / "out"), image_col="path", text_col="text", key_col=key_col,
                         samples_per_shard=13, overwrite=True)
    groups = both_ways(monkeypatch, config, range_rows)
    # really planned in several groups of ranges (from paths, the empty name's ``imgs``, repeated, is a
    # prefix of every key and its repeats reach past every splitter: one group, rightly, in big ranges)
    assert len(groups) > 1 or (key_col is None and range_rows == 200)


@pytest.mark.parametrize("key_col", [None, "uid"])
@pytest.mark.parametrize("sps", [1, 4])
def test_the_tricky_manifest_plans_the_same_bytes_in_tiny_ranges(tmp_path, monkeypatch, key_col, sps):
    pq.write_table(pa.table(tricky_rows()), tmp_path / "m.parquet")
    config = load_config(input=str(tmp_path / "m.parquet"), out=str(tmp_path / "out"), image_col="path", text_col="text",
                         key_col=key_col, samples_per_shard=sps, overwrite=True)
    both_ways(monkeypatch, config, 2)


def test_a_folder_plans_the_same_bytes_in_tiny_ranges(tmp_path, monkeypatch):
    root = tmp_path / "in"
    for rel, data in [("a/cat.JPG", png()), ("a/cat.txt", "a cat"), ("b/cat.png", png()), ("b/dog.png", png()),
                      ("b/dog.webp", png()), ("b/x.foo", "?"), ("b/c/deep é.png", png()), ("only.bin", "?"),
                      ("b/cat_v01.png", png()), ("b/cat_s0001.wav", b"RIFF"), ("n o/s p.png", png()), ("n_o/s_p.png", png()),
                      ("é.png", png()), ("ü.png", png()), ("k.png", png()), ("b_cat.png", png()), ("b/cat-1.png", png())]:
        write(root, rel, data)
    for i in range(60):
        write(root, f"many/{i}.png", png())
    config = load_config(input=str(root), out=str(tmp_path / "out"), samples_per_shard=4, overwrite=True)
    assert len(both_ways(monkeypatch, config, 3)) > 1


def test_keys_that_reach_across_a_splitter_merge_their_ranges(tmp_path, monkeypatch):
    """``b`` repeated becomes ``b_1`` (after every ``b0``..``bZ``); ``cat_v01``'s parent ``cat`` sorts before
    ``cat0``..``catZ``: each pair is planned in one range however the splitters fall, so fewer groups than ranges."""
    keys = (["b", "b", "b_1"] + [f"b{i:04d}" for i in range(300)] + [f"ca{i:04d}" for i in range(300)]
            + ["cat", "cat_v01"] + [f"cat{i:04d}" for i in range(300)])
    config = load_config(input=manifest(tmp_path, keys[::-1]), out=str(tmp_path / "out"), image_col="path", key_col="key",
                         samples_per_shard=10, overwrite=True)
    groups = both_ways(monkeypatch, config, 20)
    assert 1 < len(groups) < -(-len(keys) // 20)
    table = pq.read_table(tmp_path / "out" / "plan.parquet")
    rows = dict(zip(table.column("key").to_pylist(), table.column("reserved").to_pylist()))
    assert rows["cat"] == ["cat_v01"] and "b_1" in rows and len(rows) == len(keys)


def test_one_name_repeated_many_times_plans_the_same_bytes(tmp_path, monkeypatch):
    """A single routing key cannot be split: its records make one range, planned like any other."""
    keys = ["same"] * 3000 + ["other", "same_7", "same_2999"]
    config = load_config(input=manifest(tmp_path, keys), out=str(tmp_path / "out"), image_col="path", key_col="key",
                         samples_per_shard=100, overwrite=True)
    both_ways(monkeypatch, config, 50)


def test_the_sample_is_the_same_however_the_input_is_batched(monkeypatch):
    monkeypatch.setattr(plan_sort, "SAMPLE_ROWS", 50)
    keys = pa.array([f"k{(i * 7919) % 1000:04d}" for i in range(1000)])
    splitters = []
    for step in (1000, 97, 10):
        sample = plan._Sample()
        for lo in range(0, 1000, step):
            sample.add(lo, keys.slice(lo, step))
        assert sum(len(r) for r in sample.rows) <= 50
        splitters.append(sample.splitters(8).to_pylist())
    assert splitters[0] == splitters[1] == splitters[2] and len(splitters[0]) == 7
    assert splitters[0] == sorted(splitters[0])


def test_an_empty_input_is_still_refused_on_the_external_path(tmp_path, monkeypatch):
    pq.write_table(pa.table({"path": pa.array([], pa.string())}), tmp_path / "m.parquet")
    monkeypatch.setattr(plan, "IN_MEMORY_ROWS", 0)
    config = load_config(input=str(tmp_path / "m.parquet"), out=str(tmp_path / "out"), image_col="path")
    with pytest.raises(UserError, match="no records"):
        plan_bytes(config)
    assert not os.path.exists(tmp_path / "out" / "plan.parquet")
