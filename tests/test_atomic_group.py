"""OutputDir.atomic_group: a unit's files appear together or not at all — after success all of them,
after an error or a kill none under their final names (only temporaries, which clean_temporaries
removes) — and a build's units still commit and resume through it."""
import os
import signal
import subprocess
import sys

import pytest

from mmdata.storage import OutputDir


def finals(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_group_files_appear_together(tmp_path):
    out = OutputDir(str(tmp_path))
    with out.atomic_group() as group:
        with group.open("shards/a.tar") as fh:
            fh.write(b"tar bytes")
        group.write_bytes("shards/a.parquet", b"table")
        group.write_bytes("embeddings/image/a.npy", b"rows")
        assert finals(tmp_path) and not any(".tmp-" not in f for f in finals(tmp_path))  # nothing final yet
    assert finals(tmp_path) == ["embeddings/image/a.npy", "shards/a.parquet", "shards/a.tar"]
    assert (tmp_path / "shards/a.tar").read_bytes() == b"tar bytes"


def test_an_error_in_the_group_leaves_nothing(tmp_path):
    out = OutputDir(str(tmp_path))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards/old.tar").write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        with out.atomic_group() as group:
            group.write_bytes("shards/a.tar", b"x")
            group.write_bytes("shards/old.tar", b"new")
            1 / 0
    assert finals(tmp_path) == ["shards/old.tar"] and (tmp_path / "shards/old.tar").read_bytes() == b"old"


KILLED = """
import sys, time
from mmdata.storage import OutputDir
out = OutputDir(sys.argv[1])
with out.atomic_group() as group:
    group.write_bytes("shards/a.tar", b"x" * 100000)
    print("written", flush=True)
    time.sleep(60)
"""


def test_a_killed_group_leaves_only_temporaries(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    left = finals(tmp_path)
    assert len(left) == 1 and ".tmp-" in left[0], left
    assert OutputDir(str(tmp_path)).clean_temporaries() == 1 and finals(tmp_path) == []
