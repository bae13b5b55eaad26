"""Issue 16 (the first hour): tie-aware recall, stable tie order, verify messages, resume messages."""
from __future__ import annotations

import glob

import numpy as np
import pytest
from conftest import run_build

faiss = pytest.importorskip("faiss")

from mmdata.index import EmbeddingSource, build_index, recall_at
from mmdata.index.evaluate import exact_scorer
from mmdata.index.sources import validate_sources


def duplicated(n_distinct: int, copies: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors, each repeated ``copies`` times (exact duplicates, as a scraped corpus has)."""
    x = np.random.default_rng(seed).standard_normal((n_distinct, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.repeat(x, copies, axis=0)


def save(folder, x: np.ndarray, n_files: int = 2) -> list[EmbeddingSource]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.arange(len(x), dtype=np.int64) * 7 + 3  # ids are not row positions
    sources = []
    for i, rows in enumerate(np.array_split(np.arange(len(x)), n_files)):
        np.save(folder / f"{i}.npy", x[rows])
        sources.append(EmbeddingSource(str(folder / f"{i}.npy"), ids[rows]))
    return sources


# --- item 9: tie-aware recall ----------------------------------------------------------------------

def test_flat_index_over_exact_duplicates_reports_recall_one_and_reached(tmp_path):
    x = duplicated(150, 12, 16)  # 12 copies: the exact top-10 is any 10 of 11 equal neighbours
    sources = save(tmp_path / "emb", x)
    infos = build_index(sources, str(tmp_path / "flat.index"), index_key="Flat", recall_target=0.99)
    assert infos["recall_at_1"] == 1.0 and infos["recall_at_10"] == 1.0
    assert infos["recall_target_reached"] is True


def test_recall_target_reached_agrees_with_the_reported_number(tmp_path):
    x = np.random.default_rng(1).standard_normal((4000, 16)).astype(np.float32)
    sources = save(tmp_path / "emb", x)
    # a target no IVF with few probes reaches on the held-out half, or one it always reaches
    for target in (0.999999, 0.05):
        infos = build_index(sources, str(tmp_path / "ivf.index"), index_key="IVF32,Flat", recall_target=target)
        assert infos["recall_target_reached"] == (infos["recall_at_10"] >= target)


def test_tie_aware_recall_does_not_credit_wrong_answers(tmp_path):
    x = duplicated(50, 3, 8)
    sources = save(tmp_path / "emb", x)
    corpus = validate_sources(sources)
    ids = np.concatenate([s.ids for s in sources])
    q = x[:3]  # three copies of one vector
    scores = q @ x.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    truth, truth_scores = ids[order], np.take_along_axis(scores, order, axis=1)
    assert (truth == ids[[0, 1]]).all()
    score = exact_scorer(corpus)
    # answers that pick the other copy of the same vector are correct
    other_copies = ids[[[2, 1]] * 3]
    assert recall_at(other_copies, truth, 2, score(q, other_copies), truth_scores) == 1.0
    # without scores, the id overlap (tie-sensitive) is what is measured
    assert recall_at(other_copies, truth, 2) == 0.5
    # far vectors are not correct, whatever their ids, and -1 (no result) never is
    far = ids[np.argsort(scores, axis=1)[:, :2]]
    assert recall_at(far, truth, 2, score(q, far), truth_scores) == 0.0
    near_and_far = np.stack([other_copies[:, 0], far[:, 0]], axis=1)
    assert recall_at(near_and_far, truth, 2, score(q, near_and_far), truth_scores) == 0.5
    missing = np.full((3, 2), -1, dtype=np.int64)
    assert recall_at(missing, truth, 2, score(q, missing), truth_scores) == 0.0


# --- item 10: equal scores come back by id, the same for every k ------------------------------------

def test_order_ties_by_id_groups_equal_scores():
    from mmdata.search import order_ties_by_id

    pairs = [(0.5, 9), (0.9, 7), (0.9 + 1e-9, 3), (0.9, 5), (0.1, 1), (0.5, 2)]
    assert [i for _, i in order_ties_by_id(pairs)] == [3, 5, 7, 2, 9, 1]
    assert order_ties_by_id([]) == []


@pytest.fixture(scope="module")
def copies_built(big_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("copies")
    run_build(big_corpus, out, workers=1, model="mmdata-tiny", pretrained="random", embed_batch_size=16)
    return str(out)


def test_search_with_identical_copies_is_stable_across_k(copies_built):
    from mmdata.search import Retriever

    r = Retriever(copies_built)
    files = sorted(glob.glob(f"{copies_built}/embeddings/image/*.npy"))
    emb = np.concatenate([np.load(p) for p in files]).astype(np.float32)
    emb = emb[np.linalg.norm(emb, axis=1) > 0]
    # a vector with several identical copies in the index
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    same = (unit @ unit.T >= 1 - 1e-6).sum(axis=1)
    query = emb[int(np.argmax(same))]
    assert same.max() >= 3
    for small, large in ((1, 2), (2, 5), (3, 10)):
        a = [h.id for h in r.search_embedding(query, k=small)]
        b = [h.id for h in r.search_embedding(query, k=large)]
        assert a == b[:small]
    top = r.search_embedding(query, k=int(same.max()))
    assert [h.id for h in top] == sorted(h.id for h in top)  # all tied: by ascending id
    assert [h.rank for h in top] == list(range(1, len(top) + 1))


# --- item 8: verify of a bad path, verify's counts, one error prefix --------------------------------

def mmdata_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mmdata", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=300)


def test_verify_of_a_missing_or_foreign_folder_is_one_error_line_exit_2(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    for path, fragment in ((tmp_path / "nope", "no such folder"), (tmp_path / "notes", "not an mmdata output")):
        res = mmdata_cli("verify", path)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0].startswith("error: ") and fragment in lines[0] and str(path) in lines[0]
        assert "MISMATCH" not in res.stderr and res.stdout == ""


def test_verify_prints_the_counts_it_checked_and_mismatch_exits_1(copies_built, tmp_path):
    import json
    import re
    import shutil

    res = mmdata_cli("verify", copies_built)
    assert res.returncode == 0, res.stderr
    with open(f"{copies_built}/shards/sizes.json") as f:
        sizes = json.load(f)
    with open(f"{copies_built}/manifest.json") as f:
        c = json.load(f)["counts"]
    m = re.search(r"ok: (\d+) shards, (\d+) samples; (\d+) records = (\d+) written \+ (\d+) filtered \+ (\d+) failed",
                  res.stdout)
    assert m, res.stdout
    assert [int(g) for g in m.groups()] == [len(sizes), sum(sizes.values()), c["inputs"], c["written"],
                                            c["filtered"], c["failed"]]
    assert "embedding files (image, text)" in res.stdout
    # a damaged output still lists its mismatches and exits 1
    broken = tmp_path / "broken"
    shutil.copytree(copies_built, broken)
    (broken / "shards" / min(sizes)).unlink()
    res = mmdata_cli("verify", broken)
    assert res.returncode == 1 and "MISMATCH" in res.stderr and "missing" in res.stderr


def test_click_usage_errors_use_the_same_error_prefix():
    for args, fragment in ((("build", "--no-such-flag"), "--no-such-flag"), (("build", "--workers", "x"), "--workers"),
                           (("no-such-command",), "no-such-command"), (("verify",), "out")):
        res = mmdata_cli(*args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0].startswith("error: ") and fragment in lines[0] and "--help" in lines[0]
        assert "Error" not in res.stderr and "Traceback" not in res.stderr


# --- item 7: a resume with another config names what changed ----------------------------------------

def test_config_mismatch_names_the_changed_fields_and_the_ways_out(corpus, tmp_path):

    from mmdata.errors import UserError

    out = tmp_path / "o"
    run_build(corpus[0], out, workers=1, image_size=128)
    with pytest.raises(UserError) as err:
        run_build(corpus[0], out, workers=2, image_size=64, image_format="png")
    message = str(err.value)
    assert "image_size: 128 → 64" in message and 'image_format: "jpg" → "png"' in message
    assert "workers" not in message  # runtime fields do not count
    assert "same settings" in message and "--overwrite" in message and "--out" in message
    assert "\n" not in message
    # the same config resumes; --overwrite rebuilds with the new one
    run_build(corpus[0], out, workers=2, image_size=128)
    assert run_build(corpus[0], out, workers=1, image_size=64, overwrite=True)["config"]["image_size"] == 64


def test_config_mismatch_through_the_cli_is_one_error_line(corpus, tmp_path):
    out = tmp_path / "o"
    first = mmdata_cli("build", "-i", corpus[0], "-o", out, "--workers", "1", "--no-progress", "--image-size", "96")
    assert first.returncode == 0, first.stderr
    res = mmdata_cli("build", "-i", corpus[0], "-o", out, "--workers", "1", "--no-progress", "--image-size", "80")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "image_size: 96 → 80" in lines[0]


# --- item 6: a resumed build says what it skipped and counts only this run's work ------------------

def test_resumed_build_reports_skipped_units_and_only_this_runs_counts(corpus, tmp_path):
    import json
    import os

    out = tmp_path / "o"
    first = run_build(corpus[0], out, workers=1)
    n_units = first["units"]
    assert n_units >= 3 and first["run"] == {"units_skipped": 0, "units_built": n_units,
                                             "records": first["records"], "counts": first["counts"]}
    again = run_build(corpus[0], out, workers=1)
    assert again["run"]["units_skipped"] == n_units and again["run"]["units_built"] == 0
    assert again["run"]["records"] == 0 and set(again["run"]["counts"].values()) == {0}
    assert again["counts"] == first["counts"]  # the output as a whole is unchanged
    # one unit lost its commit: only it is built again, and only its rows are this run's
    with open(out / "shards" / "00001_stats.json") as f:
        unit_counts = json.load(f)["counts"]
    os.remove(out / "shards" / "00001_stats.json")
    partial = run_build(corpus[0], out, workers=1)
    assert partial["run"]["units_skipped"] == n_units - 1 and partial["run"]["units_built"] == 1
    assert partial["run"]["counts"] == {k: unit_counts[k] for k in ("inputs", "written", "filtered", "failed")}
    assert partial["counts"] == first["counts"]


def test_resumed_build_through_the_cli_says_units_skipped(corpus, tmp_path):
    out = tmp_path / "o"
    args = ("build", "-i", corpus[0], "-o", out, "--workers", "1", "--samples-per-shard", "8")
    first = mmdata_cli(*args, "--no-progress")
    assert first.returncode == 0 and "already committed" not in first.stdout + first.stderr, first.stderr
    total = first.stdout.splitlines()[0].split(" in ")[0]  # "N records: W written, F filtered, X failed"
    res = mmdata_cli(*args)  # with the progress display
    assert res.returncode == 0, res.stderr
    n_units = len(list((out / "shards").glob("*.tar")))
    assert f"resuming {out}: {n_units} of {n_units} units already committed, skipped" in res.stderr
    assert "build:" not in res.stderr  # no progress bar for no work
    lines = res.stdout.splitlines()
    assert lines[0] == f"resumed: {n_units} of {n_units} units already committed, skipped"
    assert lines[1].startswith("this run: 0 records: 0 written, 0 filtered, 0 failed in ")
    assert lines[2] == f"in total: {total}"
