"""The switch of ``mmdata embed``: new embeddings, indexes and manifest replace the old ones together.

``mmdata embed`` stages everything new under ``.mmdata-embed/<config hash>/`` (invisible to the
readers of the output) and commits it with one file, ``SWITCH.json``, written atomically last.
From then on the new generation is decided: ``finish_switch`` moves it into place — the old
``embeddings/`` and ``index/`` aside, the staged ones in (each a directory rename), the units'
``_stats.json`` updated, ``manifest.json`` renamed over the old one last — and removes the staging
folder. Every step can be repeated, so a run killed during the switch is finished by the next
mmdata command that opens the output (``mmdata embed``, ``build``, ``verify``, ``search``), the way
a database replays its journal. Killed before ``SWITCH.json``, the output keeps its old generation
and a re-run of ``mmdata embed`` resumes the staging.

On a local (POSIX) output every rename is atomic; on an object store a "rename" copies and
deletes, and the roll-forward above is what keeps the output whole.
"""
from __future__ import annotations

import json
import os
import posixpath

from mmdata.storage import OutputDir, fsync_dir

STAGING = ".mmdata-embed"
SWITCH = "SWITCH.json"


def move(out: OutputDir, src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` (files or folders, relative to ``out``); ``dst`` must not be a folder."""
    if out.local:
        os.makedirs(posixpath.dirname(out.path(dst)), exist_ok=True)
        os.replace(out.path(src), out.path(dst))
        fsync_dir(posixpath.dirname(out.path(dst)))
        fsync_dir(posixpath.dirname(out.path(src)))
    else:
        out.fs.mv(out.path(src), out.path(dst), recursive=True)


def _swap(out: OutputDir, stage: str, name: str, staged: bool) -> None:
    """Put the staged folder ``name`` in place of the output's (moved to ``<stage>/old/``); with
    nothing staged (no index this time), only move the old one away. Repeatable."""
    new, old = f"{stage}/{name}", f"{stage}/old/{name}"
    if staged and not out.exists(new):
        return  # moved in by an earlier, interrupted switch
    if out.exists(name):
        out.remove(old)
        move(out, name, old)
    if staged:
        move(out, new, name)
    pause("switch")


def pending_switch(out: OutputDir) -> str | None:
    """The staging folder of a committed, unfinished switch, if any."""
    found = out.glob(f"{STAGING}/*/{SWITCH}") if out.exists(STAGING) else []
    return posixpath.dirname(found[0]) if found else None


def finish_switch(out: OutputDir) -> bool:
    """Finish a switch that ``SWITCH.json`` committed (see the module docstring); True if there was one."""
    stage = pending_switch(out)
    if stage is None:
        return False
    switch = json.loads(out.read_bytes(f"{stage}/{SWITCH}"))
    _swap(out, stage, "embeddings", True)
    _swap(out, stage, "index", switch["index"])
    for name, rows in sorted(switch["units"].items()):  # the units' stats name the new encoder and config
        rel = f"shards/{name}_stats.json"
        stats = json.loads(out.read_bytes(rel))
        stats.update(config_hash=switch["config_hash"], encoder=switch["encoder"],
                     embeddings={m: {"rows": rows, "dtype": switch["dtype"]} for m in switch["modalities"]})
        out.write_bytes(rel, json.dumps(stats, indent=1, sort_keys=True).encode())
    if out.exists(f"{stage}/manifest.json"):
        move(out, f"{stage}/manifest.json", "manifest.json")  # last: the output now describes the new generation
    pause("switch")
    out.remove(stage)
    if out.local and not os.listdir(out.path(STAGING)):
        os.rmdir(out.path(STAGING))
    return True


_PAUSES: dict[str, int] = {}


def pause(where: str) -> None:
    """Tests only: with ``MMDATA_TEST_EMBED_PAUSE=<where>:<n>`` (``unit``, ``commit``, ``switch``), the
    n-th time this process passes ``where`` it prints ``mmdata-embed-pause <where> <n>`` and sleeps, so
    a test can kill ``mmdata embed`` at that point."""
    wanted = os.environ.get("MMDATA_TEST_EMBED_PAUSE")
    if not wanted:
        return
    _PAUSES[where] = _PAUSES.get(where, 0) + 1
    if wanted == f"{where}:{_PAUSES[where]}":
        import sys
        import time

        print(f"mmdata-embed-pause {wanted}", file=sys.stderr, flush=True)
        time.sleep(600)
