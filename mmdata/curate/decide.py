"""Per-sample decisions, in a fixed order over the samples still kept: measure errors (``failed``),
filters (``filter:<name>``), decontamination (``decontaminate:<eval key>``), then deduplication —
exact, perceptual, semantic per modality (``duplicate:<method>:<kept key>``).

A duplicate's kept key is resolved to the sample that stays in the curated build: when the sample
kept for it is removed by a later method, the ledger names the one kept for that, and so on.
"""
from __future__ import annotations

import math

import numpy as np

from mmdata.curate.config import CurateConfig
from mmdata.curate.inputs import InputBuild

SCORE_COLUMNS = ("clip_score", "language", "language_score", "words", "tokens", "speech_ratio", "loudness", "clipping",
                 "phash", "duplicate_of", "duplicate_score", "decontaminate_cosine")


class Decisions:
    def __init__(self, build: InputBuild):
        n = len(build)
        self.build = build
        self.status = build.status.copy()
        self.reason = build.column("reason")
        self.kept_for = np.full(n, -1, dtype=np.int64)
        self.method: dict[int, str] = {}
        self.scores: dict[str, list] = {c: [None] * n for c in SCORE_COLUMNS}

    def alive(self) -> np.ndarray:
        return np.flatnonzero(self.status == "written")

    def dedup_candidates(self) -> np.ndarray:
        """Alive samples that take part in deduplication: not augmented views (made from their
        original on purpose)."""
        views = self.build.column("view_of")
        return np.asarray([p for p in self.alive() if views[p] is None], dtype=np.int64)

    def remove(self, positions, reason: str | list[str], status: str = "filtered") -> None:
        reasons = [reason] * len(positions) if isinstance(reason, str) else reason
        for p, r in zip(positions, reasons):
            self.status[p], self.reason[p] = status, r

    def duplicates(self, method: str, dup: np.ndarray, kept: np.ndarray, score: np.ndarray) -> None:
        for d, k, s in zip(dup.tolist(), kept.tolist(), score.tolist()):
            self.status[d] = "filtered"
            self.kept_for[d] = k
            self.method[d] = method
            self.scores["duplicate_score"][d] = float(np.float32(s))

    def resolve(self) -> None:
        """Name, for every duplicate, the sample that stays in the curated build."""
        keys = self.build.keys
        for d, method in sorted(self.method.items()):
            k = int(self.kept_for[d])
            seen = 0
            while self.status[k] != "written" and self.kept_for[k] >= 0 and seen < len(keys):
                k, seen = int(self.kept_for[k]), seen + 1
            self.reason[d] = f"duplicate:{method}:{keys[k]}"
            self.scores["duplicate_of"][d] = keys[k]


def set_measures(dec: Decisions, feats: dict[str, np.ndarray | list]) -> None:
    for name in ("language", "language_score", "words", "tokens", "speech_ratio", "loudness", "clipping"):
        dec.scores[name] = list(feats[name])
    dec.scores["phash"] = [None if v is None else f"{v & (2**64 - 1):016x}" for v in feats["phash"]]
    errors = [p for p in dec.alive() if feats["error"][p]]
    dec.remove(errors, [f"curate:{feats['error'][p].split(':')[0]}" for p in errors], status="failed")


def _threshold(dec: Decisions, values: list, name: str, low, high) -> None:
    """filter:<name> for alive samples whose value lies outside [low, high] (no value: not filtered)."""
    out = [p for p in dec.alive() if values[p] is not None and not (math.isnan(values[p]) if isinstance(values[p], float) else False)
           and ((low is not None and values[p] < low) or (high is not None and values[p] > high))]
    dec.remove(out, f"filter:{name}")


def clip_filter(dec: Decisions, cfg: CurateConfig) -> None:
    if "image" not in dec.build.modalities or "text" not in dec.build.modalities:
        return
    alive = dec.alive()
    img, pos_i = dec.build.vectors("image", alive)
    txt, pos_t = dec.build.vectors("text", alive)
    both = np.intersect1d(pos_i, pos_t)
    if len(both):
        a = img.take(np.searchsorted(pos_i, both))
        b = txt.take(np.searchsorted(pos_t, both))
        for p, s in zip(both.tolist(), np.einsum("ij,ij->i", a, b).tolist()):
            dec.scores["clip_score"][p] = float(np.float32(s))  # as the float32 column stores it
    if cfg.clip_min is not None:
        _threshold(dec, dec.scores["clip_score"], "clip_score", cfg.clip_min, None)
    if cfg.clip_top_fraction is not None:
        scored = [p for p in dec.alive() if dec.scores["clip_score"][p] is not None]
        ranked = sorted(scored, key=lambda p: (-dec.scores["clip_score"][p], dec.build.rank[p]))
        dec.remove(ranked[math.ceil(cfg.clip_top_fraction * len(ranked)):], "filter:clip_top_fraction")


def filters(dec: Decisions, cfg: CurateConfig) -> None:
    if cfg.clip_min is not None or cfg.clip_top_fraction is not None or dec.build.modalities:
        clip_filter(dec, cfg)
    if cfg.languages is not None:
        keep = set(cfg.languages)
        lang, score = dec.scores["language"], dec.scores["language_score"]
        dec.remove([p for p in dec.alive() if lang[p] is not None
                    and (lang[p] not in keep or score[p] < cfg.language_min_score)], "filter:language")
    _threshold(dec, dec.scores["words"], "words", cfg.min_words, cfg.max_words)
    _threshold(dec, dec.scores["tokens"], "tokens", cfg.min_tokens, cfg.max_tokens)
    _threshold(dec, dec.scores["loudness"], "loudness", cfg.min_loudness, cfg.max_loudness)
    _threshold(dec, dec.scores["clipping"], "clipping", None, cfg.max_clipping)
    _threshold(dec, dec.scores["speech_ratio"], "speech_ratio", cfg.min_speech_ratio, cfg.max_speech_ratio)


def exact(dec: Decisions, cfg: CurateConfig, *, out, folder: str, buckets: int, engine=None) -> None:
    """Identical source bytes (image_sha256, audio_sha256) or normalised caption: the first key stays.
    Grouped by hash bucket in engine tasks (``mmdata.curate.exact``) from the digests the measure
    tasks wrote; one round per modality, over the samples still kept."""
    from mmdata.curate.exact import exact_round
    from mmdata.curate.vectors import save_npy

    offsets = np.concatenate([[0], np.cumsum(np.bincount(dec.build.shard, minlength=len(dec.build.shards)))])
    save_npy(out, f"{folder}/offsets.npy", offsets.astype(np.int64))
    for modality in ("image", "text", "audio"):
        if modality not in cfg.exact:
            continue
        rank = np.full(len(dec.build), -1, dtype=np.int64)
        candidates = dec.dedup_candidates()
        rank[candidates] = dec.build.rank[candidates]
        dup, kept = exact_round(out, folder, modality, rank, dec.build.shards, buckets, engine)
        del rank
        dec.duplicates(f"exact_{modality}", dup, kept, np.ones(len(dup)))


def perceptual(dec: Decisions, feats: dict, max_distance: int, *, out=None, folder: str = "phash", engine=None) -> None:
    """Images within Hamming distance ≤ ``max_distance`` of a better-ranked image (more source pixels,
    then key order) are duplicates of the nearest such image (ties: the better-ranked). Searched by
    multi-index hashing in engine tasks (``mmdata.curate.phash``), not all pairs."""
    from mmdata.curate.phash import near_duplicates

    alive = [p for p in dec.dedup_candidates() if feats["phash"][p] is not None]
    if len(alive) < 2:
        return
    w, h = dec.build.column("orig_width"), dec.build.column("orig_height")
    alive.sort(key=lambda p: (-((w[p] or 0) * (h[p] or 0)), dec.build.rank[p]))
    alive = np.asarray(alive, dtype=np.int64)
    codes = np.asarray([feats["phash"][p] for p in alive], dtype=np.int64)
    if out is None:
        import tempfile

        from mmdata.storage import OutputDir

        with tempfile.TemporaryDirectory() as tmp:
            dup, kept, dist, _ = near_duplicates(codes, max_distance, out=OutputDir(tmp), folder=folder)
    else:
        dup, kept, dist, _ = near_duplicates(codes, max_distance, out=out, folder=folder, engine=engine)
    dec.duplicates("phash", alive[dup], alive[kept], 1.0 - dist / 64.0)


def decontaminate(dec: Decisions, cfg: CurateConfig, eval_build: InputBuild) -> None:
    """Remove samples with cosine ≥ ``exclude_min_cosine`` to any sample of ``eval_build``."""
    import faiss

    from mmdata.errors import UserError

    common = [m for m in ("image", "text", "audio", "fused") if m in dec.build.modalities and m in eval_build.modalities]
    modality = cfg.exclude_modality or (common[0] if common else None)
    if modality is None or modality not in common:
        raise UserError(f"--exclude-near: the two builds share no {modality or ''} embeddings "
                        f"({', '.join(dec.build.modalities) or 'none'} vs {', '.join(eval_build.modalities) or 'none'})")
    ev, ev_pos = eval_build.vectors(modality, np.flatnonzero(eval_build.written))
    vs, pos = dec.build.vectors(modality, dec.alive())
    if not len(ev) or not len(vs):
        return
    if ev.dim() != vs.dim():
        raise UserError(f"--exclude-near: {modality} embeddings differ in dimension ({vs.dim()} vs {ev.dim()}): "
                        "the two builds used different models")
    index = faiss.IndexFlatIP(ev.dim())
    for _, x in ev.chunks():
        index.add(np.ascontiguousarray(x))
    out, reasons = [], []
    for idx, x in vs.chunks():
        sims, nn = index.search(np.ascontiguousarray(x), 1)
        for p, s, i in zip(pos[idx].tolist(), sims[:, 0].tolist(), nn[:, 0].tolist()):
            dec.scores["decontaminate_cosine"][p] = float(np.float32(s))
            if s >= cfg.exclude_min_cosine:
                out.append(p)
                reasons.append(f"decontaminate:{eval_build.keys[int(ev_pos[i])]}")
    dec.remove(out, reasons)
