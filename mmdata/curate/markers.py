"""Done markers of a curation's tasks, for resume: ``<scratch>/done/<stage>_<name>.json``.

A task writes its outputs first, each atomically, and its marker last (atomic rename too), so a
marker means the task's outputs are whole. A re-run of the same curation skips marked tasks.
"""
from __future__ import annotations

import json
import os

from mmdata.storage import OutputDir


def _rel(folder: str, stage: str, name: str) -> str:
    return f"{folder}/done/{stage}_{name}.json"


def is_done(out: OutputDir, folder: str, stage: str, name: str) -> bool:
    return out.exists(_rel(folder, stage, name))


def read_mark(out: OutputDir, folder: str, stage: str, name: str) -> dict:
    return json.loads(out.read_bytes(_rel(folder, stage, name)))


def mark_done(out: OutputDir, folder: str, stage: str, name: str, payload: dict | None = None) -> None:
    out.write_bytes(_rel(folder, stage, name), json.dumps(payload or {}, sort_keys=True).encode())
    _test_pause(out, folder, stage)


def _test_pause(out: OutputDir, folder: str, stage: str) -> None:
    """Tests only: with ``MMDATA_TEST_CURATE_PAUSE=<stage>:<n>``, the process that writes the n-th
    marker of ``stage`` prints ``mmdata-curate-pause <stage>:<n>`` and sleeps, so a test can SIGKILL
    ``mmdata curate`` there."""
    wanted = os.environ.get("MMDATA_TEST_CURATE_PAUSE")
    if not wanted or wanted.partition(":")[0] != stage:
        return
    if f"{stage}:{len(out.glob(f'{folder}/done/{stage}_*.json'))}" == wanted:
        import sys
        import time

        print(f"mmdata-curate-pause {wanted}", file=sys.stderr, flush=True)
        time.sleep(600)
