"""``mmdata serve``: a local web app over a build (search page, JSON API, clip-retrieval endpoints)."""
from mmdata.serve.app import MAX_UPLOAD, make_app

__all__ = ["MAX_UPLOAD", "make_app"]
