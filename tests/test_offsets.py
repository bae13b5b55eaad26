"""The offsets index of shard members: written per unit, read by random access, checked by verify."""
import io
import json
import shutil

import pytest

from mmdata.layout import offsets_file
from mmdata.storage import OutputDir
from mmdata.tools.verify import verify_output
from mmdata.writers.offsets import ShardReader, scan_offsets
from mmdata.writers.tar import read_tar_samples, write_tar


def test_every_member_reads_back_by_offset(built):
    out, manifest = built
    od = OutputDir(out)
    sizes = json.loads(od.read_bytes("shards/sizes.json"))
    seen = 0
    for shard in sorted(sizes):
        assert od.exists(offsets_file(shard[:-4]))
        reader = ShardReader(od, shard)
        assert reader.indexed
        samples = read_tar_samples(io.BytesIO(od.read_bytes(f"shards/{shard}")))
        assert reader.keys() == [k for k, _ in samples]
        for key, members in samples:
            assert reader.read_sample(key) == members
            for ext, data in members.items():
                assert reader.read(key, ext) == data
            seen += 1
    assert seen == manifest["counts"]["written"] > 0


def test_long_names_and_sizes_at_block_edges():
    """PAX headers (names over 100 characters) and data of 0, 511, 512 and 513 bytes."""
    samples = [("k" * 128, {"txt": b"", "json": b"x" * 511}), ("a" * 101, {"bin": b"y" * 512, "npy": b"z" * 513})]
    buf = io.BytesIO()
    offsets: list = []
    write_tar(buf, samples, offsets)
    assert offsets == scan_offsets(io.BytesIO(buf.getvalue()))
    data = buf.getvalue()
    for key, members in samples:
        for ext, blob in members.items():
            _, offset, size = next(m for m in offsets if m[0] == f"{key}.{ext}")
            assert data[offset:offset + size] == blob


def test_reader_without_an_index_scans_the_headers(built, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    od = OutputDir(str(out))
    indexed = ShardReader(od, "00000.tar")
    od.remove(offsets_file("00000"))
    scanned = ShardReader(od, "00000.tar")
    assert not scanned.indexed
    assert scanned.keys() == indexed.keys()
    key = scanned.keys()[0]
    assert scanned.read_sample(key) == indexed.read_sample(key)
    with pytest.raises(KeyError):
        scanned.read("no_such_key", "jpg")
    with pytest.raises(ValueError):
        scanned.read(key, "jpg", max_bytes=1)
    assert verify_output(str(out)) == []  # an output without offsets files is still sound


def test_verify_finds_a_wrong_offset(built, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    path = out / offsets_file("00001")
    doc = json.loads(path.read_text())
    doc["members"][0][1] += 512
    path.write_text(json.dumps(doc))
    problems = verify_output(str(out))
    assert any("00001_offsets.json" in p for p in problems), problems


def test_offsets_and_report_are_layout_files():
    """--overwrite removes them with the rest of the output."""
    from mmdata.layout import is_layout_file

    assert is_layout_file("shards/00000_offsets.json") and is_layout_file("report.html")
    assert not is_layout_file("shards/00000_offsets.json.bak") and not is_layout_file("notes/report.html")
