"""The shape of the house (README "Development"): small files, no names that shadow the standard
library, one owner for each policy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "neuroada_tools"
CHECKED = ("neuroada_tools", "tests", "bench", "fixtures")
MAX_LINES = 500


def _python_files() -> list[Path]:
    return sorted(p for d in CHECKED for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts)


def test_no_python_file_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _python_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these files (limit {MAX_LINES} lines): {long}"


def test_the_line_limit_check_sees_every_package_file():
    """Control: the scan above is not vacuous (it sees the big modules of every stage)."""
    seen = {p.relative_to(ROOT).parts[:2] for p in _python_files()}
    for stage in ("io", "index", "train", "export", "check", "kernels", "cli", "hf"):
        assert ("neuroada_tools", stage) in seen


def _startup_modules() -> set[str]:
    """Modules the interpreter has loaded before it reads sys.path: a folder cannot shadow those."""
    out = subprocess.run([sys.executable, "-S", "-c", "import sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_no_module_shadows_the_standard_library():
    """Running anything from inside a package folder puts that folder first on sys.path: a
    ``select.py`` there would replace the standard library's ``select`` for every import."""
    preloaded = _startup_modules()
    names = {p.stem if p.name != "__init__.py" else p.parent.name for p in PKG.rglob("*.py")}
    names |= {p.name for p in PKG.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    shadowing = sorted(n for n in names if n in sys.stdlib_module_names and n not in preloaded)
    assert shadowing == [], f"rename these modules, they shadow the standard library: {shadowing}"


def test_io_is_loaded_before_sys_path_so_the_io_folder_cannot_shadow_it():
    """``neuroada_tools/io/`` keeps its name only because the interpreter imports ``io`` at start-up."""
    assert "io" in _startup_modules()
    out = subprocess.run(
        [sys.executable, "-c", "import io; print(io.__file__ if hasattr(io, '__file__') else 'frozen')"],
        cwd=PKG,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "neuroada_tools" not in out


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_check_does_not_import_the_exporter():
    """Parity replays the model's calling conventions from ``hf/signature.py``, not from the exporter."""
    for path in (PKG / "check").rglob("*.py"):
        bad = sorted(m for m in _imports(path) if m.startswith("neuroada_tools.export"))
        assert bad == [], f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize(
    "pattern, owner",
    [
        ("os.replace(", "neuroada_tools/io/outputs.py"),
        ("mkdtemp(", None),
        (".tmp-", "neuroada_tools/io/outputs.py"),
        ("set_verbosity_error(", "neuroada_tools/hf/__init__.py"),
    ],
)
def test_each_policy_has_one_owner(pattern, owner):
    """Atomic replace, temporary names and transformers' log level are written in one place each."""
    where = sorted(
        str(p.relative_to(ROOT))
        for p in PKG.rglob("*.py")
        if pattern in p.read_text()
        and str(p.relative_to(ROOT)) != owner
        and not (pattern == "mkdtemp(" and p.name == "native.py")
    )
    assert where == [], f"{pattern!r} outside {owner}: {where}"
