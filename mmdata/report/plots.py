"""The report's plots: the columns and embeddings a report samples, as ``(title, svg)`` pairs
drawn by ``mmdata.report.svg``."""
from __future__ import annotations

from collections import Counter

import numpy as np

from mmdata.report import svg
from mmdata.schema import SHARD_SCHEMA

KNOWN = {f.name for f in SHARD_SCHEMA} | {"caption_chars"}
MAX_EXTRA_PLOTS = 6


def _hist(values, xlabel: str, lines: dict[str, float] | None = None) -> str | None:
    a = svg.finite(values)
    if not len(a):
        return None
    lo, hi = float(a.min()), float(a.max())
    span = max(hi - lo, abs(hi), 1e-9)
    shown = {label: x for label, x in (lines or {}).items()  # a threshold far outside the data would squash the plot
             if x and lo - span <= x <= hi + span}  # 0 (no minimum) marks nothing
    return svg.histogram(a, min(40, max(5, len(np.unique(a)))), xlabel, lines=shown)


def _bars(counts: Counter, xlabel: str, top: int = 15) -> str | None:
    items = counts.most_common(top)
    return svg.hbars([str(k) for k, _ in items], [v for _, v in items], xlabel)


def image_sizes(cols: dict) -> str | None:
    w, h = cols.get("orig_width"), cols.get("orig_height")
    if w is None or h is None or len(w) != len(h):
        return None
    return svg.scatter(w, h, "source width (px)", "source height (px)")


def distribution_plots(cols: dict, config: dict) -> list[tuple[str, str]]:
    """Image sizes and aspect ratios, caption lengths, audio durations and sample rates, and any
    columns a curation step added (numbers as histograms, labels as bars, thresholds from the config)."""
    plots: list[tuple[str, str | None]] = [("Image sizes (source)", image_sizes(cols))]
    w, h = cols.get("orig_width"), cols.get("orig_height")
    if w is not None and h is not None:
        ratio = [a / b if a and b else None for a, b in zip(w.tolist(), h.tolist())]
        plots.append(("Aspect ratio (width / height)", _hist(ratio, "width / height",
                                                            {"max": config.get("max_aspect_ratio"),
                                                             "1/max": 1 / config["max_aspect_ratio"]
                                                             if config.get("max_aspect_ratio") else None})))
    plots.append(("Caption length", _hist(cols.get("caption_chars", []), "characters",
                                          {"min": config.get("min_caption_chars"),
                                           "max": config.get("max_caption_chars")})))
    audio = config.get("audio") or {}
    plots.append(("Audio duration", _hist(cols.get("duration", []), "seconds",
                                          {"min": audio.get("min_duration"), "max": audio.get("max_duration")})))
    rates = [r for r in (cols.get("source_sample_rate") if cols.get("source_sample_rate") is not None else [])
             if r is not None and not np.isnan(r)]
    plots.append(("Audio sample rate (source)", _bars(Counter(int(r) for r in rates), "samples")))
    for name in sorted(set(cols) - KNOWN)[:MAX_EXTRA_PLOTS]:
        values = cols[name]
        if values.dtype.kind in "fiu":
            lines = {k: v for k, v in config.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and name in k}
            plots.append((f"{name} (curation)", _hist(values, name, lines)))
        elif values.dtype.kind in "bO":
            plots.append((f"{name} (curation)", _bars(Counter(str(v) for v in values if v is not None),
                                                      "samples")))
    return [(t, s) for t, s in plots if s is not None]


def embedding_maps(sample: dict) -> list[tuple[str, str]]:
    """2-D PCA of the sampled embeddings: the open_clip space coloured by modality, and the first
    modality coloured by shard (the audio space, when there is one, separately)."""
    plots = []
    clip = {m: v for m, v in sample.items() if m != "audio"}
    if clip:
        vecs = np.concatenate([v for v, _ in clip.values()])
        labels = [m for m, (v, _) in clip.items() for _ in range(len(v))]
        plots.append(("Embeddings by modality (PCA)", svg.category_scatter(_pca(vecs), labels)))
    first = "image" if "image" in sample else next(iter(sample), None)
    for modality in dict.fromkeys([m for m in (first, "audio") if m in sample]):
        vecs, shards = sample[modality]
        plots.append((f"{modality} embeddings by shard (PCA)", svg.category_scatter(_pca(vecs), shards)))
    return [(t, s) for t, s in plots if s is not None]


def _pca(vecs: np.ndarray) -> np.ndarray:
    x = vecs - vecs.mean(axis=0, keepdims=True)
    if len(x) < 2:
        return np.zeros((len(x), 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:
        comps = np.vstack([comps, np.zeros_like(comps)])
    return x @ comps.T

