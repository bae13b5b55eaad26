"""mmdata: raw multimodal corpora -> WebDataset shards, metadata, embeddings and a FAISS index."""
from mmdata.version import __version__

__all__ = ["Hit", "Retriever", "__version__"]


def __getattr__(name: str):
    """``from mmdata import Retriever`` without importing faiss, pyarrow or PIL on ``import mmdata``."""
    if name in ("Retriever", "Hit"):
        from mmdata import search

        return getattr(search, name)
    raise AttributeError(f"module 'mmdata' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
