"""Each lower layer installs alone and pulls in nothing beyond the layers it names.

`pip install --no-index` turns any undeclared or third-party dependency into an install
failure, and importing from an isolated interpreter (`python -I`) proves the installed
packages work without the development environment.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _install_alone(target: Path, *package_dirs: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation",
           "--target", str(target), *(str(REPO / "packages" / d) for d in package_dirs)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)


def _import_isolated(target: Path, module: str) -> set[str]:
    """Import `module` with only the stdlib (no site-packages) and `target` on the path; return third-party modules loaded."""
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r}); import {module}; "
        "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    return set(out.split()) - set(sys.stdlib_module_names) - {"__main__"}


@pytest.mark.parametrize(
    ("packages", "module", "allowed"),
    [
        (("kvpage-cache",), "kvpage_cache", {"kvpage_cache"}),
        (("kvpage-cache", "kvpage-sched"), "kvpage_sched", {"kvpage_cache", "kvpage_sched"}),
    ],
)
def test_pure_python_layers_install_and_import_alone(tmp_path, packages, module, allowed):
    _install_alone(tmp_path, *packages)
    installed = {p.name.split("-")[0] for p in tmp_path.glob("*.dist-info")}
    assert installed == {p.replace("-", "_") for p in packages}
    assert _import_isolated(tmp_path, module) <= allowed


def test_sched_alone_is_refused_without_cache(tmp_path):
    """kvpage-sched declares kvpage-cache: installing it with no way to get the cache fails."""
    with pytest.raises(subprocess.CalledProcessError) as err:
        _install_alone(tmp_path, "kvpage-sched")
    assert "kvpage-cache" in err.value.stderr
