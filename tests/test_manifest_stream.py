"""csv/tsv/jsonl manifests are read streaming, block by block (issue 12): the plan is the one the
whole-file reader gave on awkward files (types that change after the first block, quoted newlines,
a byte-order mark, NA tokens, latin-1 bytes, NaN tokens, mixed jsonl columns), bad files give the same
clear errors, and a 1M-row manifest is read under a memory cap that the whole-file reader exceeds."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest
from test_plan_scale import check_same_plan

from mmdata.config import load_config
from mmdata.errors import UserError
from mmdata.sources import manifest, manifest_stream
from mmdata.sources.manifest import read_manifest_batches

N = 40  # rows per awkward file: many 64-byte blocks


def rows_csv(last, col="n", head="path,text,{col}\n", value=lambda i: i):
    return head.format(col=col) + "".join(f"imgs/a{i}.png,t {i},{value(i)}\n" for i in range(N)) + last


AWKWARD = {
    "int_then_text.csv": rows_csv("z.png,zz,hello\n"),
    "int_then_float.csv": rows_csv("z.png,zz,2.5\n"),
    "bits_then_bool.csv": rows_csv("z.png,zz,true\n", value=lambda i: i % 2),
    "bits_then_word.csv": rows_csv("z.png,zz,true\nq.png,qq,7\n", value=lambda i: i % 2),
    "null_then_int.csv": rows_csv("z.png,zz,7\n", value=lambda i: ""),
    "date_then_timestamp.csv": rows_csv("z.png,zz,2020-01-01T10:00:00\n", value=lambda i: f"2020-01-{i % 28 + 1:02d}"),
    "na_tokens.csv": rows_csv("z.png,null,3\nNA,N/A,\n", value=lambda i: "N/A"),
    "latin1_late.csv": rows_csv("").encode() + b"z.png,caf\xe9,1\n",
    "latin1_first.csv": b"path,text,n\nz.png,caf\xe9,1\n" + rows_csv("").split("\n", 1)[1].encode(),
    "quoted_newlines_bom.csv": "\ufeffpath,text,n\n" + "".join(f'imgs/a{i}.png,"multi\nline {i}, ""q""",{i}\n'
                                                             for i in range(N)),
    "int_keys_then_text.csv": rows_csv("z.png,zz,key z\n", col="uid"),
    "header_only.csv": "path,text,n\n",
    "tabs.tsv": "path\ttext\tn\n" + "".join(f"imgs/a{i}.png\tt {i}\t{i}\n" for i in range(N)) + "z.png\tzz\tx\n",
    "int_then_float.jsonl": "".join(json.dumps({"path": f"a{i}.png", "text": f"t{i}", "n": i}) + "\n" for i in range(N))
    + '{"path": "z.png", "n": 2.5, "late": 1}\n',
    "int_then_text.jsonl": "".join(json.dumps({"path": f"a{i}.png", "text": f"t{i}", "n": i}) + "\n" for i in range(N))
    + '{"path": "z.png", "n": "x"}\n',
    "nan_and_lists.jsonl": '{"path": "imgs/a.png", "n": 1, "v": NaN}\n{"path": "imgs/b.png", "n": "two"}\n\n'
                           '{"path": null, "text": "t", "n": [1, 2]}\n' * 10,
    "bom.jsonl": "\ufeff" + "".join(json.dumps({"path": f"a{i}.png", "text": f"t{i}"}) + "\n" for i in range(N)),
    "structs.jsonl": "".join(json.dumps({"path": f"a{i}.png", "s": {"a": i}} if i < N // 2 else
                                        {"path": "b.png", "s": {"b": "x"}}) + "\n" for i in range(N)),
    "timestamp_then_text.jsonl": "".join(json.dumps({"path": f"a{i}.png", "t": "2020-01-01T00:00:00" if i < N // 2
                                                     else "hello"}) + "\n" for i in range(N)),
    "crlf.jsonl": "".join(json.dumps({"path": f"a{i}.png", "n": i}) + "\r\n" for i in range(N)),
}


@pytest.mark.parametrize("name", sorted(AWKWARD))
def test_awkward_manifests_plan_what_the_whole_file_reader_planned(tmp_path, monkeypatch, name):
    monkeypatch.setattr(manifest_stream, "TEXT_BLOCK", 64)  # a block is a line or two: types change between blocks
    data = AWKWARD[name]
    (tmp_path / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    config = load_config(input=str(tmp_path / name), out=str(tmp_path / "out"), image_col="path", text_col="text",
                         key_col="uid" if "keys" in name else None, samples_per_shard=7)
    if name == "header_only.csv":
        assert [b for b in read_manifest_batches(config.input, "path", "text", None)] == []
        return
    rows = check_same_plan(config)  # the reference reads the file whole, as the planner did before
    assert len(rows) > N // 2


BAD = {  # file → the start of the error the whole-file reader gave (and still gives)
    "zero.csv": (b"", "cannot read manifest {p} as csv: Empty CSV file"),
    "ragged.csv": (rows_csv("x,y,z,w\n").encode(), "cannot read manifest {p} as csv: CSV parse error: Expected 3 columns"),
    "bad.jsonl": (b'{"path": "a.png"}\n' * 50 + b'{"path": \n', "cannot read manifest {p} as jsonl: Expecting value"),
    "array.jsonl": (b'{"path": "a.png"}\n[1, 2]\n', "cannot read manifest {p} as jsonl: a line is not a JSON object"),
    "zero.jsonl": (b"", "manifest {p} has neither image column"),
    "blank.jsonl": (b"\n \n", "manifest {p} has neither image column"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_manifests_give_the_same_clear_error(tmp_path, monkeypatch, name):
    monkeypatch.setattr(manifest_stream, "TEXT_BLOCK", 64)
    data, want = BAD[name]
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(UserError) as exc:
        list(read_manifest_batches(str(p), "path", "text", None))
    assert str(exc.value).startswith(want.format(p=p)), str(exc.value)
    with pytest.raises(UserError) as old:  # the whole-file reader, for the comparison
        list(manifest.read_manifest(str(p), "path", "text", None))
    assert str(old.value).split(":")[:2] == str(exc.value).split(":")[:2]


def test_jsonl_that_used_to_crash_gives_a_clear_error(tmp_path):
    """Non-UTF-8 bytes (Arrow passed them into text, a traceback later) and a value nested 1,200 deep."""
    (tmp_path / "latin1.jsonl").write_bytes(b'{"path": "a.png", "text": "caf\xe9"}\n')
    (tmp_path / "deep.jsonl").write_text('{"path": "a.png", "x": ' + "[" * 1200 + "]" * 1200 + "}\n")
    with pytest.raises(UserError, match="as jsonl: 'utf-8' codec can't decode"):
        list(read_manifest_batches(str(tmp_path / "latin1.jsonl"), "path", "text", None))
    with pytest.raises(UserError, match="as jsonl: a value is nested too deeply"):
        list(read_manifest_batches(str(tmp_path / "deep.jsonl"), "path", "text", None))


# --- memory: a 1M-row csv/jsonl read in a child process, streaming and whole ---
ROWS = 1_000_000
CAP = 300 << 20  # streaming peaked at ~210 MiB (csv) / ~180 MiB (jsonl), whole-file at ~390 / ~500 MiB

CHILD = textwrap.dedent("""
    import resource, subprocess, sys
    if sys.argv[1] == "child":
        from mmdata.sources import manifest as M
        if sys.argv[3] == "whole":  # the reader before streaming: the file read whole by Arrow
            t = M._read_table(sys.argv[2], M.manifest_format(sys.argv[2]))
            M._open_batches = lambda u, f: (t.column_names, iter(t.to_batches(M.BATCH_ROWS)))
        print(sum(b.num_rows for b in M.read_manifest_batches(sys.argv[2], "url", "caption", None)))
    else:  # a small parent: its only child is the reader, RUSAGE_CHILDREN is the reader's peak
        p = subprocess.run([sys.executable, "-c", sys.argv[1], "child", *sys.argv[2:]],
                           capture_output=True, text=True)
        sys.stderr.write(p.stderr[-3000:])
        print(p.stdout.strip(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        sys.exit(p.returncode)
""")


def peak_of(path, how):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", CHILD, CHILD, str(path), how], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows, peak = map(int, proc.stdout.split())
    assert rows == ROWS
    return peak


def test_a_million_row_csv_and_jsonl_are_read_under_a_cap_the_whole_file_reader_exceeds(tmp_path):
    rng = np.random.default_rng(1)
    ids = pa.array(rng.permutation(ROWS)).cast(pa.string())
    table = pa.table({"url": pc.binary_join_element_wise("https://img.example.com/i/", ids, ".jpg", ""),
                      "caption": pc.binary_join_element_wise("a photo of thing number ", ids, ""),
                      "similarity": rng.random(ROWS)})
    pacsv.write_csv(table, tmp_path / "m.csv")
    with open(tmp_path / "m.jsonl", "w") as fh:
        for batch in table.to_batches(1 << 16):
            fh.writelines(json.dumps(r) + "\n" for r in batch.to_pylist())
    for name in ("m.csv", "m.jsonl"):
        streaming, whole = peak_of(tmp_path / name, "stream"), peak_of(tmp_path / name, "whole")
        assert streaming > 50 << 20  # a real measurement of an interpreter that read the file
        assert streaming < CAP < whole, (name, streaming >> 20, whole >> 20)
