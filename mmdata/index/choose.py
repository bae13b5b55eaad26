"""The candidate indexes for a corpus under a memory budget, their sizes, and a prior ranking.

Pure arithmetic, no faiss import: the candidates can be listed (and unit-tested) anywhere. The
build ranks them by a measured estimate (``estimate.py``); ``choose_index`` ranks them by the
documented prior below when no data is at hand.

**Budget.** ``memory_gb`` GiB bounds the index itself: its file on disk and the RAM it takes once
loaded for search (the file's size plus the per-thread lookup tables of a search). A candidate
whose upper-bound estimate of either exceeds the budget is never considered.

**Candidates** (``candidates``), for ``nlist`` lists (``4 sqrt(n)`` as a power of two, bounded by
the training sample) with an HNSW coarse quantizer from ``HNSW_QUANTIZER_MIN_NLIST`` lists:

- ``Flat`` (exact, ``n < FLAT_MAX_N``), else ``IVF,Flat`` (exact codes): expected recall 1, chosen
  outright when they fit (no other candidate is listed then);
- ``IVF,SQ8`` and ``IVF,SQ4`` (1 and 1/2 byte per dimension);
- ``IVF,PQ{m}np``, 8-bit product quantization, with the largest ``m`` (bytes) that fits among the
  divisors of ``dim`` from 32 up to ``dim/2`` (down to 8 when nothing larger fits);
- ``OPQ{m}_{dim},IVF,PQ{m}np``: the same with a learned rotation, chosen only when it pays;
- ``IVF,PQ{m}x4fs``: 4-bit fast-scan PQ (``m/2`` bytes; SIMD scan, cheap to train), alone or as the base of
- ``IVF,…,Refine(SQ8|SQ4|Flat)``: the base returns ``REFINE_K_FACTOR * k`` candidates that finer
  codes re-rank (``IndexRefine``), when the budget holds both; the base takes from 1/16 to 1/4
  of the refine codes' bytes (it only has to bring the true neighbours into the candidates).

Within a family a larger code is always at least as accurate, so only the largest that fits is
listed. **Prior** (``prior_recall``): expected recall@10 at a high nprobe as a function of the
effective bits per dimension ``b`` of the codes that rank the final top-k:
``1 - 0.35 * 2 ** (1 - b)``, with ``b`` = 8·bytes/dim for 8-bit PQ, ×1.1 with OPQ, ×0.75 for
4-bit fast-scan PQ, ×0.6 for SQ4 (a uniform scalar grid) and 1 for SQ8 and exact codes. It only
orders the candidates; the build measures them instead (``estimate.py``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

GiB = 2**30

FLAT_MAX_N = 50_000
LARGE_N = 10_000_000
# The index itself (file and loaded RAM) must fit memory_gb; the build needs the training sample
# and one chunk on top of it (``build_extra_bytes``).
BUDGET_FRACTION = 1.0
DEFAULT_MAX_TRAIN_VECTORS = 100_000
MIN_POINTS_PER_CENTROID = 39
MIN_NLIST = 16
MAX_NLIST = 65_536
HNSW_QUANTIZER_MIN_NLIST = 16_384  # below this a flat scan of the centroids is cheap enough
HNSW_QUANTIZER_M = 32
PQ_NBITS = 8
PQ_KSUB = 2**PQ_NBITS
FS_KSUB = 16
FS_BLOCK = 32  # fast-scan lists are stored in blocks of 32 codes
MIN_PQ_M = 8  # below 8 bytes recall collapses
PREFERRED_MIN_PQ_M = 32
REFINE_K_FACTOR = 8
SEARCH_THREADS = 16  # lookup tables counted for this many search threads in the RAM estimate
HNSW_DEFAULT_M = 32

ID_BYTES = 8  # int64 id per vector (IDMap's id_map or the IVF lists' ids)
LIST_OVERHEAD_BYTES = 48  # two std::vector headers per inverted list
HEADER_BYTES = 4096  # file headers, quantizer and wrapper fields

_KEY = re.compile(
    r"^(?:OPQ(?P<opq_m>\d+)(?:_(?P<opq_d>\d+))?,)?"
    r"(?:(?P<flat>Flat)"
    r"|HNSW(?P<hnsw_m>\d+)(?:,Flat)?"
    r"|IVF(?P<nlist>\d+)(?:_HNSW(?P<hnsw_q>\d+))?,"
    r"(?:(?P<ivf_flat>Flat)|SQ(?P<sq>[48])|PQ(?P<pq_m>\d+)(?:(?P<fs>x4fs)|(?:x8)?(?:np)?))"
    r"(?:,Refine\((?P<refine>Flat|SQ8|SQ4)\))?)$"
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
        out["hnsw_q"] = int(g["hnsw_q"]) if g["hnsw_q"] else None
        out["refine"] = g["refine"]
        if g["ivf_flat"]:
            out["kind"] = "ivf_flat"
        elif g["sq"]:
            out["kind"] = f"ivf_sq{g['sq']}"
        elif g["fs"]:
            out.update(kind="ivf_pq4fs", pq_m=int(g["pq_m"]))
        else:
            out.update(kind="ivf_pq", pq_m=int(g["pq_m"]))
    return out


def is_mergeable(index_key: str) -> bool:
    """Whether partial indexes of this type merge into the single-process bytes: Flat and IVF (also
    under OPQ, with an HNSW coarse quantizer or a refine step); not an HNSW graph, and not 4-bit
    fast-scan lists (faiss merges their packed blocks into a different layout)."""
    parsed = parse_index_key(index_key)
    if parsed is not None:
        return parsed["kind"] not in ("hnsw", "ivf_pq4fs")
    parts = index_key.upper().replace(" ", "").split(",")
    graph = any(p.startswith(("HNSW", "NSG", "NNDESCENT", "CAGRA")) for p in parts)
    fast_scan = any(p.endswith(("FS", "FSR")) for p in parts)
    return not graph and not fast_scan and any(p.startswith("IVF") or p == "FLAT" for p in parts)


def is_ivf(index_key: str) -> bool:
    """Whether ``index_key`` is an inverted-file index (the kind a distributed build pays off for)."""
    parsed = parse_index_key(index_key)
    if parsed is not None:
        return parsed["kind"].startswith("ivf")
    return any(p.startswith("IVF") for p in index_key.upper().replace(" ", "").split(","))


GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)


def gpu_supported(index_key: str) -> bool:
    """Whether faiss' GPU indexes can add to this type (no HNSW, fast-scan, refine or large PQ)."""
    parsed = parse_index_key(index_key)
    if parsed is None:
        return "HNSW" not in index_key.upper() and "FS" not in index_key.upper() and "REFINE" not in index_key.upper()
    if parsed["kind"] in ("hnsw", "ivf_pq4fs") or parsed.get("refine") or parsed.get("hnsw_q"):
        return False
    return parsed["kind"] != "ivf_pq" or parsed["pq_m"] in GPU_PQ_M


def code_bytes(parsed: dict, d: int) -> float:
    """Bytes of the (base) codes per vector in the inverted lists (Flat: the float32 vector)."""
    kind = parsed["kind"]
    if kind in ("flat", "ivf_flat", "hnsw"):
        return 4 * d
    if kind == "ivf_sq8":
        return d
    if kind == "ivf_sq4":
        return (d + 1) // 2
    if kind == "ivf_pq4fs":
        return (parsed["pq_m"] + 1) // 2
    return parsed["pq_m"] * PQ_NBITS // 8


REFINE_BYTES = {"Flat": lambda d: 4 * d, "SQ8": lambda d: d, "SQ4": lambda d: (d + 1) // 2}


def estimate_index_bytes(index_key: str, n: int, dim: int) -> int | None:
    """Upper-bound estimate of the index file holding ``n`` vectors with ids (= its size in RAM once
    read back). None for a factory string this module does not parse."""
    p = parse_index_key(index_key)
    if p is None:
        return None
    d_in = p["opq_d"] or dim
    fixed = HEADER_BYTES + (4 * d_in * (dim + 1) if p["opq_m"] else 0)  # + OPQ rotation matrix and bias
    kind = p["kind"]
    if kind == "flat":
        return fixed + n * (4 * d_in + ID_BYTES)
    if kind == "hnsw":
        m = p["hnsw_m"]
        # level 0 holds 2M links, upper levels ~1 more per node; levels (int32) + offsets (size_t)
        return fixed + n * (4 * d_in + ID_BYTES + 4 * (2 * m + 1) + 12)
    nlist = p["nlist"]
    fixed += nlist * (4 * d_in + LIST_OVERHEAD_BYTES)  # centroids + list headers
    if p["hnsw_q"]:
        fixed += nlist * (4 * 3 * p["hnsw_q"] + 24)  # the graph over the centroids
    per_vector = code_bytes(p, d_in) + ID_BYTES
    if kind in ("ivf_sq8", "ivf_sq4"):
        fixed += 2 * 4 * d_in
    elif kind == "ivf_pq":
        fixed += PQ_KSUB * d_in * 4
    elif kind == "ivf_pq4fs":
        fixed += FS_KSUB * d_in * 4 + nlist * FS_BLOCK * code_bytes(p, d_in)  # last block of each list padded
    if p["refine"]:
        # IDMap's id_map on top (the IVF lists then hold positions), the refine codes on the input vectors
        per_vector += ID_BYTES + REFINE_BYTES[p["refine"]](dim)
        fixed += 2 * 4 * dim + HEADER_BYTES
    return int(fixed + math.ceil(n * per_vector))


def estimate_ram_bytes(index_key: str, n: int, dim: int) -> int | None:
    """Upper-bound RAM of the index loaded for search: the file plus per-thread lookup tables."""
    size = estimate_index_bytes(index_key, n, dim)
    if size is None:
        return None
    p = parse_index_key(index_key)
    lut = 0
    if p["kind"] == "ivf_pq":
        lut = p["pq_m"] * PQ_KSUB * 4
    elif p["kind"] == "ivf_pq4fs":
        lut = p["pq_m"] * FS_KSUB * 4
    return size + SEARCH_THREADS * lut


def build_extra_bytes(n: int, dim: int, max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS) -> int:
    """What a build holds beside the index: the float32 training sample and one 64 MiB chunk."""
    return min(n, max_train_vectors) * dim * 4 + 64 * 2**20


def choose_nlist(n: int, max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS) -> int:
    """Number of IVF lists: ~4 sqrt(n) as a power of two, bounded by the training sample."""
    n_train = min(n, max_train_vectors)
    want = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    cap = 2 ** int(math.floor(math.log2(max(1, n_train // MIN_POINTS_PER_CENTROID))))
    return int(max(1, min(want, cap, MAX_NLIST), min(MIN_NLIST, cap)))


@dataclass(frozen=True)
class Candidate:
    """One index that fits the budget: its factory string, size estimates and prior recall."""

    key: str
    bytes: int
    ram_bytes: int
    prior_recall: float
    cost: float  # bytes of codes scanned per vector (search cost), + a share for OPQ's training
    mergeable: bool

    def as_dict(self) -> dict:
        return {"key": self.key, "bytes": self.bytes, "ram_bytes": self.ram_bytes,
                "prior_recall": round(self.prior_recall, 4), "mergeable": self.mergeable}


def effective_bits(parsed: dict, dim: int) -> float:
    """Bits per dimension of the codes that rank the final top-k, weighted by quantizer quality."""
    kind = parsed["kind"]
    refine = parsed.get("refine")
    if kind in ("flat", "ivf_flat", "hnsw") or refine == "Flat":
        return 32.0
    if refine:
        return 8.0 if refine == "SQ8" else 4.0 * 0.6
    bits = 8 * code_bytes(parsed, dim) / dim
    factor = {"ivf_sq8": 1.0, "ivf_sq4": 0.6, "ivf_pq": 1.0, "ivf_pq4fs": 0.75}[kind]
    if parsed["opq_m"]:
        factor *= 1.1
    return bits * factor


def prior_recall(index_key: str, dim: int) -> float:
    """The documented prior: expected recall@10 at a high nprobe, ``1 - 0.35 * 2 ** (1 - b)``."""
    parsed = parse_index_key(index_key)
    if parsed is None:
        raise ValueError(f"no prior for {index_key!r}")
    bits = effective_bits(parsed, dim)
    if bits >= 32:
        return 1.0
    return max(0.0, 1.0 - 0.35 * 2 ** (1 - bits))


def _cost(key: str, dim: int) -> float:
    p = parse_index_key(key)
    scan = code_bytes(p, p["opq_d"] or dim) if p["kind"] != "flat" else 4 * dim
    if p["kind"] == "ivf_pq4fs":
        scan /= 4  # SIMD in-register lookups
    return scan + (dim / 4 if p["opq_m"] else 0) + (REFINE_K_FACTOR if p.get("refine") else 0)


def _pq_sizes(dim: int) -> list[int]:
    """PQ code sizes (bytes at 8 bits) for ``dim``: divisors from 8 to dim/2, largest first."""
    return sorted((m for m in range(MIN_PQ_M, dim // 2 + 1) if dim % m == 0), reverse=True)


def candidate_keys(n: int, dim: int, max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS) -> list[str]:
    """Every family's keys for this corpus, before the budget (each PQ family listed at every size)."""
    if n <= 0 or dim <= 0:
        raise ValueError(f"need n > 0 and dim > 0, got n={n}, dim={dim}")
    nlist = choose_nlist(n, max_train_vectors)
    n_train = min(n, max_train_vectors)
    ivf = f"IVF{nlist}" + (f"_HNSW{HNSW_QUANTIZER_M}" if nlist >= HNSW_QUANTIZER_MIN_NLIST else "")
    keys = []
    if n < FLAT_MAX_N:
        keys.append("Flat")
    if nlist < MIN_NLIST:
        return keys or ["Flat"]
    if n < LARGE_N:
        keys.append(f"{ivf},Flat")
    keys += [f"{ivf},SQ8", f"{ivf},SQ4"]
    sizes = _pq_sizes(dim)
    fs_sizes = sorted((m for m in range(2, dim + 1, 2) if dim % m == 0 and m >= MIN_PQ_M), reverse=True)
    if n_train >= MIN_POINTS_PER_CENTROID * PQ_KSUB:  # enough vectors for 256-entry codebooks
        keys += [f"{ivf},PQ{m}np" for m in sizes]
        keys += [f"OPQ{m}_{dim},{ivf},PQ{m}np" for m in sizes]
    if n_train >= MIN_POINTS_PER_CENTROID * FS_KSUB:
        keys += [f"{ivf},PQ{m}x4fs" for m in fs_sizes]
        for refine in ("SQ8", "SQ4", "Flat"):
            most, least = REFINE_BYTES[refine](dim) // 2, max(MIN_PQ_M, REFINE_BYTES[refine](dim) // 8)
            keys += [f"{ivf},PQ{m}x4fs,Refine({refine})" for m in fs_sizes if least <= m <= most]
    return keys


def _family(key: str) -> str:
    """The key without its code size: candidates of one family differ only in PQ size."""
    return re.sub(r"(OPQ)\d+|PQ\d+", r"\1#", re.sub(r"OPQ\d+", "OPQ#", key))


def candidates(n: int, dim: int, memory_gb: float, *, max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
               mergeable_only: bool = False) -> list[Candidate]:
    """The candidates that fit ``memory_gb`` (file and RAM), the largest code of each family, best prior first.

    Raises ValueError when nothing fits.
    """
    if not memory_gb > 0:
        raise ValueError(f"memory_gb must be > 0, got {memory_gb}")
    budget = BUDGET_FRACTION * memory_gb * GiB
    keys = candidate_keys(n, dim, max_train_vectors)
    fitting: dict[str, Candidate] = {}
    smallest = None
    for key in keys:
        size, ram = estimate_index_bytes(key, n, dim), estimate_ram_bytes(key, n, dim)
        smallest = size if smallest is None else min(smallest, size)
        if size > budget or ram > budget or (mergeable_only and not is_mergeable(key)):
            continue
        family = _family(key)
        if family in fitting:  # keys of a family come largest first
            continue
        fitting[family] = Candidate(key, size, ram, prior_recall(key, dim), _cost(key, dim), is_mergeable(key))
    found = list(fitting.values())
    exact = [c for c in found if parse_index_key(c.key)["kind"] in ("flat", "ivf_flat")]
    if exact:  # exact codes fit: nothing is more accurate (Flat below FLAT_MAX_N, else IVF-Flat)
        return exact[:1]
    preferred = [c for c in found if not _too_small(c.key)]
    found = preferred or found
    if not found:
        raise ValueError(
            f"no index for n={n}, dim={dim} fits memory_gb={memory_gb}: the smallest candidate "
            f"needs ~{(smallest or 0) / GiB / BUDGET_FRACTION:.3f} GiB; raise memory_gb"
        )
    return rank(found, {c.key: c.prior_recall for c in found})


def _too_small(key: str) -> bool:
    """PQ below 32 bytes (8-bit) is kept only when nothing larger fits."""
    p = parse_index_key(key)
    return p["kind"] == "ivf_pq" and not p["refine"] and p["pq_m"] < PREFERRED_MIN_PQ_M


RECALL_TIE = 0.01  # expected recalls this close count as equal; the cheaper candidate wins


def rank(found: list[Candidate], expected: dict[str, float]) -> list[Candidate]:
    """Best expected recall first; within ``RECALL_TIE`` of a better one, the cheaper first."""
    order = sorted(found, key=lambda c: (-expected[c.key], c.cost, c.bytes))
    out: list[Candidate] = []
    while order:
        top = expected[order[0].key]
        tied = [c for c in order if expected[c.key] >= top - RECALL_TIE]
        best = min(tied, key=lambda c: (c.cost, -expected[c.key], c.bytes))
        out.append(best)
        order.remove(best)
    return out


def choose_index(
    n: int, dim: int, memory_gb: float, *, max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
    mergeable_only: bool = False,
) -> str:
    """The FAISS factory string for ``n`` vectors of ``dim`` under ``memory_gb`` GiB, by the prior.

    Raises ValueError when even the most compressed candidate does not fit.
    """
    return candidates(n, dim, memory_gb, max_train_vectors=max_train_vectors, mergeable_only=mergeable_only)[0].key
