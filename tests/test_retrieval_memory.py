"""Memory of the id lookups (issue 3): finalize writes ``index/ids.parquet`` shard by shard and the
Retriever opens it as arrays, so on a 200k-row corpus the Python heap stays far below what per-row
dicts take (~200 MB), and lookups by id and by key still give the right rows."""
import io
import json
import shutil
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mmdata.index.ids as ids_module
from mmdata.config import BuildConfig
from mmdata.errors import UserError
from mmdata.index.ids import IDS_SCHEMA, written_ids
from mmdata.index.step import build_indexes
from mmdata.keys import key_to_id
from mmdata.records import Unit
from mmdata.schema import SHARD_SCHEMA
from mmdata.search import Retriever
from mmdata.storage import OutputDir
from mmdata.writers.table import table_bytes

N_SHARDS, PER_SHARD, SKIP_EVERY, DIM = 20, 10_500, 21, 16  # 10_000 written rows per shard: 200k in all
HEAP_LIMIT = 40 * 2**20  # bytes of Python heap; per-row dicts of this corpus take ~200 MB


def shard_table(shard: int) -> tuple[pa.Table, dict]:
    """A shard parquet with ``SHARD_SCHEMA``: every ``SKIP_EVERY``-th sample filtered, the others
    written (rows 0..), every 7th written one without a caption; and the rows ids.parquet must hold."""
    n = PER_SHARD
    keys = [f"s{shard:02d}_{j:05d}" for j in range(n)]
    written = np.arange(n) % SKIP_EVERY != SKIP_EVERY - 1
    rows = np.full(n, -1, dtype=np.int32)
    rows[written] = np.arange(written.sum(), dtype=np.int32)
    captions = [f"a synthetic caption for sample {k}" if r % 7 else None for k, r in zip(keys, rows)]
    arrays = {
        "key": pa.array(keys, pa.string()),
        "id": pa.array([key_to_id(k) for k in keys], pa.int64()),
        "status": pa.array(np.where(written, "written", "filtered").tolist(), pa.string()),
        "row": pa.array(rows, pa.int32(), mask=~written),
        "caption": pa.array(captions, pa.string()),
        "warnings": pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string())),
        "source_bytes": pa.array(np.zeros(n, np.int64)),
    }
    table = pa.Table.from_arrays([arrays.get(f.name, pa.nulls(n, f.type)) for f in SHARD_SCHEMA], schema=SHARD_SCHEMA)
    sel = np.flatnonzero(written)
    expected = {"id": table.column("id").to_numpy()[sel], "key": [keys[i] for i in sel],
                "row": rows[sel], "caption": [captions[i] for i in sel]}
    return table, expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Shard parquets and image embeddings of a 200k-row build, before finalize's index step."""
    root = tmp_path_factory.mktemp("memory")
    (root / "shards").mkdir()
    (root / "embeddings" / "image").mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {"id": [], "key": [], "shard": [], "row": [], "caption": []}
    for s in range(N_SHARDS):
        name = f"{s:05d}"
        table, rows = shard_table(s)
        pq.write_table(table, root / "shards" / f"{name}.parquet", compression="zstd")
        emb = rng.standard_normal((len(rows["key"]), DIM)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        np.save(root / "embeddings" / "image" / f"{name}.npy", emb.astype(np.float16))
        for col in ("id", "key", "row", "caption"):
            expected[col].extend(rows[col].tolist() if col in ("id", "row") else rows[col])
        expected["shard"].extend([f"{name}.tar"] * len(rows["key"]))
    (root / "manifest.json").write_text("{}")
    assert len(expected["id"]) == N_SHARDS * 10_000 and len(set(expected["id"])) == len(expected["id"])
    return str(root), [Unit(index=s, records=[]) for s in range(N_SHARDS)], expected


def peak_heap(fn):
    """(result, peak bytes of Python heap allocated while ``fn`` ran)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def indexed(corpus):
    """The corpus after finalize's index step (a Flat image index), run under tracemalloc."""
    out, units, _ = corpus
    config = BuildConfig(input=out, out=out, model="mmdata-tiny", embed=["image"], index_key="Flat")
    infos, peak = peak_heap(lambda: build_indexes(config, OutputDir(out), units))
    return out, infos, peak


def test_index_step_writes_ids_parquet_without_per_row_objects(corpus, indexed):
    out, infos, peak = indexed
    assert infos["image"]["n"] == N_SHARDS * 10_000
    assert peak < HEAP_LIMIT, f"index step peaked at {peak / 2**20:.0f} MiB of Python heap"
    _, _, expected = corpus
    table = pq.read_table(f"{out}/index/ids.parquet")
    assert table.schema == IDS_SCHEMA
    assert table.to_pydict() == expected  # columns, order and values as the per-row writer wrote them
    meta = pq.ParquetFile(f"{out}/index/ids.parquet").metadata
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert groups == [ids_module.ROW_GROUP_ROWS, 200_000 - ids_module.ROW_GROUP_ROWS]


def test_ids_parquet_bytes_do_not_depend_on_how_it_is_written(corpus, tmp_path, monkeypatch):
    from mmdata.index.ids import write_ids

    src, units, expected = corpus
    (tmp_path / "shards").mkdir()
    for unit in units[:3]:
        shutil.copy(f"{src}/shards/{unit.name}.parquet", tmp_path / "shards")
    out = OutputDir(str(tmp_path))
    n = 3 * 10_000
    # one row group: byte for byte what the per-row writer (one table, pyarrow's defaults) wrote
    rows = [{c: expected[c][i] for c in expected} for i in range(n)]
    ids = write_ids(out, units[:3])
    assert out.read_bytes("index/ids.parquet") == table_bytes(rows, IDS_SCHEMA)
    for unit in units[:3]:
        assert np.array_equal(ids[unit.name], written_ids(out, unit.name))
        assert ids[unit.name].dtype == np.int64
    # row groups cut across shards: the same rows, the same bytes every time
    monkeypatch.setattr(ids_module, "ROW_GROUP_ROWS", 7_000)
    write_ids(out, units[:3])
    first = out.read_bytes("index/ids.parquet")
    write_ids(out, units[:3])
    assert out.read_bytes("index/ids.parquet") == first
    meta = pq.ParquetFile(io.BytesIO(first)).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [7_000] * 4 + [2_000]
    assert pq.read_table(io.BytesIO(first)).to_pylist() == rows
    # no unit: an empty table, as before
    write_ids(out, [])
    assert out.read_bytes("index/ids.parquet") == table_bytes([], IDS_SCHEMA)


def test_retriever_opens_without_per_row_objects_and_finds_rows(corpus, indexed):
    out, _, _ = indexed
    _, _, expected = corpus
    retriever, peak = peak_heap(lambda: Retriever(out))
    assert peak < HEAP_LIMIT, f"Retriever peaked at {peak / 2**20:.0f} MiB of Python heap"
    n = len(expected["id"])
    picks = [0, 6, 7, 12_345, 99_999, 150_001, n - 1]  # first, uncaptioned ones, across the shards, last
    assert any(expected["caption"][i] is None for i in picks)
    for i in picks:
        row = {c: expected[c][i] for c in expected}
        emb = np.load(f"{out}/embeddings/image/{row['shard'][:-4]}.npy")[row["row"]].astype(np.float32)
        # key → row
        assert np.array_equal(retriever.embedding_of(row["key"]), emb)
        # id → row (the index returns ids; a stored vector's best match is itself)
        top = retriever.search_embedding(emb, k=1)[0]
        assert top.rank == 1 and (top.id, top.key, top.shard, top.row, top.caption) == tuple(row.values())
        assert json.dumps(top.to_dict())  # plain Python values
        hits = retriever.search_key(row["key"], k=3)
        assert [h.rank for h in hits] == [1, 2, 3] and row["id"] not in [h.id for h in hits]
        for h in hits:
            j = expected["id"].index(h.id)
            assert (h.id, h.key, h.shard, h.row, h.caption) == tuple(expected[c][j] for c in expected)
    with pytest.raises(UserError, match=r"unknown key 'nope' in "):
        retriever.embedding_of("nope")
    with pytest.raises(UserError, match=r"unknown key 's00_00020' in "):  # a filtered sample is not in the index
        retriever.search_key("s00_00020")


def test_id_table_arrays(corpus, indexed):
    from mmdata.index.ids import IdTable

    out, _, _ = indexed
    _, _, expected = corpus
    table = IdTable(OutputDir(out))
    assert len(table) == len(expected["id"]) and np.all(np.diff(table.ids) > 0)
    assert table.captions is None and table.shard_names == [f"{s:05d}" for s in range(N_SHARDS)]
    wanted = np.asarray(expected["id"][::997], dtype=np.int64)
    pos = table.locate(wanted)
    assert table.keys_at(pos) == expected["key"][::997]
    assert [table.shard_names[c] + ".tar" for c in table.shard[pos]] == expected["shard"][::997]
    assert table.row[pos].tolist() == expected["row"][::997]
    assert table.find_key(expected["key"][5]) == table.locate(np.asarray([expected["id"][5]]))[0]
    assert table.find_key("nope") is None
    with pytest.raises(KeyError):
        table.locate(np.asarray([expected["id"][0] + 1, expected["id"][0]]))
    with pytest.raises(KeyError):
        table.locate(np.asarray([np.iinfo(np.int64).max]))
    assert table.locate(np.asarray([], dtype=np.int64)).tolist() == []
