"""Fixed cost of a build without a model: running its units imports no torch, open_clip, transformers
or faiss (checked in a fresh interpreter, after the build); with simplejpeg the codec is loaded."""
import json
import os
import subprocess
import sys
import time

from PIL import Image

HEAVY = ("torch", "open_clip", "transformers", "faiss", "librosa", "apache_beam", "distributed")

SCRIPT = """
import json, sys
from mmdata.build import build
from mmdata.config import load_config
m = build(load_config(input=sys.argv[1], out=sys.argv[2], workers=1, progress=False, jpeg_codec=sys.argv[3]))
print(json.dumps({"counts": m["counts"], "modules": sorted(k for k in sys.modules if "." not in k)}))
"""


def test_a_build_without_a_model_imports_no_model_library(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i in range(3):
        Image.new("RGB", (300 + i, 200), (40 * i, 90, 160)).save(corpus / f"a{i}.jpg")
        (corpus / f"a{i}.txt").write_text(f"a caption {i}")
    for codec in ("pillow", "simplejpeg"):
        res = subprocess.run([sys.executable, "-c", SCRIPT, str(corpus), str(tmp_path / codec), codec],
                             check=False, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        facts = json.loads(res.stdout.strip().splitlines()[-1])
        assert facts["counts"]["written"] == 3
        loaded = set(facts["modules"])
        assert "mmdata" in loaded and ("simplejpeg" in loaded) == (codec == "simplejpeg")
        assert not loaded & set(HEAVY), loaded & set(HEAVY)


# Not needed to build local image + plain-ASCII caption files without a model: a worker of the local
# engine must not import them (httpx for URLs, pandas that pyarrow would pull in, the report,
# ftfy for captions that need repair, yaml for config files).
NOT_IN_WORKER = HEAVY + ("httpx", "httpcore", "mmdata.sources.http", "pandas", "mmdata.report", "ftfy", "yaml")


def _corpus(root, n=4):
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (320 + i, 240), (30 * i, 90, 160)).save(root / f"p{i}.jpg", quality=90)
        (root / f"p{i}.txt").write_text(f"a plain caption {i}")
    return root


def test_a_local_worker_imports_only_what_the_config_needs(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDATA_START_METHOD", "spawn")  # a fresh worker (a forked one has this process's imports)
    from mmdata.build import build
    from mmdata.config import load_config
    from mmdata.engines.local import LocalEngine
    from mmdata.pipeline.unit import run_unit

    config = load_config(input=str(_corpus(tmp_path / "in")), out=str(tmp_path / "out"), workers=2,
                         samples_per_shard=2, progress=False)
    build(config)
    tar = tmp_path / "out" / "shards" / "00001.tar"
    before = tar.read_bytes()
    (tmp_path / "out" / "shards" / "00001_stats.json").unlink()  # unit 1 is built again, in a fresh worker
    engine = LocalEngine(config)
    pool = engine._new_pool(1)  # the engine's own pool (its initializer), one worker: both calls land there
    try:
        stats = pool.submit(run_unit, config, 1).result(timeout=300)
        loaded = set(pool.submit(eval, "sorted(__import__('sys').modules)").result(timeout=300))
    finally:
        pool.shutdown()
    assert stats["counts"]["written"] == 2 and not stats.get("skipped")
    assert tar.read_bytes() == before  # the same bytes as the build's own worker wrote
    assert "mmdata.pipeline.unit" in loaded and "pyarrow" in loaded
    assert not loaded & set(NOT_IN_WORKER), sorted(loaded & set(NOT_IN_WORKER))


PROBED = """
import io, json, sys
import pyarrow as pa, pyarrow.compute as pc, pyarrow.parquet as pq
from mmdata.schema import skip_pandas_probe
facts = {"skipped": skip_pandas_probe()}
buf = io.BytesIO()
pq.write_table(pa.table({"x": pa.array([1.0, None], pa.float64()), "s": pa.array(["a", "b"], pa.string())}), buf)
table = pq.ParquetFile(io.BytesIO(buf.getvalue())).read()  # (pq.read_table imports pyarrow.dataset, and pandas)
facts["rows"] = pc.sum(pc.equal(table.column("s"), pa.scalar("a", pa.string()))).as_py()
facts["no_pandas"] = "pandas" not in sys.modules
import pandas  # importable as ever
facts["to_pandas"] = table.to_pandas()["x"].isna().tolist()
facts["again"] = skip_pandas_probe()  # pandas already imported: left alone
print(json.dumps(facts))
"""


def test_skipping_the_pandas_probe_keeps_pyarrow_and_pandas_working(tmp_path):
    res = subprocess.run([sys.executable, "-c", PROBED], check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts == {"skipped": True, "rows": 1, "no_pandas": True, "to_pandas": [False, True], "again": False}


def _exits(p, limit: float = 300.0) -> bool:
    """Whether the worker process ``p`` exits within ``limit`` seconds. Polled, not ``p.join``: the
    executor's own thread may be joining it at the same moment, and the thread whose ``waitpid`` loses
    that race sees ECHILD, which multiprocessing reports as "still running" (exitcode None) although
    the other thread is reaping it; the reaping thread then sets the exit code both of them see."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if p.exitcode is not None:
            return True
        try:
            os.kill(p.pid, 0)
        except ProcessLookupError:  # reaped: gone
            return True
        time.sleep(0.05)
    return False


def test_started_workers_build_units_or_are_let_go(tmp_path):
    """LocalEngine.start spawns the workers before the plan exists; a plan of several units runs on
    them, a plan of one runs in the driver and the started workers are stopped."""
    from mmdata.build import build
    from mmdata.config import load_config
    from mmdata.engines.local import LocalEngine
    from mmdata.pipeline.plan import make_or_load_plan
    from mmdata.storage import OutputDir

    corpus = _corpus(tmp_path / "in", n=5)
    ref = load_config(input=str(corpus), out=str(tmp_path / "ref"), workers=1, samples_per_shard=2, progress=False)
    build(ref)
    for n_per_unit in (2, 8):  # three units, then one
        config = load_config(input=str(corpus), out=str(tmp_path / f"out{n_per_unit}"), workers=2,
                             samples_per_shard=n_per_unit, progress=False)
        out = OutputDir(config.out)
        out.ensure_writable()
        engine = LocalEngine(config)
        engine.start(config)
        processes = list(engine.pool._processes.values())
        assert len(processes) == 2
        units, _ = make_or_load_plan(config, out)
        stats = engine.map_units(config, units, lambda s: None)
        assert len(units) == (3 if n_per_unit == 2 else 1) and sum(s["counts"]["written"] for s in stats) == 5
        assert engine.pool is None
        for p in processes:  # stopped (one unit) or shut down (three): they exit either way
            assert _exits(p), f"worker {p.pid} still running 300 s after the map"
        if n_per_unit == 2:
            for name in ("00000.tar", "00001.tar", "00002.tar"):
                assert (tmp_path / "out2" / "shards" / name).read_bytes() == (tmp_path / "ref" / "shards" / name).read_bytes()


DRIVER = """
import json, sys
from mmdata.build import build
from mmdata.config import load_config
m = build(load_config(input=sys.argv[1], out=sys.argv[2], workers=2, samples_per_shard=2, progress=False))
print(json.dumps({"counts": m["counts"], "report": m["config"]["report"], "pandas": "pandas" in sys.modules,
                  "matplotlib": "matplotlib" in sys.modules}))
"""


def test_the_build_driver_never_imports_pandas(tmp_path):
    """Planning runs on a started worker, and the driver reads shard tables, filters them and turns them
    into numpy without pyarrow's pandas code: pandas costs a driver ~1 s of CPU it never needs."""
    corpus = _corpus(tmp_path / "in", n=5)
    (corpus / "broken.jpg").write_bytes(b"\xff\xd8\xff not a whole jpeg")
    (corpus / "broken.txt").write_text("a caption whose image does not decode")
    res = subprocess.run([sys.executable, "-c", DRIVER, str(corpus), str(tmp_path / "out")], check=False,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts["counts"]["written"] == 5 and facts["counts"]["failed"] == 1 and facts["report"]
    assert (tmp_path / "out" / "report.html").stat().st_size > 0
    assert not facts["pandas"]


def test_planning_in_a_worker_imports_no_pandas(tmp_path, monkeypatch):
    """The plan a started local worker makes (``LocalEngine.start(first=...)``) imports no pandas there,
    and is the plan the driver would make."""
    monkeypatch.setenv("MMDATA_START_METHOD", "spawn")  # a fresh worker (a forked one has this process's imports)
    from functools import partial

    from mmdata.config import load_config
    from mmdata.engines.local import LocalEngine
    from mmdata.pipeline.plan import make_or_load_plan
    from mmdata.storage import OutputDir

    corpus = _corpus(tmp_path / "in", n=5)
    (corpus / "p0_1.jpg").write_bytes((corpus / "p0.jpg").read_bytes())  # names that need key work
    (corpus / "x  y__.jpg").write_bytes((corpus / "p1.jpg").read_bytes())
    plans = []
    for name in ("worker", "here"):
        config = load_config(input=str(corpus), out=str(tmp_path / name), workers=2, samples_per_shard=2,
                             progress=False)
        out = OutputDir(config.out)
        out.ensure_writable()
        if name == "here":
            plans.append(make_or_load_plan(config, out)[0])
            continue
        engine = LocalEngine(config)
        pool = engine._new_pool(1)  # the engine's own pool (its initializer), one worker: both calls land there
        try:
            plans.append(pool.submit(partial(make_or_load_plan, config, out)).result(timeout=300)[0])
            loaded = set(pool.submit(eval, "sorted(__import__('sys').modules)").result(timeout=300))
        finally:
            pool.shutdown()
        assert "mmdata.pipeline.plan" in loaded and "pandas" not in loaded
    assert [(u.name, u.n_records, u.digest) for u in plans[0]] == [(u.name, u.n_records, u.digest) for u in plans[1]]
    assert (tmp_path / "worker" / "plan.parquet").read_bytes() == (tmp_path / "here" / "plan.parquet").read_bytes()


def test_workers_are_forked_only_where_it_is_safe(monkeypatch):
    import threading

    from mmdata.engines.local import start_method

    monkeypatch.delenv("MMDATA_START_METHOD", raising=False)
    alone = threading.active_count() == 1 and "torch" not in sys.modules
    assert start_method() == ("fork" if alone and sys.platform.startswith("linux") else "spawn")
    release = threading.Event()
    thread = threading.Thread(target=release.wait, args=(60,), daemon=True)
    thread.start()
    try:
        assert start_method() == "spawn"  # another thread's locks would be copied mid-use
    finally:
        release.set()
        thread.join(60)
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch") or sys)  # CUDA cannot be forked
    assert start_method() == "spawn"
    monkeypatch.setenv("MMDATA_START_METHOD", "fork")
    assert start_method() == "fork"


FORKED = """
import json, sys
from mmdata.build import build
from mmdata.config import load_config
import mmdata.engines.local as local
used, new_pool = [], local.LocalEngine._new_pool
def recorded(self, n):
    pool = new_pool(self, n)
    used.append(pool._mp_context.get_start_method())
    return pool
local.LocalEngine._new_pool = recorded
m = build(load_config(input=sys.argv[1], out=sys.argv[2], workers=2, samples_per_shard=2, progress=False))
print(json.dumps({"method": used, "written": m["counts"]["written"]}))
"""


def test_forked_and_spawned_workers_write_the_same_bytes(tmp_path):
    corpus = _corpus(tmp_path / "in", n=5)
    methods = {}
    for method in ("", "spawn"):
        env = {**os.environ, "MMDATA_START_METHOD": method}
        res = subprocess.run([sys.executable, "-c", FORKED, str(corpus), str(tmp_path / (method or "default"))],
                             check=False, capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr
        facts = json.loads(res.stdout.strip().splitlines()[-1])
        assert facts["written"] == 5
        methods[method] = facts["method"]
    assert methods == {"": ["fork" if sys.platform.startswith("linux") else "spawn"], "spawn": ["spawn"]}
    for name in ("00000.tar", "00001.tar", "00002.tar", "00000.parquet", "00002.parquet"):
        assert (tmp_path / "default" / "shards" / name).read_bytes() == (tmp_path / "spawn" / "shards" / name).read_bytes()
