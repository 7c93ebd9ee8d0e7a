"""The import layers of pyproject.toml's [tool.importlinter] (see ARCHITECTURE.md) hold: `lint-imports` passes on
the package, and fails, naming the import, when a lower layer imports a higher one."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=package_parent,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_layer_contracts_are_kept():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_an_import_running_back_up_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "audit", tmp_path / "audit", ignore=shutil.ignore_patterns("bundle", "__pycache__"))
    features = tmp_path / "audit" / "features" / "store.py"
    features.write_text(features.read_text() + "\n\ndef _up():\n    from ..auditor import Auditor  # noqa\n")
    r = _lint(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "audit.features is not allowed to import audit.auditor" in r.stdout
    assert "audit.features.store -> audit.auditor" in r.stdout
