"""Pick a FAISS index type from the corpus size, the dimension and a memory budget.

Pure arithmetic, no faiss import: the choice can be planned (and unit-tested) anywhere.

The ladder, first rung that fits ``BUDGET_FRACTION * memory_gb`` GiB wins:

1. ``Flat`` (exact, wrapped in ``IDMap``) when ``n < FLAT_MAX_N``. Below ~50k vectors an exact
   scan costs a few ms per query even at dim 512, and recall is 1 by construction.
2. ``IVF{nlist},Flat`` when ``n < LARGE_N``: full-precision vectors, only the coarse step
   approximates, so the recall target is reached with a small ``nprobe``.
3. ``IVF{nlist},SQ8`` when ``n < LARGE_N``: 1 byte per dimension (4x smaller) at a recall close
   to IVF-Flat's.
4. ``IVF{nlist},PQ{m}np`` with the largest ``m`` (bytes per vector) that fits. Also the rung for
   ``n >= LARGE_N``, where scanning full vectors per probe is too slow whatever the memory.
   ``np``: no polysemous training, which only serves Hamming-filtered search and is slow.

OPQ is supported when forced (``index_key="OPQ64_512,IVF4096,PQ64np"``) but not chosen: its
training re-trains the PQ ~240 times (50 rounds), which on a few CPU cores dominates the whole
build (measured: 10x the IVF-PQ training at equal size).

HNSW is never chosen automatically: a multi-threaded HNSW build is not reproducible byte for
byte, it cannot be merged from partial builds (distributed engines), and it costs far more to
build than IVF at equal recall on few cores. It can still be forced (``index_key="HNSW32,Flat"``)
in a single-process build.

``nlist`` is ``4 * sqrt(n)`` rounded to a power of two (the FAISS guideline is 4..16 sqrt(n)),
capped so that each centroid gets at least ``MIN_POINTS_PER_CENTROID`` training vectors from the
bounded training sample (k-means quality; FAISS warns below 39).
"""
from __future__ import annotations

import math
import re

GiB = 2**30

FLAT_MAX_N = 50_000
LARGE_N = 10_000_000
# Share of memory_gb the index itself may take. The build peaks above the index: the training
# sample (<= max_train_vectors * dim * 4 bytes), one 64 MiB chunk, and allocator slack while the
# inverted lists grow (bench/index_build.py, 1M x 512 IVF-Flat: peak RSS 1.5x the index).
BUDGET_FRACTION = 0.6
DEFAULT_MAX_TRAIN_VECTORS = 100_000
MIN_POINTS_PER_CENTROID = 39
MIN_NLIST = 16
MAX_NLIST = 65_536
PQ_NBITS = 8
PQ_KSUB = 2**PQ_NBITS
# Bytes per PQ code that GPU IVF-PQ supports, so a CPU choice also builds on a GPU.
PQ_M_CHOICES = (96, 64, 56, 48, 40, 32, 28, 24, 20, 16, 12, 8)  # below 8 bytes recall collapses
HNSW_DEFAULT_M = 32

ID_BYTES = 8  # int64 id per vector (IDMap's id_map or the IVF lists' ids)
LIST_OVERHEAD_BYTES = 48  # two std::vector headers per inverted list
HEADER_BYTES = 4096  # file headers, quantizer and wrapper fields

_KEY = re.compile(
    r"^(?:OPQ(?P<opq_m>\d+)(?:_(?P<opq_d>\d+))?,)?"
    r"(?:(?P<flat>Flat)"
    r"|HNSW(?P<hnsw_m>\d+)(?:,Flat)?"
    r"|IVF(?P<nlist>\d+),(?:(?P<ivf_flat>Flat)|(?P<sq8>SQ8)|PQ(?P<pq_m>\d+)(?:x8)?(?:np)?))$"
)


def parse_index_key(index_key: str) -> dict | None:
    """Split a factory string of the kinds this module builds; None for anything else."""
    match = _KEY.match(index_key.strip())
    if match is None:
        return None
    g = match.groupdict()
    out: dict = {"opq_m": int(g["opq_m"]) if g["opq_m"] else None}
    out["opq_d"] = int(g["opq_d"]) if g["opq_d"] else None
    if g["flat"]:
        out["kind"] = "flat"
    elif g["hnsw_m"]:
        out.update(kind="hnsw", hnsw_m=int(g["hnsw_m"]))
    else:
        out["nlist"] = int(g["nlist"])
        if g["ivf_flat"]:
            out["kind"] = "ivf_flat"
        elif g["sq8"]:
            out["kind"] = "ivf_sq8"
        else:
            out.update(kind="ivf_pq", pq_m=int(g["pq_m"]))
    return out


def is_mergeable(index_key: str) -> bool:
    """Whether partial indexes of this type can be merged (``merge_from``): Flat and IVF."""
    parsed = parse_index_key(index_key)
    if parsed is not None:
        return parsed["kind"] != "hnsw"
    parts = index_key.upper().replace(" ", "").split(",")
    graph = any(p.startswith(("HNSW", "NSG", "NNDESCENT", "CAGRA")) for p in parts)
    return not graph and any(p.startswith("IVF") or p == "FLAT" for p in parts)


def is_ivf(index_key: str) -> bool:
    """Whether ``index_key`` is an inverted-file index (the kind a distributed build pays off for)."""
    parsed = parse_index_key(index_key)
    if parsed is not None:
        return parsed["kind"].startswith("ivf")
    return any(p.startswith("IVF") for p in index_key.upper().replace(" ", "").split(","))


def estimate_index_bytes(index_key: str, n: int, dim: int) -> int | None:
    """Estimated in-memory (and on-disk) size of the index holding ``n`` vectors with ids.

    None for a factory string this module does not parse.
    """
    p = parse_index_key(index_key)
    if p is None:
        return None
    d_in = p["opq_d"] or dim
    fixed = HEADER_BYTES + (4 * dim * d_in if p["opq_m"] else 0)  # + OPQ rotation matrix
    kind = p["kind"]
    if kind == "flat":
        return fixed + n * (4 * d_in + ID_BYTES)
    if kind == "hnsw":
        m = p["hnsw_m"]
        # level 0 holds 2M links, upper levels ~1 more per node; levels (int32) + offsets (size_t)
        return fixed + n * (4 * d_in + ID_BYTES + 4 * (2 * m + 1) + 12)
    nlist = p["nlist"]
    fixed += nlist * (4 * d_in + LIST_OVERHEAD_BYTES)  # centroids + list headers
    if kind == "ivf_flat":
        return fixed + n * (4 * d_in + ID_BYTES)
    if kind == "ivf_sq8":
        return fixed + 2 * 4 * d_in + n * (d_in + ID_BYTES)
    m = p["pq_m"]
    return fixed + PQ_KSUB * d_in * 4 + n * (m * PQ_NBITS // 8 + ID_BYTES)


def choose_nlist(n: int, max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS) -> int:
    """Number of IVF lists: ~4 sqrt(n) as a power of two, bounded by the training sample."""
    n_train = min(n, max_train_vectors)
    want = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    cap = 2 ** int(math.floor(math.log2(max(1, n_train // MIN_POINTS_PER_CENTROID))))
    return int(max(1, min(want, cap, MAX_NLIST), min(MIN_NLIST, cap)))


def candidate_keys(n: int, dim: int, max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS) -> list[str]:
    """The ladder for this corpus, most accurate first (before the memory budget is applied)."""
    if n <= 0 or dim <= 0:
        raise ValueError(f"need n > 0 and dim > 0, got n={n}, dim={dim}")
    nlist = choose_nlist(n, max_train_vectors)
    keys = []
    if n < FLAT_MAX_N:
        keys.append("Flat")
    # IVF needs a useful number of lists; PQ needs enough vectors to train its 256-entry codebooks.
    if n < LARGE_N and nlist >= MIN_NLIST:
        keys += [f"IVF{nlist},Flat", f"IVF{nlist},SQ8"]
    if min(n, max_train_vectors) >= MIN_POINTS_PER_CENTROID * PQ_KSUB and nlist >= MIN_NLIST:
        keys += [f"IVF{nlist},PQ{m}np" for m in PQ_M_CHOICES if dim % m == 0 and m <= dim // 2]
    if not keys:
        keys.append("Flat")
    return keys


def choose_index(
    n: int, dim: int, memory_gb: float, *, max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS
) -> str:
    """The FAISS factory string for ``n`` vectors of ``dim`` under ``memory_gb`` GiB.

    Raises ValueError when even the most compressed candidate does not fit.
    """
    if memory_gb <= 0:
        raise ValueError(f"memory_gb must be > 0, got {memory_gb}")
    budget = BUDGET_FRACTION * memory_gb * GiB
    keys = candidate_keys(n, dim, max_train_vectors)
    for key in keys:
        if estimate_index_bytes(key, n, dim) <= budget:
            return key
    smallest = min(estimate_index_bytes(k, n, dim) for k in keys)
    raise ValueError(
        f"no index for n={n}, dim={dim} fits memory_gb={memory_gb}: the smallest candidate "
        f"needs ~{smallest / GiB / BUDGET_FRACTION:.3f} GiB; raise memory_gb"
    )
