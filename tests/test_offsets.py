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


def _tarfile_shard(samples):
    """What write_tar wrote with tarfile itself (PAX format, fixed mtime, owner and mode), and its offsets."""
    import tarfile

    from mmdata.writers.tar import FIXED_MTIME

    buf, offsets = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                    len(data), FIXED_MTIME, 0o644, 0, 0, "", ""
                tar.addfile(info, io.BytesIO(data))
                offsets.append((info.name, tar.offset - -(-len(data) // 512) * 512, len(data)))
    return buf.getvalue(), offsets


def test_shards_are_the_bytes_tarfile_writes():
    """write_tar makes the plain members' headers itself: byte for byte what tarfile writes, for names
    up to and past 100 characters, non-ASCII names (a pax record), empty members and block edges."""
    import random

    from mmdata.writers.tar import member_header

    rng = random.Random(7)
    for trial in range(60):
        samples = [(f"k{i}" + ("é" if rng.random() < 0.15 else "") + "z" * rng.choice([0, 94, 95, 96, 130]),
                    {ext: rng.randbytes(rng.choice([0, 1, 511, 512, 513, 4097]))
                     for ext in rng.sample(["jpg", "txt", "json", "tokens.npy"], rng.randint(0, 4))})
                   for i in range(rng.randint(0, 10))]
        buf, offsets = io.BytesIO(), []
        assert write_tar(buf, samples, offsets) == len(samples)
        assert (buf.getvalue(), offsets) == _tarfile_shard(samples), trial
    assert _tarfile_shard([("k", {"x": b"."})])[0][:512] == member_header("k.x", 1)
    assert len(member_header("k.x", 8 ** 11)) == 1536  # a size past 8 GiB: tarfile's pax record
