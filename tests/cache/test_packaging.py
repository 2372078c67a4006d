import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "packages" / "kvpage-cache"

PROBE = """
import sys
before = set(sys.modules)
import kvpage_cache
loaded = set(sys.modules) - before
third_party = sorted(
    name for name in loaded
    if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "kvpage_cache"
)
print(",".join(third_party))
"""


def test_import_loads_no_third_party_module():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


def test_pyproject_declares_no_dependencies():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    assert project["name"] == "kvpage-cache"
    assert project.get("dependencies", []) == []
    assert not project.get("optional-dependencies")
