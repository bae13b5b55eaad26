"""The cluster engines: one corpus built by the local engine (1 and 2 workers), by Dask and by Beam gives
byte-identical output, indexes and search results (the cluster builds fill the index on the engine); a Dask
worker killed mid-unit and a Beam bundle that dies after a partial write change nothing; bad cluster options
fail with one line and exit 2."""
import glob
import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import run_build

import mmdata.build
import mmdata.engines.beam_transforms as beam_transforms
from mmdata.config import load_config
from mmdata.errors import UserError
from mmdata.pipeline.plan import cut_units, list_records
from mmdata.search import Retriever
from mmdata.tools.verify import verify_output

MMDATA = [sys.executable, "-m", "mmdata"]
BEAM_BUILD = [sys.executable, "-m", "pipelines.beam_build"]
TESTS = os.path.dirname(os.path.abspath(__file__))

# What must be byte-identical whatever the engine (globs relative to the output folder).
OUTPUTS = ("shards/*.tar", "shards/*.parquet", "shards/sizes.json", "embeddings/**/*.npy")
INDEX_OUTPUTS = ("index/ids.parquet", "index/*.index")
# The build every engine runs: tokens and embeddings (tiny open_clip model, random weights) included, so
# the tokenizer and the model are loaded in every worker process. The index type is forced to an IVF (the
# corpus is small enough for an exact Flat index): the local build with 1 worker builds it in one process,
# Dask and Beam (index_distributed auto) and local with 2 workers (on) train it on the driver, add each group
# of units on the engine and merge.
BUILD = dict(samples_per_shard=8, tokenize=True, model="mmdata-tiny", pretrained="random", index_key="IVF4,Flat")


def digests(out, patterns=OUTPUTS) -> dict:
    files = sorted(f for pattern in patterns for f in glob.glob(os.path.join(str(out), pattern), recursive=True))
    return {os.path.relpath(f, out): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}


def neighbours(out, keys) -> dict:
    """Every sample's top 5 neighbours (key, score) in the image and the text index."""
    r = Retriever(str(out))
    return {(m, key): [(h.key, h.score) for h in r.search_key(key, 5, m)] for m in ("image", "text") for key in keys}


def leftovers(out) -> list:
    return glob.glob(f"{out}/**/*.tmp-*", recursive=True)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The corpus built by the local engine in one process: what every engine must reproduce."""
    out = tmp_path_factory.mktemp("local1")
    manifest = run_build(corpus[0], out, workers=1, **BUILD)
    return str(out), manifest


def test_config_and_units_pickle_for_dask_and_beam(corpus):
    from apache_beam.internal import pickler
    from distributed.protocol.pickle import dumps, loads

    config = load_config(input=corpus[0], out="/tmp/x", engine="beam", beam_options=["runner=FnApiRunner"])
    unit = cut_units(list_records(config), 8)[1]
    for obj in (config, unit):
        assert loads(dumps(obj)) == obj and pickle.loads(pickle.dumps(obj)) == obj
        for library in ("cloudpickle", "dill"):
            pickler.set_library(library)
            try:
                assert pickler.loads(pickler.dumps(obj)) == obj
            finally:
                pickler.set_library(pickler.DEFAULT_PICKLE_LIB)
    assert loads(dumps(config)).config_hash == config.config_hash


def test_local_dask_and_beam_builds_are_byte_identical(corpus, reference, tmp_path, monkeypatch):
    ref_out, ref_manifest = reference
    engines = []
    get_engine = mmdata.build.get_engine
    monkeypatch.setattr(mmdata.build, "get_engine", lambda config: engines.append(get_engine(config)) or engines[-1])
    expected, expected_index = digests(ref_out), digests(ref_out, INDEX_OUTPUTS)
    assert len([f for f in expected if f.endswith(".tar")]) == ref_manifest["units"] >= 4
    assert len([f for f in expected if f.startswith("embeddings")]) == 2 * ref_manifest["units"]  # image, text
    assert sorted(expected_index) == ["index/ids.parquet", "index/image.index", "index/text.index"]
    assert {m: i["index_key"] for m, i in ref_manifest["index"].items()} == {"image": "IVF4,Flat", "text": "IVF4,Flat"}
    keys = [r["key"] for r in pq.read_table(f"{ref_out}/index/ids.parquet").to_pylist()]
    expected_hits = neighbours(ref_out, keys)
    assert len(keys) == ref_manifest["counts"]["written"] and all(len(h) == 5 for h in expected_hits.values())
    ref_infos = json.load(open(f"{ref_out}/index/index_infos.json"))
    assert not any(i.get("distributed") for i in ref_infos.values())
    for name, kw in {"local2": dict(workers=2, index_distributed="on"),
                     "dask": dict(engine="dask", workers=2, dask_gpu_resource="GPU"),
                     "beam": dict(engine="beam", workers=2)}.items():
        out = tmp_path / name
        manifest = run_build(corpus[0], out, **kw, **BUILD)
        assert digests(out) == expected, name
        assert manifest["counts"] == ref_manifest["counts"] and manifest["reasons"] == ref_manifest["reasons"], name
        assert verify_output(str(out)) == [], name
        # the index, filled on the engine in parts and merged in unit order: the same ids, bytes and neighbours
        assert digests(out, INDEX_OUTPUTS) == expected_index, name
        assert manifest["index"] == ref_manifest["index"], name
        infos = json.load(open(out / "index" / "index_infos.json"))
        for modality, info in infos.items():
            assert info["distributed"] and info["n_partials"] >= 2, (name, modality, info)
            assert info["search_params"] == ref_infos[modality]["search_params"], name
        assert neighbours(out, keys) == expected_hits, name
        assert not os.path.exists(out / "index" / "parts") and not glob.glob(f"{out}/.mmdata-tasks*"), name
    counters = engines[-1].counters  # Beam's metrics account for every record, by status and by reason
    c = ref_manifest["counts"]
    assert (counters["written"], counters["filtered"], counters["failed"]) == (c["written"], c["filtered"], c["failed"])
    assert counters["units_run"] == ref_manifest["units"]
    assert counters["tasks_run"] == sum(i["n_partials"] for i in infos.values())  # the index parts' pipeline
    for status in ("filtered", "failed"):
        for reason, n in ref_manifest["reasons"][status].items():
            assert counters[f"{status}:{reason}"] == n


def test_dask_worker_killed_mid_unit_changes_nothing(big_corpus, tmp_path):
    from distributed import Client, LocalCluster

    from mmdata.engines.dask import DaskEngine

    out = tmp_path / "dask"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        proc = subprocess.Popen(MMDATA + ["build", "-i", big_corpus, "-o", str(out), "--engine", "dask",
                                          "--dask-address", cluster.scheduler_address, "--samples-per-shard", "2",
                                          "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and not glob.glob(f"{out}/shards/*_stats.json") and proc.poll() is None:
                time.sleep(0.02)
            busy = {w: keys for w, keys in client.processing().items() if keys}
            assert busy, "the build must be running units"
            victim = sorted(busy)[0]
            pid = client.run(os.getpid, workers=[victim])[victim]
            committed = len(glob.glob(f"{out}/shards/*_stats.json"))
            os.kill(pid, signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        with pytest.raises(UserError, match="no worker of .* offers the resource 'GPU'"):
            DaskEngine(load_config(input=big_corpus, out=str(out), engine="dask", dask_gpu_resource="GPU",
                                   dask_address=cluster.scheduler_address))
    assert proc.returncode == 0, stderr
    manifest = json.load(open(out / "manifest.json"))
    assert 1 <= committed < manifest["units"], "the kill must land mid-run"
    clean = run_build(big_corpus, tmp_path / "clean", workers=1, samples_per_shard=2)
    assert digests(out) == digests(tmp_path / "clean")
    assert verify_output(str(out)) == [] and not leftovers(out)
    assert manifest["counts"] == clean["counts"] and manifest["reasons"] == clean["reasons"]


class FailOnceDoFn(beam_transforms.RunUnitDoFn):
    """Dies on its first attempt at unit 00001, after leaving a partial temporary tar behind."""

    def process(self, unit):
        marker = os.path.join(os.path.dirname(self.config.out), f"attempted-{unit.name}")
        if unit.index == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            with open(os.path.join(self.config.out, "shards", f"{unit.name}.tar.tmp-0123456789ab"), "wb") as fh:
                fh.write(b"half a tar")
            raise RuntimeError("injected failure after a partial write")
        yield from super().process(unit)


def test_beam_bundle_failing_after_a_partial_write_then_rerun_is_identical(corpus, tmp_path, monkeypatch):
    clean = run_build(corpus[0], tmp_path / "clean", workers=1, samples_per_shard=8)
    out = tmp_path / "beam"
    monkeypatch.setattr(beam_transforms, "RunUnitDoFn", FailOnceDoFn)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))  # workers import it
    with pytest.raises(Exception, match="injected failure"):  # the FnApiRunner does not retry a failed bundle
        run_build(corpus[0], out, engine="beam", workers=2, samples_per_shard=8)
    assert os.path.exists(tmp_path / "attempted-00001")
    assert leftovers(out) and not os.path.exists(out / "shards" / "00001_stats.json")
    assert not os.path.exists(out / "manifest.json")
    # The user runs the pipeline program again; committed units are skipped, the rest rebuilt.
    res = subprocess.run(BEAM_BUILD + ["--input", corpus[0], "--out", str(out), "--samples-per-shard", "8",
                                       "--workers", "2", "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"{clean['counts']['written']} written" in res.stdout
    assert digests(out) == digests(tmp_path / "clean")
    assert verify_output(str(out)) == [] and not leftovers(out)


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unreachable_dask_scheduler_is_one_line(corpus, tmp_path):
    res = subprocess.run(MMDATA + ["build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--engine", "dask",
                                   "--dask-address", "tcp://127.0.0.1:1"], capture_output=True, text=True)
    assert_one_line_error(res, "cannot reach Dask scheduler tcp://127.0.0.1:1")
    # quickly: timed in this process, where the imports are done (a loaded machine spends most of a
    # minute starting the command above), against Dask's own connect timeout of 30 s
    from mmdata.engines.dask import DaskEngine

    start = time.time()
    with pytest.raises(UserError, match="cannot reach Dask scheduler tcp://127.0.0.1:1"):
        DaskEngine(load_config(input=corpus[0], out=str(tmp_path / "o2"), engine="dask",
                               dask_address="tcp://127.0.0.1:1"))
    assert time.time() - start < 20


def test_a_peer_that_is_not_a_dask_scheduler_fails_quickly():
    from mmdata.engines.dask import probe_scheduler

    with socket.socket() as server:  # accepts connections, never speaks
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        start = time.time()
        with pytest.raises(UserError, match=f"cannot reach Dask scheduler {address}"):
            probe_scheduler(address, timeout=2)
        assert time.time() - start < 10


def test_unknown_beam_runner_is_one_line(corpus, tmp_path):
    res = subprocess.run(MMDATA + ["build", "-i", corpus[0], "-o", str(tmp_path / "o"), "--engine", "beam",
                                   "--beam-option", "runner=NoSuchRunner"], capture_output=True, text=True)
    assert_one_line_error(res, "unknown Beam runner 'NoSuchRunner'", "FlinkRunner")
    res = subprocess.run(BEAM_BUILD + ["--input", corpus[0], "--out", str(tmp_path / "p"), "--runner=NoSuchRunner"],
                         capture_output=True, text=True)
    assert_one_line_error(res, "unknown Beam runner 'NoSuchRunner'")


def test_beam_options_pass_through():
    from mmdata.engines.beam import beam_args

    def args(*options, workers=3):
        return beam_args(load_config(input="in", out="out", workers=workers, beam_options=list(options)))

    assert args() == ["--runner=apache_beam.runners.portability.fn_api_runner.FnApiRunner",
                      "--direct_running_mode=multi_processing", "--direct_num_workers=3"]
    assert args("runner=FlinkRunner", "flink_master=host:8081", "--environment_type", "DOCKER") == \
        ["--runner=FlinkRunner", "--flink_master=host:8081", "--environment_type", "DOCKER"]
    assert args("--runner=FnApiRunner", "direct_num_workers=5")[-2:] == \
        ["--direct_num_workers=5", "--direct_running_mode=multi_processing"]
