import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MMDATA_STRICT", "1")  # a report that fails to write fails the test (a warning in real builds)

import pytest  # noqa: E402

from mmdata.build import build  # noqa: E402
from mmdata.config import load_config  # noqa: E402
from pipelines.demo_corpus import make_corpus  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The demo corpus (photos, odd modes, broken files) and what a build of it must produce."""
    root = tmp_path_factory.mktemp("corpus")
    expected = make_corpus(str(root))
    return str(root), expected


@pytest.fixture(scope="session")
def big_corpus(tmp_path_factory):
    """The demo corpus with three copies of each photo (73 records): enough units to kill a build mid-run."""
    root = tmp_path_factory.mktemp("big")
    make_corpus(str(root), copies=3)
    return str(root)


def run_build(input, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("samples_per_shard", 8)
    return build(load_config(input=str(input), out=str(out), **kw))


@pytest.fixture(scope="session")
def built(corpus, tmp_path_factory):
    """The demo corpus built once with the local engine (2 workers, tokens on)."""
    out = tmp_path_factory.mktemp("built")
    manifest = run_build(corpus[0], out, workers=2, tokenize=True)
    return str(out), manifest


def kill_at_line(cmd: list[str], env: dict, line: str) -> list[str]:
    """Start ``cmd``; SIGKILL its process group once it prints ``line`` on stderr (where it then
    sleeps: a test pause point). Returns the stderr lines up to there; fails if the line never came
    (within 300 s) or the process did not die of the kill."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    seen, lines, deadline = False, [], time.time() + 300
    try:
        for got in proc.stderr:  # ends when the process does (it sleeps 600 s at the pause)
            lines.append(got)
            if got.strip() == line:
                seen = True
                break
            assert time.time() < deadline, "".join(lines)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    assert seen, "".join(lines)
    assert proc.returncode == -signal.SIGKILL
    return lines
