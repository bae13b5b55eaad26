"""The import rules of DESIGN.md, checked by import-linter (contracts in .importlinter)."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "import-linter is part of the dev extra"
    res = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def _lint_copy(tmp_path, extra: dict[str, str]):
    """lint-imports on a copy of the package with ``extra`` files (path under mmdata/ -> source) added."""
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    pkg = tmp_path / "mmdata"
    shutil.copytree(os.path.join(ROOT, "mmdata"), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "pipelines"), tmp_path / "pipelines",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for rel, text in extra.items():
        with open(pkg / rel, "a") as fh:
            fh.write(text)
    shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path / ".importlinter")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    return subprocess.run([exe, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


def test_a_broken_contract_is_reported(tmp_path):
    """The check can fail: a module outside engines that imports dask breaks the first contract."""
    res = _lint_copy(tmp_path, {"bad_module.py": "import dask\n"})
    assert res.returncode != 0 and "mmdata.bad_module -> dask" in res.stdout


def test_an_upward_import_and_a_cycle_are_reported(tmp_path):
    """storage (a bottom layer) importing the unit of work breaks the layers, even inside a function
    (a lazy import hides nothing), and index.parts importing index.step back makes a cycle."""
    res = _lint_copy(tmp_path, {"storage.py": "\n\ndef _up():\n    from mmdata.pipeline import unit  # noqa\n",
                                "index/parts.py": "\n\ndef _back():\n    from mmdata.index import step  # noqa\n"})
    assert res.returncode != 0
    assert "mmdata.storage -> mmdata.pipeline.unit" in res.stdout
    assert "No import cycles" in res.stdout and "BROKEN" in res.stdout.split("No import cycles")[1].splitlines()[0]
