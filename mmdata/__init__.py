"""mmdata: raw multimodal corpora -> WebDataset shards, metadata, embeddings and a FAISS index."""
__version__ = "0.1.0"
