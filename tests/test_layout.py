"""The shape of the house (docs/contributing.md, "Layout"): small files, no names that shadow the standard
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


# --------------------------------------------------------------------------- who imports whom

LAYERED = ("check", "generate", "evaluate")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere (top level or inside a function). The root
    package is left out as a target: modules take only ``__version__`` from it, and its lazy
    ``__getattr__`` (the adapter API on first use) is no import of theirs."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:  # "from pkg import mod" imports pkg.mod
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # "pkg.mod.func" -> "pkg.mod"
                    target = target.rpartition(".")[0]
                # a module's own parent packages run first anyway: no edge of its making
                if target and target != "neuroada_tools" and not (name + ".").startswith(target + "."):
                    found.add(target)
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    """Control for the next test: a cycle through three modules is reported as one."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_forms_sits_below_check_generate_and_evaluate():
    """forms/ loads the forms of a model for check, generate and evaluate; it imports none of them,
    directly or through another module."""
    graph = _import_graph()
    forms = {m for m in graph if m == "neuroada_tools.forms" or m.startswith("neuroada_tools.forms.")}
    assert len(forms) >= 3
    seen, todo = set(), list(forms)
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    bad = sorted(m for m in seen if any(m.startswith(f"neuroada_tools.{p}") for p in LAYERED))
    assert bad == [], f"forms/ reaches {bad}"
    for layer in LAYERED:
        users = [m for m in graph if m.startswith(f"neuroada_tools.{layer}") and
                 any(t.startswith("neuroada_tools.forms") for t in graph[m])]
        assert users, f"{layer}/ does not load its models through forms/"


def test_no_import_cycle_between_modules_or_between_check_generate_evaluate():
    graph = _import_graph()
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    layers = {p: {t.split(".")[1] for m, ts in graph.items() if m.startswith(f"neuroada_tools.{p}")
                  for t in ts if t.split(".")[1] in LAYERED + ("forms",) and t.split(".")[1] != p}
              for p in LAYERED + ("forms",)}
    assert _cycle(layers) is None, f"packages import each other in a circle: {' -> '.join(_cycle(layers))}"
