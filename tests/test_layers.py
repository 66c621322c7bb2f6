"""The house stays layered: the import contracts of pyproject.toml hold, and the private-names contract
catches what it is there to catch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.import_contracts import private_name_imports

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "lint-imports (import-linter) is not installed; run make setup"
    r = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout, r.stdout[-2000:]


@pytest.fixture
def tiny_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "tinypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("_hidden = 1\nshown = 2\n__version__ = '1'\n\ndef _helper():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("tinypkg")]:
        monkeypatch.delitem(sys.modules, name)
    return pkg


def test_private_names_contract_catches_from_imports_and_attributes(tiny_pkg):
    (tiny_pkg / "high.py").write_text(
        "from tinypkg.low import _hidden, shown, __version__\n"
        "from . import low\n"
        "import tinypkg.low as lw\n"
        "x = low._helper() + lw._hidden + low.shown\n"
        "def _mine():\n    return _mine\n"
    )
    project = {"tinypkg", "tinypkg.low", "tinypkg.high"}
    found = private_name_imports("tinypkg.high", project)
    assert sorted(what for _, what in found) == [
        "from tinypkg.low import _hidden",
        "tinypkg.low._helper",
        "tinypkg.low._hidden",
    ], found
    assert private_name_imports("tinypkg.low", project) == []  # its own private names are fine
