"""Every python block of README.md runs as written on a build made like `make demo`'s.

A block preceded by ``<!-- readme-test: skip (reason) -->`` is not run (the reason is required)."""
import glob
import os
import re
import subprocess
import sys

import pytest

from mmdata.build import build
from mmdata.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+)\)\s*-->")


def python_blocks():
    """(first line number, code, skip reason or None) of each ```python block of README.md."""
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.search(before)
            blocks.append((start + 1, "\n".join(lines[start:end]), skip.group(1) if skip else None))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def demo_dir(big_corpus, tmp_path_factory):
    """A folder holding demo_corpus/ and demo_out/ as `make demo` leaves them (same corpus, same config)."""
    root = tmp_path_factory.mktemp("readme")
    os.symlink(big_corpus, root / "demo_corpus")
    cfg = load_config(os.path.join(ROOT, "pipelines", "configs", "demo.yaml"), input=str(root / "demo_corpus"),
                      out=str(root / "demo_out"), progress=False, workers=2)
    build(cfg)
    return root


def test_the_readme_has_runnable_blocks_and_skips_say_why():
    assert len([b for b in BLOCKS if b[2] is None]) >= 3, BLOCKS
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert text.count("readme-test: skip") == len([b for b in BLOCKS if b[2] is not None])  # no stray markers


def test_brace_patterns_name_exactly_the_demos_shards(demo_dir):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    patterns = re.findall(r"demo_out/shards/\{(\d+)\.\.(\d+)\}\.tar", text)
    assert patterns
    tars = sorted(os.path.basename(p) for p in glob.glob(str(demo_dir / "demo_out" / "shards" / "*.tar")))
    for first, last in patterns:
        named = [f"{n:0{len(first)}d}.tar" for n in range(int(first), int(last) + 1)]
        assert named == tars, (first, last, tars)


@pytest.mark.parametrize("line,code", [(b[0], b[1]) for b in BLOCKS if b[2] is None],
                         ids=[f"README.md:{b[0]}" for b in BLOCKS if b[2] is None])
def test_readme_block_runs(demo_dir, line, code):
    res = subprocess.run([sys.executable, "-c", code], cwd=demo_dir, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert res.returncode == 0, f"README.md:{line} failed:\n{res.stderr[-3000:]}"
    assert "Warning" not in res.stderr, f"README.md:{line} warns:\n{res.stderr[-3000:]}"
