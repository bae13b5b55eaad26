"""The report as one HTML string: inline CSS and JS, images and audio as data URIs, no network."""
from __future__ import annotations

import json
from html import escape

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 40px;color:#222}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666}.counts{display:flex;gap:12px;flex-wrap:wrap}.count{border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.count b{display:block;font-size:22px}table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child,td.l,.funnel th:nth-child(2){text-align:left}.bar{background:#4a7ab8;height:10px;display:inline-block}
button.reason{background:none;border:none;color:#1a5fb4;cursor:pointer;text-decoration:underline;padding:0;font:inherit}
.examples{display:none;padding:8px;background:#f6f6f6}.examples.open{display:flex}
.grid,.examples{flex-wrap:wrap;gap:10px}.grid{display:flex}.card{width:170px;font-size:12px;border:1px solid #ddd;border-radius:6px;padding:5px;background:#fff}
.card img{max-width:160px;max-height:160px;display:block}.card audio{width:160px}.key{color:#555;word-break:break-all}
.note{color:#a33}.views{display:flex;gap:4px;margin-top:4px}.views .card{width:auto;padding:2px}.views img{max-width:72px;max-height:72px}
.plots{display:flex;flex-wrap:wrap;gap:14px}.plot{width:480px}.plot svg{width:100%;height:auto}
.nb{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start;margin-bottom:10px}.nb .query{border-color:#c0392b}
pre{background:#f6f6f6;padding:8px;overflow:auto;max-height:360px;font-size:12px}
"""

JS = """
document.querySelectorAll('button.reason').forEach(function(b){
  b.addEventListener('click',function(){
    var ex=document.getElementById(b.dataset.target);
    ex.classList.toggle('open');b.setAttribute('aria-expanded',ex.classList.contains('open'));
  });
});
"""


def _e(v) -> str:
    return escape("" if v is None else str(v))


def _n(v) -> str:
    return "" if v is None else f"{v:,}" if isinstance(v, int) else _e(v)


def card_html(c: dict, cls: str = "card") -> str:
    parts = [f'<div class="{cls}" data-key="{_e(c["key"])}">']
    if c.get("thumb"):
        parts.append(f'<img src="{c["thumb"]}" alt="{_e(c["key"])}" loading="eager">')
    if c.get("audio"):
        parts.append(f'<audio controls preload="none" src="{c["audio"]}"></audio>')
    if c.get("score") is not None:
        parts.append(f'<div>score {c["score"]:.4f}</div>')
    if c.get("start") is not None and c.get("end") is not None:
        parts.append(f'<div>{c["start"]:.2f}–{c["end"]:.2f} s</div>')
    if c.get("caption"):
        parts.append(f'<div class="caption">{_e(c["caption"][:200])}</div>')
    parts.append(f'<div class="key">{_e(c["key"])}</div>')
    if c.get("detail"):
        parts.append(f'<div class="note">{_e(c["detail"][:200])}</div>')
    if c.get("note"):
        parts.append(f'<div class="note">{_e(c["note"])}</div>')
    if c.get("sources") and not c.get("thumb"):
        parts.append(f'<div class="key">{_e(", ".join(c["sources"])[:200])}</div>')
    if c.get("views"):
        parts.append('<div class="views">' + "".join(card_html(v) for v in c["views"]) + "</div>")
    parts.append("</div>")
    return "".join(parts)


def _counts(manifest: dict) -> str:
    c = manifest.get("counts", {})
    t = manifest.get("timings", {})
    items = [("records", manifest.get("records", c.get("inputs"))), ("inputs", c.get("inputs")),
             ("written", c.get("written")), ("filtered", c.get("filtered")), ("failed", c.get("failed"))]
    out = ['<div class="counts">']
    for name, v in items:
        out.append(f'<div class="count"><b data-count="{name}">{_e(v)}</b>{name}</div>')
    out.append(f'<div class="count"><b>{_e(t.get("samples_per_second"))}</b>samples/s</div>')
    out.append(f'<div class="count"><b>{_e(t.get("wall_seconds"))}</b>seconds</div></div>')
    return "".join(out)


def _funnel(manifest: dict, funnel: dict) -> str:
    c = manifest.get("counts", {})
    kinds = funnel["kinds"]
    top = max(c.get("inputs") or 1, 1)
    head = "".join(f"<th>{_e(k)}</th>" for k in kinds)
    rows = [f'<table class="funnel"><tr><th>status</th><th>reason</th><th>rows</th><th></th>{head}</tr>',
            f'<tr><td>records</td><td></td><td>{_n(manifest.get("records"))}</td><td></td>{"<td></td>" * len(kinds)}</tr>',
            (f'<tr><td>inputs</td><td class="l">rows (segments and views included)</td><td>{_n(c.get("inputs"))}</td>'
             f'<td><span class="bar" style="width:200px"></span></td>{"<td></td>" * len(kinds)}</tr>')]
    for i, r in enumerate(funnel["rows"]):
        width = max(1, round(200 * r["count"] / top))
        by = "".join(f"<td>{_n(r['by_kind'].get(k)) if r['by_kind'].get(k) else ''}</td>" for k in kinds)
        rows.append(f'<tr class="reason-row" data-status="{_e(r["status"])}" data-reason="{_e(r["reason"])}" '
                    f'data-n="{r["count"]}"><td>{_e(r["status"])}</td><td class="l"><button class="reason" '
                    f'data-target="ex-{i}" aria-expanded="false">{_e(r["reason"])}</button></td><td>{_n(r["count"])}</td>'
                    f'<td><span class="bar" style="width:{width}px;background:#c0392b"></span></td>{by}</tr>')
        examples = "".join(card_html(x) for x in r["examples"]) or "<i>no example readable</i>"
        rows.append(f'<tr><td colspan="{4 + len(kinds)}" class="l"><div class="examples" id="ex-{i}">{examples}</div></td></tr>')
    w = c.get("written") or 0
    by = "".join(f"<td>{_n(funnel['written_by_kind'].get(k)) if funnel['written_by_kind'].get(k) else ''}</td>" for k in kinds)
    rows.append(f'<tr><td><b>written</b></td><td></td><td><b>{_n(w)}</b></td>'
                f'<td><span class="bar" style="width:{max(1, round(200 * w / top))}px;background:#2e8b57"></span></td>{by}</tr>')
    rows.append("</table>")
    return "".join(rows)


def _shards(rows: list[dict], manifest: dict) -> str:
    t = manifest.get("timings", {})
    stage = manifest.get("stage_seconds", {})
    out = [f'<p>{_n(manifest.get("units"))} shards; {_e(t.get("samples_per_second"))} samples/s over '
           f'{_e(t.get("wall_seconds"))} s wall'
           + (f'; index built in {_e(t.get("index_seconds"))} s' if t.get("index_seconds") is not None else "")
           + ". Seconds per stage (summed over workers): "
           + ", ".join(f"{_e(k)} {_e(v)}" for k, v in stage.items()) + "</p>"]
    d = manifest.get("downloads")
    if d:
        out.append(f'<p class="downloads">Downloads: {_n(d.get("urls"))} URLs, {_n(d.get("requests"))} HTTP requests '
                   f'({_n(d.get("retries"))} retries), {_n(d.get("bytes"))} body bytes received, {_e(d.get("seconds"))} s '
                   "(summed over URLs). Outcomes: "
                   + ", ".join(f"{_e(k)} {_n(v)}" for k, v in (d.get("outcomes") or {}).items()) + "</p>")
    out.append('<table class="shards"><tr><th>shard</th><th>records</th><th>inputs</th><th>written</th><th>filtered</th>'
               '<th>failed</th><th>bytes</th><th>seconds</th><th>inputs/s</th></tr>')
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_n(r[k])}</td>" for k in ("shard", "records", "inputs", "written", "filtered",
                                                                       "failed", "bytes", "seconds", "per_second"))
                   + "</tr>")
    out.append("</table>")
    return "".join(out)


def _plots(plots: list[tuple[str, str]], empty: str) -> str:
    if not plots:
        return f"<p class='sub'>{_e(empty)}</p>"
    return '<div class="plots">' + "".join(f'<div class="plot"><h3>{_e(t)}</h3>{svg}</div>' for t, svg in plots) + "</div>"


def _provenance(manifest: dict) -> str:
    emb = manifest.get("embeddings") or {}
    enc = emb.get("encoder") or {}
    rows = [("config hash", manifest.get("config_hash")), ("mmdata", manifest.get("mmdata_version")),
            ("finished", manifest.get("finished"))]
    if enc:
        rows += [("model", enc.get("model")), ("pretrained", enc.get("pretrained")),
                 ("checkpoint sha256", enc.get("checkpoint_sha256") or "none (random or hub weights)")]
    if emb.get("audio_encoder"):
        rows.append(("audio encoder", json.dumps(emb["audio_encoder"], sort_keys=True)))
    for m, i in (manifest.get("index") or {}).items():
        rows.append((f"index {m}", f"{i.get('index_key')}, n={i.get('n')}, recall@10={i.get('recall_at_10')}"))
    for k, v in (manifest.get("timings") or {}).items():
        rows.append((k, v))
    out = ['<table class="prov">' + "".join(f'<tr><td>{_e(k)}</td><td class="l">{_e(v)}</td></tr>' for k, v in rows)
           + "</table>"]
    versions = manifest.get("versions") or {}
    out.append("<h3>Package versions</h3><table>" + "".join(f'<tr><td>{_e(k)}</td><td class="l">{_e(v)}</td></tr>'
                                                          for k, v in sorted(versions.items())) + "</table>")
    out.append("<h3>Config</h3><pre>" + _e(json.dumps(manifest.get("config"), indent=1, sort_keys=True)) + "</pre>")
    return "".join(out)


def render(title: str, d: dict) -> str:
    m = d["manifest"]
    grid = '<div class="grid">' + "".join(card_html(c) for c in d["grid"]) + "</div>" if d["grid"] else \
        "<p class='sub'>no written sample</p>"
    nbs = "".join('<div class="nb">' + card_html({**g["query"], "views": []}, "card query") + "".join(card_html(h) for h in g["hits"])
                  + "</div>" for g in d["neighbours"]) or "<p class='sub'>no index</p>"
    notes = "".join(f"<li>{_e(n)}</li>" for n in d["notes"])
    body = [
        (f"<h1>{_e(title)}</h1><p class='sub'>mmdata report, build finished {_e(m.get('finished'))}; "
         f"samples shown are a bounded sample of the build</p>"),
        "<h2 id='counts'>Counts</h2>", _counts(m),
        "<h2 id='funnel'>Funnel</h2><p class='sub'>Click a reason for examples of the samples it removed.</p>",
        _funnel(m, d["funnel"]),
        "<h2 id='shards'>Shards and throughput</h2>", _shards(d["shards"], m),
        "<h2 id='distributions'>Distributions</h2>", _plots(d["plots"], "no column to plot"),
        "<h2 id='samples'>Written samples</h2>", grid,
        f"<h2 id='neighbours'>Neighbours ({_e(d['neighbours'][0]['modality']) if d['neighbours'] else 'none'} index)</h2>",
        "<p class='sub'>Each row: a query (red) and its nearest neighbours, best first.</p>" if d["neighbours"] else "",
        nbs,
        "<h2 id='map'>Embedding map</h2>", _plots(d["maps"], "no embeddings"),
        "<h2 id='provenance'>Provenance</h2>", _provenance(m),
        f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "",
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>" + _e(title) + "</title>"
            "<link rel='icon' href='data:,'><meta name='viewport' content='width=device-width'>"
            f"<style>{CSS}</style></head><body>" + "".join(body) + f"<script>{JS}</script></body></html>")
