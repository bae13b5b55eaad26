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


def test_a_broken_contract_is_reported(tmp_path):
    """The check can fail: a module outside engines that imports dask breaks the first contract."""
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    pkg = tmp_path / "mmdata"
    shutil.copytree(os.path.join(ROOT, "mmdata"), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "pipelines"), tmp_path / "pipelines",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "bad_module.py").write_text("import dask\n")
    shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path / ".importlinter")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    res = subprocess.run([exe, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0 and "mmdata.bad_module -> dask" in res.stdout
