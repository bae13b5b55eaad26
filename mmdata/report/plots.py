"""The report's plots, drawn with matplotlib (Agg, no pyplot state) and inlined as SVG text.

Each plot is a ``(title, svg)`` pair. ``svg.hashsalt`` is set per plot so the ids inside two inline
SVGs never collide and the same data gives the same bytes.
"""
from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np

from mmdata.schema import SHARD_SCHEMA

KNOWN = {f.name for f in SHARD_SCHEMA} | {"caption_chars"}
MAX_EXTRA_PLOTS = 6


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def prepare() -> None:
    """Import matplotlib's Figure and SVG backend (about 0.5 s of CPU), if matplotlib is installed:
    the build driver does it in a thread while its last units finish (``import_in_background``)."""
    try:
        import matplotlib.backends.backend_svg
        import matplotlib.figure  # noqa: F401
    except ImportError:
        pass


def _figure(width: float = 5.0, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=96)
    return fig, fig.add_subplot()


def _svg(fig, name: str) -> str:
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": name, "svg.fonttype": "none"}):
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r'<svg ([^>]*?)width="[^"]*" height="[^"]*"', r'<svg \1', text, count=1)


def _finite(values) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return a[np.isfinite(a)]


def _hist(name: str, values, xlabel: str, lines: dict[str, float] | None = None, log: bool = False) -> str | None:
    a = _finite(values)
    if not len(a):
        return None
    fig, ax = _figure()
    ax.hist(a, bins=min(40, max(5, len(np.unique(a)))), color="#4a7ab8")
    lo, hi = float(a.min()), float(a.max())
    span = max(hi - lo, abs(hi), 1e-9)
    for label, x in (lines or {}).items():  # a threshold far outside the data would squash the plot
        if x and lo - span <= x <= hi + span:  # 0 (no minimum) marks nothing
            ax.axvline(x, color="#c0392b", linestyle="--", linewidth=1)
            ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                        fontsize=8, color="#c0392b")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    return _svg(fig, name)


def _bars(name: str, counts: Counter, xlabel: str, top: int = 15) -> str | None:
    if not counts:
        return None
    items = counts.most_common(top)
    fig, ax = _figure()
    ax.barh([str(k) for k, _ in items][::-1], [v for _, v in items][::-1], color="#4a7ab8")
    ax.set_xlabel(xlabel)
    return _svg(fig, name)


def image_sizes(cols: dict) -> str | None:
    w, h = _finite(cols.get("orig_width", [])), _finite(cols.get("orig_height", []))
    if not len(w) or len(w) != len(h):
        return None
    fig, ax = _figure()
    ax.scatter(w, h, s=6, alpha=0.5, color="#4a7ab8", rasterized=len(w) > 2000)
    ax.set_xlabel("source width (px)")
    ax.set_ylabel("source height (px)")
    return _svg(fig, "image_sizes")


def distribution_plots(cols: dict, config: dict) -> list[tuple[str, str]]:
    """Image sizes and aspect ratios, caption lengths, audio durations and sample rates, and any
    columns a curation step added (numbers as histograms, labels as bars, thresholds from the config)."""
    plots: list[tuple[str, str | None]] = [("Image sizes (source)", image_sizes(cols))]
    w, h = cols.get("orig_width"), cols.get("orig_height")
    if w is not None and h is not None:
        ratio = [a / b if a and b else None for a, b in zip(w.tolist(), h.tolist())]
        plots.append(("Aspect ratio (width / height)", _hist("aspect", ratio, "width / height",
                                                            {"max": config.get("max_aspect_ratio"),
                                                             "1/max": 1 / config["max_aspect_ratio"]
                                                             if config.get("max_aspect_ratio") else None})))
    plots.append(("Caption length", _hist("captions", cols.get("caption_chars", []), "characters",
                                          {"min": config.get("min_caption_chars"),
                                           "max": config.get("max_caption_chars")})))
    audio = config.get("audio") or {}
    plots.append(("Audio duration", _hist("durations", cols.get("duration", []), "seconds",
                                          {"min": audio.get("min_duration"), "max": audio.get("max_duration")})))
    rates = [r for r in (cols.get("source_sample_rate") if cols.get("source_sample_rate") is not None else [])
             if r is not None and not np.isnan(r)]
    plots.append(("Audio sample rate (source)", _bars("rates", Counter(int(r) for r in rates), "samples")))
    for name in sorted(set(cols) - KNOWN)[:MAX_EXTRA_PLOTS]:
        values = cols[name]
        if values.dtype.kind in "fiu":
            lines = {k: v for k, v in config.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and name in k}
            plots.append((f"{name} (curation)", _hist(f"x_{name}", values, name, lines)))
        elif values.dtype.kind in "bO":
            plots.append((f"{name} (curation)", _bars(f"x_{name}", Counter(str(v) for v in values if v is not None),
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
        plots.append(("Embeddings by modality (PCA)", _scatter("map_modality", _pca(vecs), labels)))
    first = "image" if "image" in sample else next(iter(sample), None)
    for modality in dict.fromkeys([m for m in (first, "audio") if m in sample]):
        vecs, shards = sample[modality]
        plots.append((f"{modality} embeddings by shard (PCA)", _scatter(f"map_shard_{modality}", _pca(vecs), shards)))
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


def _scatter(name: str, xy: np.ndarray, labels: list[str]) -> str | None:
    if not len(xy):
        return None
    fig, ax = _figure(5.5, 4.0)
    names = sorted(set(labels))
    shown = names if len(names) <= 10 else names[:9]
    colours = [f"C{i}" for i in range(10)]
    lab = np.asarray(labels)
    for i, n in enumerate(shown):
        m = lab == n
        ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.7, color=colours[i], label=n, rasterized=m.sum() > 1500)
    if len(names) > len(shown):
        m = ~np.isin(lab, shown)
        ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.5, color="#999999", label=f"{len(names) - len(shown)} more")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="best", markerscale=1.5)
    return _svg(fig, name)
