"""Numbers to SVG chart text: histograms, horizontal bars, scatters (plain, and coloured by category).

The text is inlined in report.html, so it is small and plain: no ids, no ``<style>`` (either would
leak into the page or collide with another chart), no fixed width or height (the page's CSS sizes a
chart from its viewBox), every label escaped. Same numbers, same bytes. NaN, inf and magnitudes
beyond ``LIMIT`` are dropped; a scatter draws at most ``MAX_POINTS`` points (a fixed-seed sample),
so a chart does not grow with the corpus.
"""
from __future__ import annotations

import math
import re
from html import escape

import numpy as np

BAR = "#4a7ab8"
LINE = "#c0392b"
OTHER = "#999999"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",  # matplotlib's tab10
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
MAX_POINTS = 2000
MAX_CATEGORIES = len(PALETTE)
LIMIT = 1e300  # numpy cannot bin, nor a scale map, a range that overflows a float
CHAR = 6.4  # px per character of the 11 px sans-serif, generous: margins are sized from it
_BAD_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def text(value, limit: int | None = None) -> str:
    """``value`` as escaped XML text, cut to ``limit`` characters with an ellipsis; characters XML
    forbids (controls, lone surrogates) become U+FFFD."""
    s = _BAD_XML.sub("\ufffd", str(value))
    if limit is not None and len(s) > limit:
        s = s[:limit - 1] + "…"
    return escape(s, quote=True)


def finite(values) -> np.ndarray:
    """The plottable numbers of ``values`` (None, NaN, inf and magnitudes beyond LIMIT dropped)."""
    a = np.asarray(values, dtype=np.float64).ravel()  # None becomes NaN
    return a[np.isfinite(a) & (np.abs(a) <= LIMIT)]


def _c(v: float) -> str:
    """A coordinate: one decimal, no trailing zero, never ``-0``."""
    return f"{round(float(v), 1) + 0.0:g}"


def _widen(lo: float, hi: float, pad: float) -> tuple[float, float]:
    """``[lo, hi]`` padded by ``pad`` of its span, or widened around a single value."""
    span = hi - lo
    if span <= 1e-9 * max(abs(lo), abs(hi)):
        half = max(abs(lo) * 0.05, 0.5)
        return lo - half, hi + half
    return lo - pad * span, hi + pad * span


def nice_ticks(lo: float, hi: float, whole: bool = False, target: int = 5) -> tuple[list[float], float]:
    """Ticks inside ``[lo, hi]`` (``lo < hi``) at multiples of a 1, 2 or 5 × 10^k step, about
    ``target`` of them (a step of at least 1 for ``whole`` numbers, such as counts), and the step."""
    span = hi - lo
    mag = 10.0 ** math.floor(math.log10(span / target))
    step = min((m * mag for m in (10, 5, 2, 1)), key=lambda st: abs(span / st - target))  # ties: the larger
    if whole:
        step = max(step, 1.0)
    k0, k1 = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [k * step + 0.0 for k in range(k0, k1 + 1)], step


def tick_labels(ticks: list[float], step: float) -> list[str]:
    """Short labels: ``0.2``, ``1,500``, ``2.5M``; at most 10 characters each."""
    big = max((abs(t) for t in ticks), default=0.0)
    unit, suffix = next(((u, s) for u, s in _SI if big >= 1e5 and big >= u), (1.0, ""))
    decimals = min(12, max(0, -math.floor(math.log10(step / unit) + 1e-9)))
    out = [f"{t / unit:,.{decimals}f}{suffix}" for t in ticks]
    if big >= 1e15 or any(len(s) > 10 for s in out):
        out = [f"{t:.4g}" for t in ticks]
    return ["0" if t == 0 else s for t, s in zip(ticks, out)]


class _Frame:
    """A plot area inside a ``width`` × ``height`` viewBox, with linear maps from data to px."""

    def __init__(self, width: int, height: int, box: tuple[float, float, float, float],
                 xdom: tuple[float, float], ydom: tuple[float, float], counts: str = ""):
        self.width, self.height = width, height
        self.counts = counts  # the axis ("x" or "y") that counts: its ticks are whole numbers
        self.left, self.top, self.right, self.bottom = box
        self.xdom, self.ydom = xdom, ydom
        self.kx = (self.right - self.left) / (xdom[1] - xdom[0])
        self.ky = (self.bottom - self.top) / (ydom[1] - ydom[0])
        self.parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
                       f'font-family="system-ui,sans-serif" font-size="11" fill="#333">')]

    def x(self, v):
        return self.left + (v - self.xdom[0]) * self.kx

    def y(self, v):
        return self.bottom - (v - self.ydom[0]) * self.ky

    def ticks(self, axis: str) -> tuple[list[float], float]:
        return nice_ticks(*(self.xdom if axis == "x" else self.ydom), whole=self.counts == axis)

    def grid(self, axis: str) -> None:
        """Light lines across the plot at the ticks of ``axis`` ("x" or "y"): draw them before the data."""
        if axis == "x":
            d = "".join(f"M{_c(self.x(t))} {_c(self.top)}V{_c(self.bottom)}" for t in self.ticks("x")[0])
        else:
            d = "".join(f"M{_c(self.left)} {_c(self.y(t))}H{_c(self.right)}" for t in self.ticks("y")[0])
        self.parts.append(f'<path stroke="#e4e4e4" fill="none" d="{d}"/>')

    def axes(self, xlabel: str, ylabel: str, yticks: bool = True) -> None:
        """The frame, ticks with labels, and the axis titles: draw them after the data."""
        p = self.parts
        xt, yt = self.ticks("x"), (self.ticks("y") if yticks else ([], 1.0))
        p.append(f'<rect x="{_c(self.left)}" y="{_c(self.top)}" width="{_c(self.right - self.left)}" '
                 f'height="{_c(self.bottom - self.top)}" fill="none" stroke="#666"/>')
        marks = "".join(f"M{_c(self.x(t))} {_c(self.bottom)}v4" for t in xt[0]) + \
            "".join(f"M{_c(self.left)} {_c(self.y(t))}h-4" for t in yt[0])
        p.append(f'<path stroke="#666" d="{marks}"/>')
        p.append('<g text-anchor="middle">' + "".join(
            f'<text x="{_c(self.x(t))}" y="{_c(self.bottom + 16)}">{text(s)}</text>'
            for t, s in zip(xt[0], tick_labels(*xt))) + "</g>")
        if yt[0]:
            p.append('<g text-anchor="end">' + "".join(
                f'<text x="{_c(self.left - 7)}" y="{_c(self.y(t) + 4)}">{text(s)}</text>'
                for t, s in zip(yt[0], tick_labels(*yt))) + "</g>")
        mid_x, mid_y = (self.left + self.right) / 2, (self.top + self.bottom) / 2
        p.append(f'<text x="{_c(mid_x)}" y="{_c(self.height - 6)}" text-anchor="middle" font-size="12">'
                 f'{text(xlabel, 60)}</text>')
        if ylabel:
            p.append(f'<text transform="translate(14 {_c(mid_y)}) rotate(-90)" text-anchor="middle" font-size="12">'
                     f'{text(ylabel, 40)}</text>')

    def note(self, s: str) -> None:
        """A small line of text above the plot's top right corner."""
        self.parts.append(f'<text x="{_c(self.right)}" y="{_c(self.top - 3)}" text-anchor="end" font-size="9" '
                          f'fill="#666">{text(s)}</text>')

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def _left_margin(ydom: tuple[float, float], whole: bool = False) -> float:
    labels = tick_labels(*nice_ticks(*ydom, whole))
    return 30 + CHAR * max(len(s) for s in labels)


def histogram(values, bins: int, xlabel: str, ylabel: str = "samples",
              lines: dict[str, float] | None = None) -> str | None:
    """Bars of ``numpy.histogram(values, bins)`` with dashed red lines (labelled, rotated) at
    ``lines``' x values; None when no value is plottable."""
    a = finite(values)
    if not len(a):
        return None
    try:
        counts, edges = np.histogram(a, bins=bins)
    except ValueError:  # one value, or a span below float resolution: numpy cannot make ``bins`` edges
        counts, edges = np.histogram(a, bins=bins, range=_widen(float(a.min()), float(a.max()), 0.0))
    marks = [(str(k), float(v)) for k, v in (lines or {}).items()
             if v is not None and math.isfinite(v) and abs(v) <= LIMIT]
    xs = [float(edges[0]), float(edges[-1])] + [v for _, v in marks]
    ydom = (0.0, max(1.0, float(counts.max())) * 1.05)
    xdom = _widen(min(xs), max(xs), 0.03)
    f = _Frame(480, 300, (_left_margin(ydom, True), 12, 456, 256), xdom, ydom, counts="y")
    f.grid("y")
    px, base = f.x(edges.astype(np.float64)), f.y(0.0)
    bars = []
    for i, n in enumerate(counts.tolist()):
        top = f.y(float(n))
        bars.append(f'<rect x="{_c(px[i])}" y="{_c(top)}" width="{_c(px[i + 1] - px[i])}" height="{_c(base - top)}">'
                    f'<title>{text(f"{edges[i]:.4g} to {edges[i + 1]:.4g}: {n:,}")}</title></rect>')
    f.parts.append(f'<g fill="{BAR}">{"".join(bars)}</g>')
    f.axes(xlabel, ylabel)
    for label, v in marks:
        x = _c(f.x(v))
        f.parts.append(f'<path stroke="{LINE}" stroke-dasharray="5 3" d="M{x} {_c(f.top)}V{_c(f.bottom)}"/>'
                       f'<text transform="translate({_c(f.x(v) - 3)} {_c(f.top + 4)}) rotate(-90)" text-anchor="end" '
                       f'font-size="9" fill="{LINE}">{text(label, 30)}</text>')
    return f.svg()


def hbars(labels: list, values: list[float], xlabel: str, label_chars: int = 24) -> str | None:
    """Horizontal bars of counts, the first label at the top; labels longer than ``label_chars`` are
    cut (the whole label is the bar's tooltip). None when there is no bar."""
    pairs = [(str(k), float(v)) for k, v in zip(labels, values)
             if math.isfinite(float(v)) and abs(float(v)) <= LIMIT]
    if not pairs:
        return None
    shown = [text(k, label_chars) for k, _ in pairs]
    left = 14 + CHAR * max(min(len(k), label_chars) for k, _ in pairs)
    vs = [v for _, v in pairs]
    lo, hi = min(0.0, min(vs)), max(0.0, max(vs))
    xdom = _widen(lo, hi, 0.0) if hi == lo else (lo * 1.05, hi * 1.05)
    f = _Frame(480, 300, (left, 12, 456, 256), xdom, (0, len(pairs)), counts="x")
    f.grid("x")
    band = (f.bottom - f.top) / len(pairs)
    thick = min(band * 0.8, 24.0)
    bars, names = [], []
    for i, ((k, v), s) in enumerate(zip(pairs, shown)):
        mid = f.top + band * (i + 0.5)
        x0, x1 = sorted((f.x(0.0), f.x(v)))
        bars.append(f'<rect x="{_c(x0)}" y="{_c(mid - thick / 2)}" width="{_c(x1 - x0)}" height="{_c(thick)}">'
                    f'<title>{text(k)}: {text(f"{v:,.6g}")}</title></rect>')
        names.append(f'<text x="{_c(f.left - 6)}" y="{_c(mid + 4)}">{s}</text>')
    f.parts.append(f'<g fill="{BAR}">{"".join(bars)}</g>')
    f.axes(xlabel, "", yticks=False)
    f.parts.append(f'<g text-anchor="end">{"".join(names)}</g>')
    return f.svg()


def _sample(n: int, limit: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most ``limit`` of ``n`` points, in order: a fixed-seed draw, so the same data
    gives the same picture, and periodic data is not aliased as a stride would alias it."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, limit, replace=False))


def _dots(f: _Frame, x: np.ndarray, y: np.ndarray, colour: str, opacity: str, r: str) -> str:
    """One circle per distinct position (to 0.5 px): points drawn on top of each other draw once."""
    px = np.round(np.column_stack([f.x(x), f.y(y)]) * 2) / 2
    _, first = np.unique(px, axis=0, return_index=True)
    return (f'<g fill="{colour}" fill-opacity="{opacity}">'
            + "".join(f'<circle cx="{_c(a)}" cy="{_c(b)}" r="{r}"/>' for a, b in px[np.sort(first)].tolist()) + "</g>")


def _pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y) & (np.abs(x) <= LIMIT) & (np.abs(y) <= LIMIT)
    return x[keep], y[keep]


def scatter(x, y, xlabel: str, ylabel: str) -> str | None:
    """Points (x, y) with ticked axes; a pair with a coordinate that cannot be plotted is dropped.
    None when no pair is left."""
    x, y = _pairs(x, y)
    if not len(x):
        return None
    pick = _sample(len(x))
    xdom, ydom = _widen(float(x.min()), float(x.max()), 0.05), _widen(float(y.min()), float(y.max()), 0.05)
    f = _Frame(480, 300, (_left_margin(ydom), 12, 456, 256), xdom, ydom)
    f.parts.append(_dots(f, x[pick], y[pick], BAR, ".5", "2.5"))
    f.axes(xlabel, ylabel)
    if len(pick) < len(x):
        f.note(f"{len(pick):,} of {len(x):,} points")
    return f.svg()


def category_scatter(xy, labels: list, label_chars: int = 16) -> str | None:
    """Points coloured by label (sorted; beyond ``MAX_CATEGORIES`` labels the first nine keep a
    colour and the rest are grey, "N more"), with a legend and no ticks. None when no point is plottable."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(xy) != len(labels):
        raise ValueError(f"{len(xy)} points but {len(labels)} labels")
    keep = np.isfinite(xy).all(axis=1) & (np.abs(xy) <= LIMIT).all(axis=1)
    xy, lab = xy[keep], np.asarray([str(v) for v in labels], dtype=object)[keep]
    if not len(xy):
        return None
    names = sorted(set(lab.tolist()))
    shown = names if len(names) <= MAX_CATEGORIES else names[:MAX_CATEGORIES - 1]
    pick = _sample(len(xy))
    xy, lab = xy[pick], lab[pick]
    xdom = _widen(float(xy[:, 0].min()), float(xy[:, 0].max()), 0.05)
    ydom = _widen(float(xy[:, 1].min()), float(xy[:, 1].max()), 0.05)
    f = _Frame(560, 340, (8, 14, 420, 332), xdom, ydom)
    f.parts.append('<rect x="8" y="14" width="412" height="318" fill="none" stroke="#666"/>')
    groups = [(n, PALETTE[i], lab == n) for i, n in enumerate(shown)]
    if len(names) > len(shown):
        groups.append((f"{len(names) - len(shown)} more", OTHER, ~np.isin(lab, shown)))
    legend = []
    for i, (name, colour, m) in enumerate(groups):
        if m.any():
            f.parts.append(_dots(f, xy[m, 0], xy[m, 1], colour, ".7" if colour != OTHER else ".5", "3"))
        y = 26 + 17 * i
        legend.append(f'<circle cx="436" cy="{y - 4}" r="4.5" fill="{colour}"/>'
                      f'<text x="446" y="{y}">{text(name, label_chars)}</text>')
    f.parts.append("<g>" + "".join(legend) + "</g>")
    if len(pick) < int(keep.sum()):
        f.note(f"{len(pick):,} of {int(keep.sum()):,} points")
    return f.svg()
