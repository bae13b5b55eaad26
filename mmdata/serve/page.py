"""The search page of ``mmdata serve``: one HTML document, inline CSS and JS, talking to the JSON API."""
from __future__ import annotations

import json
from html import escape

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 40px;color:#222}
h1{font-size:20px;margin:16px 0 4px}.sub{color:#666}form{display:flex;gap:8px;flex-wrap:wrap;align-items:center;margin:10px 0}
input[type=text]{width:360px;padding:5px}#drop{border:2px dashed #aaa;border-radius:6px;padding:10px 14px;color:#555}
#drop.over{border-color:#1a5fb4;background:#eef4fb}#status{margin:8px 0;color:#555}#error{color:#a33;margin:8px 0}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:190px;font-size:12px;border:1px solid #ddd;border-radius:6px;padding:5px;cursor:pointer;background:#fff}
.card:hover{border-color:#1a5fb4}.card img{max-width:180px;max-height:180px;display:block}.card audio{width:180px}
.key{color:#555;word-break:break-all}.score{font-weight:600}
"""

JS = r"""
const $ = (s) => document.querySelector(s);
function show(data, title) {
  $('#error').textContent = '';
  $('#status').textContent = title + ': ' + data.results.length + ' results (' + data.modality + ' index)';
  const grid = $('#results');
  grid.innerHTML = '';
  for (const r of data.results) {
    const card = document.createElement('div');
    card.className = 'card result';
    card.dataset.key = r.key;
    card.title = 'click for the neighbours of ' + r.key;
    if (r.thumbnail) { const img = document.createElement('img'); img.src = r.thumbnail; img.alt = r.key; card.appendChild(img); }
    if (r.audio) {
      const a = document.createElement('audio'); a.controls = true; a.preload = 'none'; a.src = r.audio;
      a.addEventListener('click', (e) => e.stopPropagation()); card.appendChild(a);
    }
    const s = document.createElement('div'); s.className = 'score'; s.textContent = r.rank + '. ' + r.score.toFixed(4); card.appendChild(s);
    if (r.caption) { const c = document.createElement('div'); c.className = 'caption'; c.textContent = r.caption; card.appendChild(c); }
    const k = document.createElement('div'); k.className = 'key'; k.textContent = r.key + ' (' + r.shard + ')'; card.appendChild(k);
    card.addEventListener('click', () => neighbours(r.key));
    grid.appendChild(card);
  }
}
async function call(url, opts, title) {
  $('#status').textContent = 'searching…';
  const res = await fetch(url, opts);
  const data = await res.json();
  if (!res.ok) { $('#status').textContent = ''; $('#error').textContent = data.error || res.statusText; $('#results').innerHTML = ''; return; }
  show(data, title);
}
function params(extra) {
  const p = new URLSearchParams(extra);
  p.set('k', $('#k').value); p.set('modality', $('#modality').value);
  return p;
}
function neighbours(key) {
  call('/api/search?' + params({key: key}), {}, 'neighbours of ' + key);
}
function upload(file) {
  if (file.size > MAX_UPLOAD) { $('#error').textContent = file.name + ' is over the upload limit of ' + MAX_UPLOAD + ' bytes'; return; }
  const audio = file.type.startsWith('audio/');
  const p = params({kind: audio ? 'audio' : 'image'});
  if (audio) { p.set('ext', file.name.split('.').pop()); if (MODALITIES.includes('audio')) p.set('modality', 'audio'); }
  call('/api/search?' + p, {method: 'POST', body: file, headers: {'Content-Type': file.type || 'application/octet-stream'}},
       'similar to ' + file.name);
}
$('#form').addEventListener('submit', (e) => {
  e.preventDefault();
  const q = $('#q').value.trim();
  if (q) call('/api/search?' + params({text: q}), {}, '“' + q + '”');
});
$('#file').addEventListener('change', (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
const drop = $('#drop');
drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => { e.preventDefault(); drop.classList.remove('over'); if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]); });
"""


def search_page(name: str, modalities: list[str], manifest: dict, max_upload: int) -> str:
    counts = manifest.get("counts") or {}
    enc = (manifest.get("embeddings") or {}).get("encoder") or {}
    options = "".join(f"<option value='{escape(m)}'{' selected' if m == 'image' else ''}>{escape(m)}</option>"
                      for m in modalities)
    consts = f"const MODALITIES = {json.dumps(modalities)}; const MAX_UPLOAD = {int(max_upload)};"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>mmdata serve: " + escape(name) + "</title>"
        "<link rel='icon' href='data:,'><meta name='viewport' content='width=device-width'>"
        f"<style>{CSS}</style></head><body>"
        f"<h1>{escape(name)}</h1><p class='sub'>{counts.get('written', 0)} samples; indexes: {escape(', '.join(modalities))}"
        + (f"; model {escape(str(enc.get('model')))}/{escape(str(enc.get('pretrained')))}" if enc else "")
        + ". Type a query, drop an image or audio file, or click a result for its neighbours. "
          "JSON API: <code>/api/search</code>, clip-retrieval: <code>/knn-service</code>, <code>/indices-list</code>.</p>"
        "<form id='form'><input id='q' type='text' placeholder='a text query' autofocus>"
        f"<select id='modality'>{options}</select>"
        "<label>k <input id='k' type='number' value='12' min='1' max='1000' style='width:60px'></label>"
        "<button type='submit' id='go'>Search</button>"
        "<span id='drop'>drop an image or audio file here, or <input id='file' type='file' accept='image/*,audio/*'></span>"
        "</form><div id='error'></div><div id='status'></div><div id='results' class='grid'></div>"
        f"<script>{consts}{JS}</script></body></html>"
    )
