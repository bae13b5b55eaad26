"""Folder grouping and manifests (parquet/csv/tsv/jsonl, relative paths, fsspec memory://)."""
import io
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_build
from PIL import Image

from mmdata.config import load_config
from mmdata.errors import UserError
from mmdata.pipeline.plan import list_records
from mmdata.sources.folder import list_folder


def png(color=(10, 200, 30), size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def write(root, rel, data):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode())


def test_folder_groups_by_relative_stem(tmp_path):
    write(tmp_path, "a/cat.JPG", png())
    write(tmp_path, "a/cat.txt", "a cat")
    write(tmp_path, "a/cat.json", "{}")
    write(tmp_path, "b/cat.png", png())
    write(tmp_path, "b/dog.png", png())
    write(tmp_path, "b/dog.webp", png())
    write(tmp_path, "b/x.foo", "?")
    write(tmp_path, "b/x.txt", "only text")
    write(tmp_path, ".hidden/y.png", png())
    groups = {g[0]: g for g in list_folder(str(tmp_path))}
    assert set(groups) == {"a/cat", "b/cat", "b/dog", "b/x"}
    assert set(groups["a/cat"][1]) == {"image", "text", "json"}
    assert groups["b/dog"][3] == "ambiguous:image"
    assert groups["b/x"][2] == ["ignored:x.foo"] and groups["b/x"][3] is None


def _manifest_rows(tmp_path):
    write(tmp_path, "imgs/one.png", png((255, 0, 0)))
    write(tmp_path, "imgs/two.png", png((0, 255, 0)))
    return [
        {"path": "imgs/one.png", "text": "a red square", "uid": "r1", "license": "cc0"},
        {"path": "imgs/two.png", "text": "a green square", "uid": "r2", "license": "cc-by"},
        {"path": "imgs/missing.png", "text": "gone", "uid": "r3", "license": None},
        {"path": None, "text": "no image", "uid": "r4", "license": None},
    ]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_manifest_formats_with_column_mapping(tmp_path, fmt):
    rows = _manifest_rows(tmp_path)
    path = tmp_path / f"m.{fmt}"
    table = pa.Table.from_pylist(rows)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text("\n".join([sep.join(rows[0])] + [sep.join("" if v is None else v for v in r.values()) for r in rows]))
    manifest = run_build(path, tmp_path / "out", workers=1, image_col="path", text_col="text", key_col="uid")
    assert manifest["counts"] == {"inputs": 4, "written": 2, "filtered": 1, "failed": 1}
    assert manifest["reasons"] == {"failed": {"read:image": 1}, "filtered": {"missing:image": 1}}
    table = pq.read_table(tmp_path / "out" / "shards" / "00000.parquet").to_pylist()
    by_key = {r["key"]: r for r in table}
    assert by_key["r1"]["caption"] == "a red square"
    assert json.loads(by_key["r1"]["meta"]) == {"license": "cc0"}


def test_manifest_keys_default_to_the_image_path(tmp_path):
    rows = _manifest_rows(tmp_path)[:2]
    pq.write_table(pa.Table.from_pylist(rows + rows[:1]), tmp_path / "m.parquet")
    cfg = load_config(input=str(tmp_path / "m.parquet"), out=str(tmp_path / "o"), image_col="path", text_col="text")
    keys = [r.key for r in list_records(cfg)]
    assert len(set(keys)) == 3 and "imgs_one" in keys and "imgs_two" in keys


def test_manifest_missing_columns_is_a_user_error(tmp_path):
    rows = _manifest_rows(tmp_path)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    cfg = load_config(input=str(tmp_path / "m.parquet"), out=str(tmp_path / "o"))
    with pytest.raises(UserError, match="--image-col"):
        list_records(cfg)


def test_memory_filesystem_input_and_output():
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/a.png", png())
    fs.pipe("/corpus/a.txt", b"a green box")
    fs.pipe("/corpus/sub/b.png", png((1, 2, 3)))
    fs.pipe("/corpus/sub/b.txt", b"a dark box")
    fs.pipe("/m/list.jsonl", b'{"image": "../corpus/a.png", "caption": "via manifest"}\n')
    manifest = build_mem("memory://corpus", "memory://out1")
    assert manifest["counts"]["written"] == 2
    assert fs.exists("/out1/shards/00000.tar") and fs.exists("/out1/shards/sizes.json")
    manifest = build_mem("memory://m/list.jsonl", "memory://out2")
    assert manifest["counts"]["written"] == 1


def build_mem(src, dst):
    from mmdata.build import build

    return build(load_config(input=src, out=dst, workers=1, progress=False))
