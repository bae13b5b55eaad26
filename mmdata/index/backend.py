"""The thin layer that talks to faiss: import, index construction, GPU moves, atomic writes.

Everything faiss-specific that more than one module needs lives here, so the other modules read
as the build recipe.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from mmdata.storage import fsync_dir

INSTALL_HINT = (
    "mmdata's index layer needs faiss: pip install 'mmdata[cpu]' (faiss-cpu) "
    "or 'mmdata[gpu]' (faiss-gpu)"
)


def import_faiss() -> Any:
    """Import faiss, or fail with an ImportError that names the extras to install."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return faiss


def gpu_count(faiss: Any) -> int:
    """GPUs faiss can use; 0 for faiss-cpu (which lacks or stubs get_num_gpus)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def resolve_gpu(faiss: Any, use_gpu: bool | str, index_key: str) -> bool:
    """Decide whether to build on GPU. ``use_gpu``: True, False or "auto"."""
    if use_gpu not in (True, False, "auto"):
        raise ValueError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
    if use_gpu is False:
        return False
    from mmdata.index.choose import gpu_supported  # noqa: PLC0415

    supported = gpu_supported(index_key)
    available = gpu_count(faiss) > 0
    if use_gpu is True and not (available and supported):
        why = "faiss sees no GPU" if not available else f"{index_key} has no GPU implementation"
        raise ValueError(f"use_gpu=True but {why}; pass use_gpu='auto' or False")
    return available and supported


REFINE_K_FACTOR = 8  # a refined index re-ranks this many times k candidates of its base
OPQ_NITER = 20  # OPQ rounds (faiss' default 50 re-trains the PQ 50 times: it dominated whole builds)
OPQ_MAX_TRAIN = 32_768  # vectors OPQ trains on (faiss' default 65,536)
PQ_POINTS_PER_CENTROID = 128  # 8-bit PQ codebooks train on at most 32,768 vectors (faiss' default 65,536)


def new_index(faiss: Any, index_key: str, dim: int) -> Any:
    """An empty inner-product index for ``index_key`` that accepts ``add_with_ids``.

    IVF indexes store ids in their lists; anything else (Flat, HNSW, a refined IVF) is wrapped in
    IndexIDMap. A refine step gets ``REFINE_K_FACTOR``, an OPQ rotation bounded training.
    """
    index = faiss.index_factory(dim, index_key, faiss.METRIC_INNER_PRODUCT)
    wrapped = isinstance(index, faiss.IndexIDMap)
    if not wrapped and (faiss.try_extract_index_ivf(index) is None or isinstance(index, faiss.IndexRefine)):
        # let the factory build the wrapper so that it owns the inner index
        index = faiss.index_factory(dim, f"IDMap,{index_key}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    pq = getattr(faiss.downcast_index(ivf), "pq", None) if ivf is not None else None
    if pq is not None:
        pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID
    for part in layers(faiss, index):
        if isinstance(part, faiss.IndexRefine):
            part.k_factor = REFINE_K_FACTOR
        elif isinstance(part, faiss.IndexPreTransform):
            for i in range(part.chain.size()):
                opq = faiss.downcast_VectorTransform(part.chain.at(i))
                if isinstance(opq, faiss.OPQMatrix):
                    opq.niter, opq.max_train_points = OPQ_NITER, OPQ_MAX_TRAIN
    return index


def layers(faiss: Any, index: Any) -> list[Any]:
    """The index and the indexes it wraps (IDMap, Refine's base, PreTransform), outermost first."""
    out = []
    while index is not None:
        index = faiss.downcast_index(index)
        out.append(index)
        if isinstance(index, faiss.IndexIDMap):
            index = index.index
        elif isinstance(index, faiss.IndexRefine):
            index = index.base_index
        elif isinstance(index, faiss.IndexPreTransform):
            index = index.index
        else:
            index = None
    return out


def hnsw_quantizer(faiss: Any, index: Any) -> Any:
    """The HNSW coarse quantizer of an IVF index (downcast), or None."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    quantizer = faiss.downcast_index(ivf.quantizer)
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def train(faiss: Any, index: Any, sample: Any) -> None:
    """``index.train(sample)``, reproducible for an HNSW coarse quantizer too: the k-means assigns with
    a flat index, then the graph over the centroids is rebuilt on one thread (faiss' parallel HNSW
    insertion is not reproducible)."""
    quantizer = hnsw_quantizer(faiss, index)
    if quantizer is None:
        index.train(sample)
        return
    ivf = faiss.extract_index_ivf(index)
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
    ivf.clustering_index = flat
    try:
        index.train(sample)
    finally:
        ivf.clustering_index = None
    centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
    quantizer.reset()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        quantizer.add(centroids)
    finally:
        faiss.omp_set_num_threads(threads)


def merge_into(faiss: Any, merged: Any, part: Any) -> None:
    """Append ``part``'s vectors to ``merged`` (both filled from one trained index), in order.

    faiss merges Flat and IVF indexes itself; an IDMap over a refined IVF (``IndexRefine`` has no
    ``merge_from``) is merged layer by layer: the base IVF's lists (positions shifted), the refine
    codes, then the ids.
    """
    import numpy as np  # noqa: PLC0415

    outer = faiss.downcast_index(merged)
    inner = faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexIDMap) else None
    if not isinstance(inner, faiss.IndexRefine):
        merged.merge_from(part, 0)
        return
    other_outer = faiss.downcast_index(part)
    other = faiss.downcast_index(other_outer.index)
    shift = inner.ntotal
    inner.base_index.merge_from(other.base_index, shift)
    inner.refine_index.merge_from(other.refine_index, 0)
    inner.ntotal = inner.base_index.ntotal
    ids = np.concatenate([faiss.vector_to_array(outer.id_map), faiss.vector_to_array(other_outer.id_map)])
    faiss.copy_array_to_vector(ids.astype(np.int64), outer.id_map)
    outer.ntotal = inner.ntotal


# Embedding dimensions a factory string is tried at before the real one is known (the last two have
# many divisors, for PQ sizes no usual dimension takes).
PROBE_DIMS = (512, 768, 1024, 384, 256, 1280, 640, 1536, 128, 64, 1680, 5040)


def faiss_reason(exc: Exception) -> str:
    """The human part of a faiss C++ error (``Error in f() at x.cpp:12: Error: 'c' failed: WHY`` → ``WHY``)."""
    text = " ".join(str(exc).split())
    for marker in ("failed: ", "Error: "):
        if marker in text:
            return text.rsplit(marker, 1)[1]
    found = re.search(r"\.(?:cpp|cu|h):\d+: (.*)", text)
    return found.group(1) if found else text


def check_index_key(index_key: str, dim: int | None = None) -> None:
    """ValueError with faiss' one-line reason unless faiss builds ``index_key`` for ``dim``
    (without ``dim``: for at least one common embedding dimension, so a typo fails before a build)."""
    faiss = import_faiss()
    if not index_key.strip():
        raise ValueError("an empty factory string")
    first = None
    for d in [dim] if dim else PROBE_DIMS:
        try:
            new_index(faiss, index_key, d)
            return
        except RuntimeError as exc:
            first = first or exc
    raise ValueError(faiss_reason(first))


def set_seed(faiss: Any, index: Any, seed: int) -> None:
    """Seed every k-means the index runs in training (coarse quantizer, PQ codebooks)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    ivf.cp.seed = seed
    ivf = faiss.downcast_index(ivf)
    pq = getattr(ivf, "pq", None)
    if pq is not None:
        pq.cp.seed = seed


def search_params_of(faiss: Any, index: Any) -> dict[str, int]:
    """The tunable search parameter of this index and its current value ({} for Flat)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return {"nprobe": int(ivf.nprobe)}
    inner = index.index if isinstance(index, faiss.IndexIDMap) else index
    inner = faiss.downcast_index(inner)
    if isinstance(inner, faiss.IndexHNSW):
        return {"efSearch": int(inner.hnsw.efSearch)}
    return {}


def params_string(params: dict[str, int]) -> str:
    """``{"nprobe": 8}`` -> ``"nprobe=8"``, the syntax of faiss.ParameterSpace."""
    return ",".join(f"{k}={v}" for k, v in sorted(params.items()))


def apply_search_params(faiss: Any, index: Any, params: dict[str, int] | str) -> None:
    """Set nprobe / efSearch, through IDMap and PreTransform wrappers."""
    text = params if isinstance(params, str) else params_string(params)
    if text:
        faiss.ParameterSpace().set_index_parameters(index, text)
    quantizer = hnsw_quantizer(faiss, index)
    if quantizer is not None:  # the coarse graph search must find at least nprobe good lists
        quantizer.hnsw.efSearch = max(64, 2 * int(faiss.extract_index_ivf(index).nprobe))


def ivf_of(faiss: Any, index: Any) -> Any:
    """The IndexIVF inside ``index`` (downcast), or None."""
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else faiss.downcast_index(ivf)


def gpu_train_helper(faiss: Any, index: Any) -> Any:
    """Run the coarse k-means of a CPU IVF index on the GPU(s); returns the GPU helper to keep alive.

    Training stays a CPU call (same seeds, same code path); only the assignment step of k-means
    runs on the GPU, the way faiss' own large-scale scripts do it.
    """
    ivf = ivf_of(faiss, index)
    if ivf is None:
        return None
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
    helper = faiss.index_cpu_to_all_gpus(flat)
    ivf.clustering_index = helper
    return helper


def to_gpu(faiss: Any, index: Any) -> Any:
    """Copy a trained CPU index onto all GPUs for adding."""
    options = faiss.GpuMultipleClonerOptions()
    ivf = ivf_of(faiss, index)
    pq = getattr(ivf, "pq", None) if ivf is not None else None
    # float32 lookup tables exceed GPU shared memory above 48 bytes per code
    options.useFloat16 = bool(pq is not None and pq.M > 48)
    return faiss.index_cpu_to_all_gpus(index, co=options)


def write_index_atomic(faiss: Any, index: Any, path: str) -> int:
    """Write ``index`` to ``path`` through a temporary name + fsync + rename; returns its size."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # a unique name in the same folder: two writers (threads, retried tasks, a reused pid) never share one
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{os.path.basename(path)}.tmp-")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(directory)  # the rename itself survives a crash
    return os.path.getsize(path)

