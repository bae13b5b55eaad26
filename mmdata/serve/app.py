"""The ``mmdata serve`` web app (Starlette): a search page, a JSON API, and clip-retrieval's back-end
endpoints (``/indices-list``, ``/knn-service``) over one build.

Search goes through :class:`mmdata.search.Retriever`; thumbnails and members are read from the shards
by offset (:class:`mmdata.writers.offsets.ShardReader`), never by scanning a tar. Every bad request
(unknown key, bad image, oversized upload, bad parameter) is a 4xx with a one-line message.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
import tempfile
import threading
from functools import lru_cache

from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mmdata.errors import UserError
from mmdata.report.media import AUDIO_TYPES, IMAGE_EXTS, PreviewError, thumbnail_jpeg
from mmdata.search import Retriever
from mmdata.serve.page import search_page
from mmdata.transforms.image import to_rgb
from mmdata.writers.offsets import ShardReader

MAX_UPLOAD = 20 * 2**20
DRAIN_LIMIT = 256 * 2**20  # an oversized body is read and dropped up to this much, so the client sees the 413
MAX_K = 1000
MEMBER_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "txt": "text/plain; charset=utf-8",
                "json": "application/json", **AUDIO_TYPES}


class BadRequest(Exception):
    """A client error: its status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Server:
    """The state of one served build: the Retriever (one search at a time) and cached shard readers."""

    def __init__(self, out: str, max_upload: int = MAX_UPLOAD, device: str = "cpu"):
        self.retriever = Retriever(out, device=device)  # UserError without an index
        self.name = out.rstrip("/").rsplit("/", 1)[-1] or out
        self.max_upload = max_upload
        self.lock = threading.Lock()
        self.readers: dict[str, ShardReader] = {}
        self.thumb = lru_cache(maxsize=4096)(self._thumb)

    # -- samples ---------------------------------------------------------------------------------
    def locate(self, key: str) -> dict:
        ids = self.retriever._ids
        pos = ids.find_key(key)
        if pos is None:
            raise BadRequest(404, f"unknown key {key!r}")
        return ids.records([pos])[0]

    def reader(self, shard: str) -> ShardReader:
        with self.lock:
            if shard not in self.readers:
                self.readers[shard] = ShardReader(self.retriever.out, shard)
            return self.readers[shard]

    def members(self, key: str) -> tuple[ShardReader, dict]:
        rec = self.locate(key)
        reader = self.reader(rec["shard"])
        return reader, reader.members(key)

    def _thumb(self, key: str) -> bytes:
        reader, members = self.members(key)
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            raise BadRequest(404, f"sample {key!r} has no image")
        try:
            return thumbnail_jpeg(reader.read(key, ext), side=256)
        except PreviewError as err:
            raise BadRequest(404, f"sample {key!r}: {err}") from None

    def hit(self, h, base: str = "") -> dict:
        """A search hit as the API returns it, with links to its thumbnail and members."""
        d = h.to_dict()
        try:
            members = self.members(h.key)[1]
        except (BadRequest, KeyError, OSError, ValueError):
            members = {}
        d["members"] = sorted(members)
        if any(e in members for e in IMAGE_EXTS):
            d["thumbnail"] = f"{base}/thumb/{h.key}"
        audio = next((e for e in AUDIO_TYPES if e in members), None)
        if audio:
            d["audio"] = f"{base}/member/{h.key}/{audio}"
        return d

    # -- searches --------------------------------------------------------------------------------
    def search(self, kind: str, query, k: int, modality: str | None) -> list:
        r = self.retriever
        with self.lock:
            if kind == "text":
                return r.search_text(query, k, modality or "image")
            if kind == "key":
                return r.search_key(query, k, modality or "image")
            if kind == "embedding":
                return r.search_embedding(query, k, modality or "image")
            if kind == "image":
                if (modality or "image") == "audio":
                    raise UserError("an image query cannot search the audio index; use modality image, text or fused")
                r.index(modality or "image")
                return r.search_embedding(r.encoder().encode_images([query])[0], k, modality or "image")
            if kind == "audio":
                return r.search_audio(query, k, modality or "audio")
        raise BadRequest(400, f"unknown query kind {kind!r}")


def _int(value, name: str, default: int, lo: int = 1, hi: int = MAX_K) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise BadRequest(400, f"{name} must be an integer, not {value!r}") from None
    if not lo <= n <= hi:
        raise BadRequest(400, f"{name} must be between {lo} and {hi}")
    return n


def decode_image(data: bytes) -> Image.Image:
    if not data:
        raise BadRequest(400, "empty image")
    try:
        im = Image.open(io.BytesIO(data))
        if im.width * im.height > 100_000_000:
            raise BadRequest(400, f"image of {im.width}x{im.height} pixels is too large")
        im.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadRequest(400, f"not a readable image ({type(exc).__name__})") from None
    return to_rgb(im)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 when it is over ``limit`` bytes (announced or streamed)."""
    declared = request.headers.get("content-length")
    too_big = declared is not None and declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
        if too_big:
            if size > DRAIN_LIMIT:
                break
            continue
        chunks.append(chunk)
    if too_big:
        raise BadRequest(413, f"upload of {int(declared) if declared and declared.isdigit() else size} bytes is over "
                              f"the limit of {limit} bytes")
    return b"".join(chunks)


def make_app(out: str, max_upload: int = MAX_UPLOAD, cors: bool = False) -> Starlette:
    """The app over build ``out`` (raises UserError when ``out`` has no index)."""
    srv = Server(out, max_upload)
    modalities = srv.retriever.modalities

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def results(request: Request, hits, query: dict) -> JSONResponse:
        b = base(request)
        return JSONResponse({**query, "results": [srv.hit(h, b) for h in hits]})

    async def index_page(request: Request):
        return HTMLResponse(search_page(srv.name, modalities, srv.retriever.manifest, max_upload))

    async def info(request: Request):
        m = srv.retriever.manifest
        return JSONResponse({"name": srv.name, "modalities": modalities, "counts": m.get("counts"),
                             "encoder": (m.get("embeddings") or {}).get("encoder"), "max_upload": max_upload})

    def check(request: Request, allowed: set[str]) -> None:
        unknown = sorted(set(request.query_params) - allowed)
        if unknown:
            raise BadRequest(400, f"unknown parameter {unknown[0]!r} (known: {', '.join(sorted(allowed))})")

    async def api_search(request: Request):
        q = request.query_params
        k = _int(q.get("k"), "k", 10)
        modality = q.get("modality") or None
        if request.method == "GET":
            check(request, {"text", "key", "k", "modality"})
            given = [n for n in ("text", "key") if q.get(n)]
            if len(given) != 1:
                raise BadRequest(400, "give exactly one of text= or key= (or POST an image or audio file)")
            kind = given[0]
            hits = srv.search(kind, q[kind], k, modality)
            return results(request, hits, {"query": {kind: q[kind]}, "modality": modality or "image", "k": k})
        check(request, {"k", "modality", "kind", "ext"})
        data = await read_body(request, max_upload)
        ctype = request.headers.get("content-type", "")
        kind = q.get("kind") or ("audio" if ctype.startswith("audio/") else "image")
        if kind == "image":
            hits = srv.search("image", decode_image(data), k, modality)
        elif kind == "audio":
            hits = _audio_search(srv, data, q.get("ext") or ctype.split("/")[-1].split(";")[0], k, modality)
        else:
            raise BadRequest(400, f"kind must be image or audio, not {kind!r}")
        return results(request, hits, {"query": {kind: f"{len(data)} bytes"}, "modality": modality or kind, "k": k})

    async def thumb(request: Request):
        return Response(srv.thumb(request.path_params["key"]), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    async def member(request: Request):
        key, ext = request.path_params["key"], request.path_params["ext"]
        reader, members = srv.members(key)
        if ext not in members:
            raise BadRequest(404, f"sample {key!r} has no member .{ext} (it has {', '.join(sorted(members))})")
        return Response(reader.read(key, ext), media_type=MEMBER_TYPES.get(ext, "application/octet-stream"))

    async def indices_list(request: Request):
        return JSONResponse([srv.name])

    async def knn_service(request: Request):
        """clip-retrieval's back end: JSON {text | image (base64) | embedding_input, modality, num_images,
        indice_name, ...} → [{id, similarity, caption, url, image (base64 jpeg)}, ...]."""
        try:
            body = json.loads(await read_body(request, max_upload) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(400, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        name = body.get("indice_name")
        if name not in (None, srv.name, *modalities):
            raise BadRequest(400, f"unknown indice_name {name!r} (see /indices-list)")
        modality = body.get("modality") or (name if name in modalities else "image")
        if modality not in modalities:
            raise BadRequest(400, f"modality {modality!r} is not indexed (indexed: {', '.join(modalities)})")
        k = _int(body.get("num_images"), "num_images", 40)
        if body.get("image_url"):
            raise BadRequest(400, "image_url is not fetched by mmdata serve; send the image as base64 in 'image'")
        if body.get("text"):
            hits = srv.search("text", str(body["text"]), k, modality)
        elif body.get("image"):
            try:
                data = base64.b64decode(body["image"], validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise BadRequest(400, "image is not valid base64") from None
            hits = srv.search("image", decode_image(data), k, modality)
        elif body.get("embedding_input") is not None:
            try:
                import numpy as np

                vec = np.asarray(body["embedding_input"], dtype=np.float32)
            except (TypeError, ValueError):
                raise BadRequest(400, "embedding_input must be a list of numbers") from None
            hits = srv.search("embedding", vec, k, modality)
        else:
            raise BadRequest(400, "give one of text, image (base64) or embedding_input")
        b = base(request)
        out = []
        for h in hits:
            d = srv.hit(h, b)
            item = {"id": h.id, "similarity": h.score, "caption": h.caption, "key": h.key}
            if "thumbnail" in d:
                item["url"] = d["thumbnail"]
                try:
                    item["image"] = base64.b64encode(srv.thumb(h.key)).decode("ascii")
                except BadRequest:
                    pass
            out.append(item)
        return JSONResponse(out)

    async def metadata(request: Request):
        """clip-retrieval's metadata call: JSON {ids, indice_name} → [{id, metadata: {caption, key, url}}]."""
        try:
            body = json.loads(await read_body(request, max_upload) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(400, "the body must be a JSON object") from None
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and -2**63 <= i < 2**63
                                                for i in ids):
            raise BadRequest(400, "ids must be a list of 64-bit integer ids")
        if len(ids) > MAX_K:
            raise BadRequest(400, f"at most {MAX_K} ids at a time")
        table = srv.retriever._ids
        try:
            records = table.records(table.locate(ids)) if ids else []
        except KeyError:
            raise BadRequest(404, "an id is not in this build's index") from None
        b = base(request)
        return JSONResponse([{"id": r["id"], "metadata": {"caption": r["caption"], "key": r["key"],
                                                           "url": f"{b}/thumb/{r['key']}"}} for r in records])

    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def user_error(request: Request, exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    async def key_error(request: Request, exc: KeyError):
        return JSONResponse({"error": f"not found: {exc}"}, status_code=404)

    routes = [
        Route("/", index_page), Route("/api/info", info), Route("/api/search", api_search, methods=["GET", "POST"]),
        Route("/thumb/{key}", thumb), Route("/member/{key}/{ext}", member),
        Route("/indices-list", indices_list), Route("/knn-service", knn_service, methods=["POST"]),
        Route("/metadata", metadata, methods=["POST"]),
    ]
    middleware = [Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"],
                             allow_headers=["Content-Type"])] if cors else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={BadRequest: bad_request, UserError: user_error, KeyError: key_error})


def _audio_search(srv: Server, data: bytes, ext: str, k: int, modality: str | None) -> list:
    """An uploaded recording, decoded and processed like the build's clips (through a temporary file,
    since the Retriever reads audio queries from a path)."""
    if not data:
        raise BadRequest(400, "empty audio upload")
    ext = "".join(c for c in (ext or "wav") if c.isalnum())[:8] or "wav"
    fd, path = tempfile.mkstemp(suffix=f".{ext}", prefix="mmdata-serve-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            return srv.search("audio", path, k, modality)
        except UserError as err:
            raise UserError(str(err).replace(path, "the uploaded audio")) from None
    finally:
        os.unlink(path)
