"""The report's chart writer (mmdata.report.svg): well-formed SVG whose bars, lines and points are
where the numbers put them, escaped labels, the same bytes for the same data, a bounded size."""
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from mmdata.report import svg
from mmdata.report.plots import distribution_plots, embedding_maps

NS = "{http://www.w3.org/2000/svg}"
HOSTILE = "<script>alert(\"x\")</script> & 'quoted'"


def parse(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == NS + "svg" and re.fullmatch(r"0 0 \d+ \d+", root.get("viewBox"))
    assert "width" not in root.attrib and "height" not in root.attrib  # the page's CSS sizes it
    assert " id=" not in text and "<style" not in text  # nothing that leaks into, or collides in, the page
    return root


def bars(root: ET.Element, colour: str = svg.BAR) -> list[dict]:
    group = next(g for g in root.iter(NS + "g") if g.get("fill") == colour)
    return [{k: float(r.get(k)) for k in ("x", "y", "width", "height")} for r in group.iter(NS + "rect")]


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(NS + "text")]


def test_histogram_bars_are_numpy_histogram_counts():
    values = np.random.default_rng(3).normal(30, 12, 5000)
    root = parse(svg.histogram(values, 40, "characters"))
    counts, edges = np.histogram(values, bins=40)
    rects = bars(root)
    assert len(rects) == 40
    unit = max(r["height"] for r in rects) / counts.max()  # px per sample
    for r, n in zip(rects, counts):
        assert r["height"] == pytest.approx(n * unit, abs=0.15)
    px_per_x = (rects[-1]["x"] + rects[-1]["width"] - rects[0]["x"]) / (edges[-1] - edges[0])
    for r, lo, hi in zip(rects, edges, edges[1:]):
        assert r["x"] == pytest.approx(rects[0]["x"] + (lo - edges[0]) * px_per_x, abs=0.15)
        assert r["width"] == pytest.approx((hi - lo) * px_per_x, abs=0.2)
    assert [r["y"] + r["height"] for r in rects] == pytest.approx([rects[0]["y"] + rects[0]["height"]] * 40, abs=0.15)
    assert {"characters", "samples"} <= set(texts(root))


def test_threshold_lines_sit_at_their_x_with_rotated_labels():
    values = np.arange(10, 50, dtype=float)
    root = parse(svg.histogram(values, 5, "characters", lines={"min": 5, "max": 60.5}))
    _, edges = np.histogram(values, bins=5)
    rects = bars(root)
    px_per_x = (rects[-1]["x"] + rects[-1]["width"] - rects[0]["x"]) / (edges[-1] - edges[0])
    dashed = [p for p in root.iter(NS + "path") if p.get("stroke") == svg.LINE]
    assert [p.get("stroke-dasharray") for p in dashed] == ["5 3", "5 3"]
    for path, x in zip(dashed, (5, 60.5)):
        line_x = float(re.match(r"M([-\d.]+) ", path.get("d")).group(1))
        assert line_x == pytest.approx(rects[0]["x"] + (x - edges[0]) * px_per_x, abs=0.15)
    labels = [t for t in root.iter(NS + "text") if t.get("fill") == svg.LINE]
    assert [t.text for t in labels] == ["min", "max"] and all("rotate(-90)" in t.get("transform") for t in labels)


def test_labels_from_user_data_are_escaped():
    charts = [svg.hbars([HOSTILE, "b"], [3, 1], "samples", label_chars=100),
              svg.histogram([1, 2, 3], 5, HOSTILE, lines={HOSTILE: 2}),
              svg.category_scatter([[0, 0], [1, 1]], [HOSTILE, "b"], label_chars=100),
              svg.scatter([1, 2], [3, 4], HOSTILE, HOSTILE)]
    for chart in charts:
        assert "<script" not in chart and HOSTILE not in chart
        assert HOSTILE in texts(parse(chart))  # escaped, not mangled
    cut = svg.hbars(["x" * 80 + "<&"], [1], "samples")
    assert "x" * 23 + "…" in texts(parse(cut))
    assert "x" * 80 + "<&" in "".join(parse(cut).find(f".//{NS}rect/{NS}title").itertext())  # the tooltip keeps it whole
    odd = svg.hbars(["nul\x00 bell\x07 half\ud800"], [1], "samples")  # characters XML forbids
    assert "nul\ufffd bell\ufffd half\ufffd" in texts(parse(odd))
    odd.encode("utf-8")


def test_same_data_gives_the_same_bytes():
    rng = np.random.default_rng(5)
    values, xy = rng.gamma(2, 3, 3000), rng.normal(size=(9000, 2))
    labels = [f"shard{i % 14:05d}" for i in range(9000)]

    def draw():
        return [svg.histogram(values.copy(), 40, "x", lines={"min": 1.0}), svg.hbars(["a", "b"], [5, 2], "n"),
                svg.scatter(xy[:, 0].copy(), xy[:, 1].copy(), "w", "h"), svg.category_scatter(xy.copy(), list(labels))]

    first, second = draw(), draw()
    assert first == second
    for chart in first:
        parse(chart)


def test_a_million_points_stay_within_a_fixed_size():
    rng = np.random.default_rng(7)
    x, y = rng.integers(64, 6000, 1_000_000), rng.integers(64, 6000, 1_000_000)
    plain = svg.scatter(x, y, "source width (px)", "source height (px)")
    by_label = svg.category_scatter(np.column_stack([x, y]), [f"s{i % 50}" for i in range(1_000_000)])
    for chart in (plain, by_label):
        root = parse(chart)
        assert len(chart) < 120_000
        points = [c for g in root.iter(NS + "g") if g.get("fill-opacity") for c in g.iter(NS + "circle")]
        assert 1000 < len(points) <= svg.MAX_POINTS
        assert f"{svg.MAX_POINTS:,} of 1,000,000 points" in texts(root)
    few = parse(svg.scatter([1, 2, 3], [4, 5, 6], "w", "h"))
    assert len(list(few.iter(NS + "circle"))) == 3 and not any("points" in t for t in texts(few))


def test_scatter_points_are_placed_by_their_values():
    root = parse(svg.scatter([0, 10, 10], [0, 0, 20], "w", "h"))
    frame = next({k: float(r.get(k)) for k in ("x", "y", "width", "height")} for r in root.iter(NS + "rect")
                 if r.get("fill") == "none")
    points = [(float(e.get("cx")), float(e.get("cy"))) for e in root.iter(NS + "circle")]
    # the data range padded by 5% a side fills the frame; y grows upwards
    expected = [(frame["x"] + (a + 0.5) / 11 * frame["width"], frame["y"] + frame["height"] - (b + 1) / 22 * frame["height"])
                for a, b in ((0, 0), (10, 0), (10, 20))]
    assert points == [pytest.approx(p, abs=0.3) for p in expected]


def test_categories_beyond_ten_share_one_grey_entry_and_have_no_ticks():
    xy = np.random.default_rng(2).normal(size=(240, 2))
    names = [f"shard{i % 12:02d}" for i in range(240)]
    root = parse(svg.category_scatter(xy, names))
    legend = texts(root)
    assert legend == [f"shard{i:02d}" for i in range(9)] + ["3 more"]  # no tick labels, no axis titles
    fills = [g.get("fill") for g in root.iter(NS + "g") if g.get("fill-opacity")]
    assert fills == list(svg.PALETTE[:9]) + [svg.OTHER]
    two = parse(svg.category_scatter(xy[:4], ["text", "image", "text", "image"]))
    assert texts(two) == ["image", "text"]
    with pytest.raises(ValueError):
        svg.category_scatter(xy[:3], ["a"])


@pytest.mark.parametrize("values", [[5.0], [7, 7, 7, 7], [-3, -2.5, -0.001], [1e16, 1e16], [1e15, 1e15 + 1],
                                    [1e-300, 2e-300], [0, 1e300], list(range(100_000))], ids=repr)
def test_histogram_edge_cases(values):
    root = parse(svg.histogram(values, min(40, max(5, len(set(values)))), "x"))
    rects = bars(root)
    assert sum(1 for r in rects if r["height"] > 0) >= 1
    assert all(math.isfinite(v) and v >= 0 for r in rects for k, v in r.items() if k in ("width", "height"))
    assert all(-1 <= r["x"] <= 480 and 0 <= r["y"] <= 300 for r in rects)


def test_not_a_number_is_dropped_and_nothing_to_draw_is_none():
    mixed = [1.0, np.nan, 2.0, np.inf, -np.inf, None, 2.0, 1e308]
    root = parse(svg.histogram(mixed, 5, "x"))
    counts, _ = np.histogram([1.0, 2.0, 2.0], bins=5)
    heights = [r["height"] for r in bars(root)]
    assert heights == pytest.approx([n * max(heights) / counts.max() for n in counts], abs=0.15)
    assert svg.histogram([np.nan, None, np.inf], 5, "x") is None and svg.histogram([], 5, "x") is None
    assert svg.scatter([1, np.nan], [np.nan, 2], "w", "h") is None
    assert svg.hbars([], [], "n") is None and svg.category_scatter(np.zeros((0, 2)), []) is None
    one = parse(svg.scatter([5, 5, np.nan], [9, 9, 1], "w", "h"))  # a zero-width range, one pair dropped
    assert len(list(one.iter(NS + "circle"))) == 1
    parse(svg.category_scatter(np.zeros((5, 2)), ["a"] * 5))


def test_huge_and_negative_counts():
    root = parse(svg.hbars(["big", "small"], [10**15, 3], "samples"))
    rects = bars(root)
    assert rects[0]["width"] > 100 * max(rects[1]["width"], 0.01) and rects[0]["y"] < rects[1]["y"]
    assert all(len(t) <= 10 for t in texts(root) if t not in ("big", "small", "samples"))
    root = parse(svg.hbars(["down", "up"], [-4, 8], "change"))
    down, up = bars(root)
    assert down["x"] + down["width"] == pytest.approx(up["x"], abs=0.15)  # both start at zero
    assert up["width"] == pytest.approx(2 * down["width"], abs=0.2)


def test_nice_ticks():
    rng = np.random.default_rng(11)
    for _ in range(500):
        lo = float(rng.normal() * 10.0 ** rng.integers(-6, 12))
        hi = lo + float(abs(rng.normal()) * 10.0 ** rng.integers(-3, 12)) + 1e-6 * abs(lo) + 1e-12
        ticks, step = svg.nice_ticks(lo, hi)
        mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
        assert round(mantissa, 6) in (1, 2, 5)
        assert 2 <= len(ticks) <= 11 and all(lo - step * 1e-6 <= t <= hi + step * 1e-6 for t in ticks)
        labels = svg.tick_labels(ticks, step)
        assert all(len(s) <= 10 for s in labels)
    assert svg.tick_labels(*svg.nice_ticks(0, 1.05)) == ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert svg.tick_labels(*svg.nice_ticks(0, 1.05, whole=True)) == ["0", "1"]
    assert svg.tick_labels(*svg.nice_ticks(0, 2_100_000)) == ["0", "0.5M", "1.0M", "1.5M", "2.0M"]


def test_the_report_plots_keep_their_titles_and_thresholds():
    n = 300
    cols = {"orig_width": np.arange(n) + 100, "orig_height": np.full(n, 480), "caption_chars": np.arange(n) % 90.0,
            "clip_score": np.linspace(0.1, 0.4, n), "lang": np.asarray([HOSTILE if i % 3 else "en" for i in range(n)], dtype=object)}
    config = {"max_aspect_ratio": 3.0, "min_caption_chars": 5, "max_caption_chars": 0, "min_clip_score": 0.2}
    plots = dict(distribution_plots(cols, config))
    assert list(plots) == ["Image sizes (source)", "Aspect ratio (width / height)", "Caption length",
                           "clip_score (curation)", "lang (curation)"]
    for title, chart in plots.items():
        root = parse(chart)
        assert title != "lang (curation)" or HOSTILE[:23] + "…" in texts(root)  # cut, escaped
    caption_lines = [t.text for t in parse(plots["Caption length"]).iter(NS + "text") if t.get("fill") == svg.LINE]
    assert caption_lines == ["min"]  # a maximum of 0 marks nothing
    assert [t.text for t in parse(plots["clip_score (curation)"]).iter(NS + "text")
            if t.get("fill") == svg.LINE] == ["min_clip_score"]
    sample = {"image": (np.random.default_rng(0).normal(size=(30, 8)), ["00000"] * 15 + ["00001"] * 15),
              "text": (np.random.default_rng(1).normal(size=(30, 8)), ["00000"] * 30)}
    maps = dict(embedding_maps(sample))
    assert list(maps) == ["Embeddings by modality (PCA)", "image embeddings by shard (PCA)"]
    assert texts(parse(maps["Embeddings by modality (PCA)"])) == ["image", "text"]
