"""The index under a memory budget: what is chosen always fits (file and RAM), the recall it reports is
the recall of the written file, and every rung that merges gives the single-process bytes when built
in parts."""
from __future__ import annotations

import os

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from mmdata.index import (  # noqa: E402
    EmbeddingSource,
    add_partial,
    build_index,
    finalize_index,
    load_index,
    merge_partials,
    search,
    train_index,
)
from mmdata.index.choose import (  # noqa: E402
    GiB,
    candidate_keys,
    candidates,
    choose_index,
    estimate_index_bytes,
    estimate_ram_bytes,
    is_mergeable,
    parse_index_key,
)
from mmdata.index.evaluate import QUERY_STREAM  # noqa: E402
from mmdata.index.sources import sample_positions  # noqa: E402


def clustered(n: int, dim: int, *, n_clusters: int = 50, rank: int = 6, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``n_clusters`` centres, each spread over its own low-rank subspace (float16)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, n_clusters, n)
    bases = rng.standard_normal((n_clusters, rank, dim)).astype(np.float32)
    x = centres[labels] + 0.6 / np.sqrt(dim) * np.einsum("nr,nrd->nd", rng.standard_normal((n, rank)), bases[labels])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def write_sources(folder, x: np.ndarray, n_files: int) -> tuple[list[EmbeddingSource], np.ndarray]:
    ids = np.random.default_rng(7).permutation(len(x)).astype(np.int64) * 1_000_003 - 10**9
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for i, rows in enumerate(np.array_split(np.arange(len(x)), n_files)):
        np.save(folder / f"{i}.npy", x[rows])
        sources.append(EmbeddingSource(str(folder / f"{i}.npy"), ids[rows]))
    return sources, ids


# --- the budget, over a grid: pure arithmetic, every candidate ------------------------------------

@pytest.mark.parametrize("dim", [64, 384, 512, 768, 1024])
@pytest.mark.parametrize("n", [20_000, 300_000, 1_000_000, 30_000_000, 400_000_000])
def test_every_candidate_and_the_choice_fit_the_budget(n, dim):
    tried = 0
    for memory_gb in (0.01, 0.1, 0.4, 2.0, 16.0, 128.0):
        budget = memory_gb * GiB
        try:
            found = candidates(n, dim, memory_gb)
        except ValueError as exc:  # nothing fits: said so, with the size that would
            assert "raise memory_gb" in str(exc)
            assert all(estimate_ram_bytes(k, n, dim) > budget for k in candidate_keys(n, dim))
            continue
        tried += 1
        for c in found:
            assert c.bytes == estimate_index_bytes(c.key, n, dim) <= budget, c
            assert c.ram_bytes == estimate_ram_bytes(c.key, n, dim) <= budget, c
            assert c.ram_bytes >= c.bytes
            parsed = parse_index_key(c.key)
            assert parsed is not None and ("pq_m" not in parsed or dim % parsed["pq_m"] == 0), c.key
        key = choose_index(n, dim, memory_gb)
        assert key == found[0].key and estimate_ram_bytes(key, n, dim) <= budget
        # a larger budget never lowers the prior expected recall of what is chosen
        assert found[0].prior_recall >= max(c.prior_recall for c in found) - 0.01
    assert tried


def test_more_budget_buys_expected_recall():
    chosen = [candidates(1_000_000, 512, gb)[0] for gb in (0.1, 0.4, 1.0, 4.0)]
    recalls = [c.prior_recall for c in chosen]
    assert recalls == sorted(recalls) and recalls[0] < recalls[-1] == 1.0
    assert [c.bytes for c in chosen] == sorted(c.bytes for c in chosen)


def test_bad_budgets_are_refused():
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="memory_gb"):
            candidates(100_000, 512, bad)
    with pytest.raises(ValueError, match="raise memory_gb"):
        choose_index(1_000_000_000, 1024, 0.5)
    with pytest.raises(ValueError):
        choose_index(0, 512, 1.0)


# --- real builds: the written file fits, and its recall is the reported one ------------------------

def remeasured_recall(index, x: np.ndarray, ids: np.ndarray, infos: dict) -> float:
    """Leave-one-out recall@10 of the written index on the held-out half of the build's queries,
    against a brute-force numpy scan (independent of the code under test)."""
    positions = sample_positions(len(x), 1000, infos["seed"], QUERY_STREAM)
    held = positions[infos["n_tune_queries"]:]
    assert len(held) == infos["n_queries"]
    xf = x.astype(np.float32)
    q = xf[held]
    scores = q @ xf.T
    scores[np.arange(len(held)), held] = -np.inf  # leave-one-out
    kth = -np.sort(-scores, axis=1)[:, 9:10]  # the 10th best exact score
    truth = ids[np.argsort(-scores, axis=1, kind="stable")[:, :10]]
    found = search(index, q, 11)[1]
    found = np.array([[i for i in row if i != own][:10] for row, own in zip(found, ids[held])])
    # tie-aware, as documented: a found id whose exact score ties the 10th best counts too
    position = {int(i): r for r, i in enumerate(ids)}
    found_scores = np.array([[scores[j, position[int(i)]] for i in row] for j, row in enumerate(found)])
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2) | (found_scores >= kth - 1e-5 * np.maximum(1, np.abs(kth)))
    return float(hits.mean())


@pytest.mark.parametrize("n, dim, memory_gb", [(12_000, 32, 0.0009), (12_000, 32, 0.0005), (11_000, 48, 0.0008)])
def test_the_written_index_fits_and_reports_its_own_recall(tmp_path, n, dim, memory_gb):
    x = clustered(n, dim, seed=dim)
    sources, ids = write_sources(tmp_path / "emb", x, 3)
    path = str(tmp_path / "chosen.index")
    infos = build_index(sources, path, memory_gb=memory_gb, recall_target=0.9)
    budget = memory_gb * GiB
    assert infos["choice"]["method"] == "measured" and infos["choice"]["chosen"] == infos["index_key"]
    assert os.path.getsize(path) == infos["size_bytes"] <= infos["estimated_bytes"] <= budget
    assert infos["estimated_ram_bytes"] <= budget and infos["within_budget"]
    # the chosen candidate had the best estimate, up to the tie margin
    estimates = [c["estimated_recall_at_10"] for c in infos["choice"]["candidates"] if "skipped" not in c]
    assert infos["choice"]["candidates"][0]["estimated_recall_at_10"] >= max(estimates) - 0.01
    for field in ("choose_seconds", "train_seconds", "add_seconds", "tune_seconds"):
        assert infos[field] >= 0
    index = load_index(path, infos)
    assert index.ntotal == n
    assert remeasured_recall(index, x, ids, infos) == pytest.approx(infos["recall_at_10"], abs=1e-4)


# --- distributed: every mergeable rung merges to the single-process bytes ---------------------------

RUNGS = ["IVF16,SQ4", "IVF16,SQ8,Refine(Flat)", "IVF16,PQ4np,Refine(SQ8)", "OPQ4_32,IVF16,PQ4np", "IVF16_HNSW8,SQ8"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    x = clustered(10_000, 32, seed=3)
    return (x, *write_sources(tmp_path_factory.mktemp("emb"), x, 4))


@pytest.mark.parametrize("key", RUNGS)
def test_every_mergeable_rung_builds_the_same_bytes_in_parts(small, tmp_path, key):
    x, sources, ids = small
    assert is_mergeable(key)
    single = str(tmp_path / "single.index")
    infos = build_index(sources, single, index_key=key, recall_target=0.9)
    trained = str(tmp_path / "trained.index")
    train_infos = train_index(sources, trained, index_key=key)
    parts = [add_partial(trained, sources[i:j], str(tmp_path / f"p{i}.index")) for i, j in ((0, 1), (1, 3), (3, 4))]
    merged = str(tmp_path / "merged.index")
    merge_infos = merge_partials(trained, [p["path"] for p in parts], merged)
    dist = finalize_index(merged, sources, train_infos=train_infos, partial_infos=parts, merge_infos=merge_infos,
                          recall_target=0.9)
    with open(single, "rb") as a, open(merged, "rb") as b:
        assert a.read() == b.read(), key
    assert dist["recall_at_10"] == infos["recall_at_10"] and dist["search_params"] == infos["search_params"]
    found = search(load_index(merged, dist), x[:50].astype(np.float32), 1)[1][:, 0]
    assert np.isin(found, ids).all() and infos["recall_at_10"] > 0.3


@pytest.mark.parametrize("key", ["HNSW16", "IVF16,PQ16x4fs", "IVF16,PQ8x4fs,Refine(SQ8)"])
def test_rungs_that_do_not_merge_are_built_in_one_place(small, tmp_path, key):
    _, sources, _ = small
    assert not is_mergeable(key)
    with pytest.raises(ValueError, match="cannot be merged"):
        train_index(sources, str(tmp_path / "t.index"), index_key=key)
    infos = build_index(sources, str(tmp_path / "h.index"), index_key=key, recall_target=0.9)
    assert infos["mergeable"] is False and infos["n"] == sum(len(s.ids) for s in sources)
    # a distributed choice leaves them out
    assert all(c.mergeable for c in candidates(300_000, 512, 0.1, mergeable_only=True))
