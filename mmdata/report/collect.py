"""What the report shows, read from a finished output: counts, the funnel with examples, per-shard
figures, sampled columns for the plots, a grid of written samples, neighbours and an embedding sample.

Bounded whatever the size of the build: the status/reason columns of every shard table are scanned
(a few columns, no members), everything else comes from at most ``SAMPLE_SHARDS`` shards spread over
the build, and every list shown has a cap. Members are read by offset (``shards/*_offsets.json``).
"""
from __future__ import annotations

import io
import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute  # pa.compute below: a fresh `mmdata report` process had not imported it
import pyarrow.parquet as pq

from mmdata.arrow import column_values, string_scalar
from mmdata.report.media import (
    AUDIO_TYPES,
    IMAGE_EXTS,
    MAX_SOURCE_BYTES,
    PreviewError,
    audio_uri,
    thumbnail_uri,
)
from mmdata.storage import OutputDir, read_bytes
from mmdata.writers.offsets import ShardReader

SAMPLE_SHARDS = 64  # shards whose whole tables feed the plots and the grid
PLOT_ROWS = 50_000  # rows per plotted column
GRID = 48  # written samples in the grid
VIEWS_PER_PARENT = 3
EXAMPLES_PER_REASON = 6
NEIGHBOUR_QUERIES = 4
NEIGHBOURS_K = 6
MAP_POINTS = 1500  # points per modality in the embedding map
SHARD_ROWS = 2000  # rows of the per-shard table
STATUSES = ("filtered", "failed")
SCAN_COLUMNS = ["key", "status", "reason", "source_image", "source_audio", "source_text", "caption", "view_of"]


def _read_table(out: OutputDir, name: str, columns: list[str] | None = None) -> pa.Table:
    """A shard table, or only those of ``columns`` it has (read from the file, not the whole table)."""
    f = pq.ParquetFile(io.BytesIO(out.read_bytes(f"shards/{name}.parquet")))
    if columns is not None:
        columns = [c for c in columns if c in f.schema_arrow.names]
    return f.read(columns=columns, use_threads=False)


def spread(items: list, n: int) -> list:
    """At most ``n`` items evenly spread over ``items`` (first and last included), in order."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def kind_of(row: dict) -> str:
    """What a row holds, for the per-modality funnel: ``image+text``, ``audio+text``, ``augmented view`` …"""
    if row.get("view_of"):
        return "augmented view"
    parts = [m for m, col in (("image", "source_image"), ("audio", "source_audio")) if row.get(col)]
    if row.get("source_text") or row.get("caption"):
        parts.append("text")
    return "+".join(parts) or "no source"


class Collector:
    """Reads an output once and keeps what the page needs (``collect()`` returns it as a dict)."""

    def __init__(self, out: OutputDir, manifest: dict):
        self.out = out
        self.manifest = manifest
        self.shards = [s[: -len(".tar")] for s in manifest.get("shards", [])]
        self.sampled = set(spread(self.shards, SAMPLE_SHARDS))
        self._readers: dict[str, ShardReader] = {}
        self.notes: list[str] = []

    def reader(self, name: str) -> ShardReader:
        if name not in self._readers:
            self._readers[name] = ShardReader(self.out, f"{name}.tar")
        return self._readers[name]

    # -- funnel -------------------------------------------------------------------------------
    def funnel(self) -> tuple[dict, dict[str, pa.Table]]:
        """Counts per (status, reason) and row kind, with up to ``EXAMPLES_PER_REASON`` example rows;
        and the full tables of the sampled shards (for plots and the grid)."""
        by_kind: dict[tuple[str, str], Counter] = defaultdict(Counter)
        examples: dict[tuple[str, str], list[dict]] = defaultdict(list)
        tables: dict[str, pa.Table] = {}
        for name in self.shards:  # every shard: the few columns the counts need
            if name in self.sampled:
                table = tables[name] = _read_table(self.out, name)
            else:
                table = _read_table(self.out, name, SCAN_COLUMNS)
            scan = table.select([c for c in SCAN_COLUMNS if c in table.column_names]).to_pylist()
            wanted = []
            for i, row in enumerate(scan):
                key = (row["status"], row.get("reason") or "")
                by_kind[key][kind_of(row)] += 1
                if row["status"] != "written" and len(examples[key]) < EXAMPLES_PER_REASON:
                    examples[key].append(None)  # filled below with the full row
                    wanted.append((key, len(examples[key]) - 1, i))
            if wanted:
                full = table if name in self.sampled else _read_table(self.out, name)
                for key, slot, i in wanted:
                    examples[key][slot] = (name, full.slice(i, 1).to_pylist()[0])
        kinds = sorted({k for c in by_kind.values() for k in c})
        rows = []
        for status in STATUSES:
            for reason, count in sorted(self.manifest.get("reasons", {}).get(status, {}).items(), key=lambda kv: -kv[1]):
                rows.append({"status": status, "reason": reason, "count": count,
                             "by_kind": dict(by_kind.get((status, reason), {})),
                             "examples": [self._removed_card(row, shard) for shard, row in examples.get((status, reason), [])]})
        written = Counter()
        for (status, _), c in by_kind.items():
            if status == "written":
                written.update(c)
        return {"kinds": kinds, "rows": rows, "written_by_kind": dict(written)}, tables

    def _removed_card(self, row: dict, shard: str) -> dict:
        card = {"key": row["key"], "shard": shard, "caption": row.get("caption"),
                "detail": "; ".join(w[len("detail:"):] for w in row.get("warnings") or [] if w.startswith("detail:")),
                "sources": [row[c] for c in ("source_image", "source_audio", "source_text") if row.get(c)]}
        src = row.get("source_image")
        if src:
            card["thumb"], card["note"] = self._source_preview(src)
        audio = row.get("source_audio")
        if audio and not src:
            data, note = self._source_bytes(audio)
            uri = audio_uri(data, audio.rsplit(".", 1)[-1]) if data is not None else None
            card["audio"], card["note"] = uri, note or (None if uri else "audio too long to embed")
        if card["caption"] is None and row.get("source_text"):
            data, _ = self._source_bytes(row["source_text"])
            if data is not None:
                text = data[:300].decode("utf-8", "replace")
                odd = sum(1 for ch in text if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r"))
                card["caption"] = text if odd <= len(text) // 20 else "(the caption file is not readable text)"
        return card

    @staticmethod
    def _source_bytes(url: str) -> tuple[bytes | None, str | None]:
        if url.startswith(("http://", "https://")):
            return None, "remote source (not fetched for the report)"
        try:
            return read_bytes(url, max_size=MAX_SOURCE_BYTES), None
        except (OSError, ValueError) as exc:
            return None, f"source not readable ({type(exc).__name__})"

    def _source_preview(self, url: str) -> tuple[str | None, str | None]:
        data, note = self._source_bytes(url)
        if data is None:
            return None, note
        try:
            return thumbnail_uri(data), None
        except PreviewError as err:
            return None, str(err)

    # -- shards ----------------------------------------------------------------------------------
    def shard_rows(self) -> list[dict]:
        rows = []
        for name in self.shards[:SHARD_ROWS]:
            try:
                stats = json.loads(self.out.read_bytes(f"shards/{name}_stats.json"))
            except (OSError, ValueError):
                continue
            c = stats.get("counts", {})
            secs = stats.get("wall_seconds") or 0.0
            rows.append({"shard": f"{name}.tar", "records": c.get("records"), "inputs": c.get("inputs"),
                         "written": c.get("written"), "filtered": c.get("filtered"), "failed": c.get("failed"),
                         "bytes": stats.get("tar_bytes"), "seconds": secs,
                         "per_second": round(c.get("inputs", 0) / secs, 1) if secs else None})
        if len(self.shards) > SHARD_ROWS:
            self.notes.append(f"per-shard table: the first {SHARD_ROWS} of {len(self.shards)} shards")
        return rows

    # -- written samples -------------------------------------------------------------------------
    def card(self, shard: str, key: str, row: dict | None = None) -> dict:
        """A written sample as shown: thumbnail, caption, audio player, segment times."""
        row = row or {}
        card = {"key": key, "shard": f"{shard}.tar", "caption": row.get("caption")}
        for col in ("start", "end", "duration", "view"):
            if row.get(col) is not None:
                card[col] = row[col]
        try:
            reader = self.reader(shard)
            members = reader.members(key)
        except (OSError, ValueError, KeyError) as exc:
            card["note"] = f"member not readable ({type(exc).__name__})"
            return card
        image = next((e for e in IMAGE_EXTS if e in members), None)
        if image:
            try:
                card["thumb"] = thumbnail_uri(reader.read(key, image, max_bytes=MAX_SOURCE_BYTES))
            except (PreviewError, OSError, ValueError) as err:
                card["note"] = str(err)
        audio = next((e for e in AUDIO_TYPES if e in members), None)
        if audio:
            size = members[audio][1]
            uri = audio_uri(reader.read(key, audio), audio) if size <= MAX_SOURCE_BYTES else None
            card["audio"] = uri
            if uri is None:
                card["note"] = f"audio of {size} bytes: too long to embed"
        if card["caption"] is None and "txt" in members:
            card["caption"] = reader.read(key, "txt", max_bytes=MAX_SOURCE_BYTES)[:500].decode("utf-8", "replace")
        return card

    def grid(self, tables: dict[str, pa.Table]) -> list[dict]:
        per_shard = max(1, -(-GRID // max(len(tables), 1)))
        chosen: list[tuple[str, dict, list[dict]]] = []
        for name, table in sorted(tables.items()):
            rows = [r for r in table.to_pylist() if r["status"] == "written"]
            views = defaultdict(list)
            for r in rows:
                if r.get("view_of"):
                    views[r["view_of"]].append(r)
            parents = [r for r in rows if not r.get("view_of")] or rows
            for r in spread(parents, per_shard):
                chosen.append((name, r, views.get(r["key"], [])[:VIEWS_PER_PARENT]))
        cards = []
        for name, r, views in spread(chosen, GRID):
            card = self.card(name, r["key"], r)
            card["views"] = [self.card(name, v["key"], v) for v in views]
            cards.append(card)
        return cards

    # -- embeddings ------------------------------------------------------------------------------
    def _embedding_rows(self, modality: str, name: str) -> np.ndarray | None:
        rel = f"embeddings/{modality}/{name}.npy"
        if not self.out.exists(rel):
            return None
        return np.load(io.BytesIO(self.out.read_bytes(rel)), allow_pickle=False).astype(np.float32)

    def embedding_sample(self) -> dict:
        """Up to ``MAP_POINTS`` non-zero rows per embedded modality, from the sampled shards, with their shard."""
        modalities = list((self.manifest.get("embeddings") or {}).get("modalities") or [])
        names = sorted(self.sampled)
        sample = {}
        for modality in modalities:
            vecs, shards = [], []
            per_shard = max(1, MAP_POINTS // max(len(names), 1))
            for name in names:
                rows = self._embedding_rows(modality, name)
                if rows is None or not len(rows):
                    continue
                rows = rows[np.abs(rows).sum(axis=1) > 0]
                picked = rows[np.linspace(0, len(rows) - 1, min(per_shard, len(rows))).astype(int)] if len(rows) else rows
                vecs.append(picked)
                shards += [name] * len(picked)
            if vecs:
                sample[modality] = (np.concatenate(vecs), shards)
        return sample

    def neighbours(self, grid: list[dict]) -> list[dict]:
        """A few grid samples queried against the first index of image, fused, text, audio."""
        indexed = self.manifest.get("index") or {}
        modality = next((m for m in ("image", "fused", "text", "audio") if m in indexed), None)
        if modality is None or not self.out.exists("index/index_infos.json"):
            return []
        try:
            from mmdata.index import load_index, search
            from mmdata.index.ids import IdTable

            infos = json.loads(self.out.read_bytes("index/index_infos.json"))
            index = load_index(self.out.local_path(f"index/{modality}.index"), infos.get(modality))
            ids = IdTable(self.out, captions=True)
        except (ImportError, OSError, ValueError, KeyError, RuntimeError) as exc:
            self.notes.append(f"neighbours: the {modality} index could not be read ({exc})")
            return []
        groups = []
        for card in spread(grid, 2 * NEIGHBOUR_QUERIES):
            if len(groups) >= NEIGHBOUR_QUERIES:
                break
            name = card["shard"][:-4]
            pos = ids.find_key(card["key"])
            if pos is None:
                continue
            rec = ids.records([pos])[0]
            rows = self._embedding_rows(modality, name)
            if rows is None or not rows[rec["row"]].any():
                continue
            scores, found = search(index, rows[rec["row"]][None, :], NEIGHBOURS_K + 1)
            hits = [(float(s), int(i)) for s, i in zip(scores[0], found[0]) if i != -1 and i != rec["id"]][:NEIGHBOURS_K]
            if not hits:
                continue
            records = ids.records(ids.locate(np.asarray([i for _, i in hits], dtype=np.int64)))
            cards = []
            for (score, _), r in zip(hits, records):
                c = self.card(r["shard"][:-4], r["key"], {"caption": r["caption"]})
                c["score"] = round(score, 4)
                cards.append(c)
            groups.append({"modality": modality, "query": card, "hits": cards})
        return groups


def plot_columns(tables: dict[str, pa.Table]) -> dict[str, np.ndarray]:
    """The columns the plots use, from the sampled shards' written rows (at most ``PLOT_ROWS`` each)."""
    if not tables:
        return {}
    table = pa.concat_tables([t for _, t in sorted(tables.items())], promote_options="default")
    written = table.filter(pa.compute.equal(table.column("status"), string_scalar("written")))
    cols = {}
    for name in written.column_names:
        col = written.column(name)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_string(col.type) \
                or pa.types.is_boolean(col.type):
            cols[name] = column_values(col.slice(0, PLOT_ROWS))
    cols["caption_chars"] = np.asarray([len(c) if c is not None else np.nan for c in cols.get("caption", [])],
                                       dtype=np.float64)
    return cols
