"""Every python block of README.md and docs/*.md runs as written on a build made like `make demo`'s,
and every relative link of these files points to an existing file.

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
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def read(doc):
    return open(os.path.join(ROOT, doc), encoding="utf-8").read()


def python_blocks(doc):
    """(first line number, code, skip reason or None) of each ```python block of ``doc``."""
    lines = read(doc).splitlines()
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


BLOCKS = python_blocks("README.md")
ALL = [(doc, *b) for doc in DOCS for b in python_blocks(doc)]


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
    assert len(DOCS) >= 8, DOCS  # README.md and the reference in docs/
    for doc in DOCS:  # no stray markers
        markers = re.findall(r"^\s*<!--\s*readme-test", read(doc), re.MULTILINE)
        assert len(markers) == len([b for b in python_blocks(doc) if b[2] is not None]), doc


def test_readme_starts_with_the_two_commands():
    commands = [line.split("#")[0].strip() for line in read("README.md").split("```")[1].splitlines() if line.strip()]
    assert commands[:2] == ["make demo", "make test"], commands
    assert "make bench" in commands, commands


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_point_to_existing_files(doc):
    targets = [t for t in LINK.findall(read(doc)) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    missing = [t for t in targets if not os.path.exists(os.path.join(ROOT, os.path.dirname(doc), t.split("#")[0]))]
    assert not missing, f"{doc} links to missing files: {missing}"


def test_link_checker_sees_relative_links():
    assert any("docs/build.md" in t for t in LINK.findall(read("README.md")))
    assert any(t.startswith("../") for doc in DOCS for t in LINK.findall(read(doc)))


def test_brace_patterns_name_exactly_the_demos_shards(demo_dir):
    text = "\n".join(read(doc) for doc in DOCS)
    patterns = re.findall(r"demo_out/shards/\{(\d+)\.\.(\d+)\}\.tar", text)
    assert patterns
    tars = sorted(os.path.basename(p) for p in glob.glob(str(demo_dir / "demo_out" / "shards" / "*.tar")))
    for first, last in patterns:
        named = [f"{n:0{len(first)}d}.tar" for n in range(int(first), int(last) + 1)]
        assert named == tars, (first, last, tars)


@pytest.mark.parametrize("doc,line,code", [b[:3] for b in ALL if b[3] is None],
                         ids=[f"{b[0]}:{b[1]}" for b in ALL if b[3] is None])
def test_readme_block_runs(demo_dir, doc, line, code):
    res = subprocess.run([sys.executable, "-c", code], check=False, cwd=demo_dir, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert res.returncode == 0, f"{doc}:{line} failed:\n{res.stderr[-3000:]}"
    assert "Warning" not in res.stderr, f"{doc}:{line} warns:\n{res.stderr[-3000:]}"
