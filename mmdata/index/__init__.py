"""FAISS index layer: choose, train, add, tune and evaluate an inner-product index over embedding files.

faiss is imported on first use, so ``choose_index`` and the dataclasses work without it. Nothing in
this package imports an engine (Dask, Beam): engines call the functions of ``distributed``.
"""
from mmdata.index.backend import check_index_key, faiss_reason
from mmdata.index.build import build_index, choose_for_corpus, load_index
from mmdata.index.choose import choose_index, estimate_index_bytes, is_ivf, is_mergeable
from mmdata.index.distributed import add_partial, finalize_index, merge_partials, train_index
from mmdata.index.evaluate import exact_knn, recall_at, search
from mmdata.index.sources import EmbeddingSource

__all__ = [
    "EmbeddingSource",
    "add_partial",
    "build_index",
    "check_index_key",
    "choose_for_corpus",
    "choose_index",
    "estimate_index_bytes",
    "exact_knn",
    "faiss_reason",
    "finalize_index",
    "is_ivf",
    "is_mergeable",
    "load_index",
    "merge_partials",
    "recall_at",
    "search",
    "train_index",
]
