"""The documentation: a short README, a page per command listing every option, command lines that the
CLI accepts, guarantees that name real tests, and a site that ``mkdocs build --strict`` builds.

Each check has a control beside it that shows it can fail: an undocumented option, a made-up flag, a
broken link."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from neuroada_tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_LIMIT = 12_000  # bytes


def _page(name: str) -> Path:
    return DOCS / "commands" / f"{name}.md"


def _options_section(text: str) -> str:
    m = re.search(r"^## Options\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    return m.group(1) if m else ""


def documented_names(text: str) -> set[str]:
    """Option and argument names in the first column of the page's "Options" table: the first word of
    each code span (``--target PATTERN`` -> ``--target``)."""
    names: set[str] = set()
    for line in _options_section(text).splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        first = line.strip("|").split(" | ")[0]
        names |= {span.split()[0] for span in re.findall(r"`([^`]+)`", first)}
    return names


def _context(name: str, cmd: click.Command) -> click.Context:
    """The command's context under the group's settings (``-h`` / ``--help``)."""
    return click.Context(cmd, info_name=name, parent=click.Context(main, **main.context_settings))


def cli_names(name: str, cmd: click.Command) -> set[str]:
    """Every option string of a command (``--check``, ``--no-check``, ``-o``, ``--output``, ``-h``, ...)
    and the metavar of each argument (``MODEL``)."""
    names: set[str] = set()
    ctx = _context(name, cmd)
    for p in cmd.get_params(ctx):
        if isinstance(p, click.Argument):
            names.add(p.human_readable_name)
        else:
            names |= {*p.opts, *p.secondary_opts}
    return names


def option_gaps(name: str, cmd: click.Command, text: str) -> tuple[set[str], set[str]]:
    """(options missing from the page, names on the page that the command does not have)."""
    real, shown = cli_names(name, cmd), documented_names(text)
    return real - shown, shown - real


COMMANDS = sorted(main.commands)


def test_every_command_has_a_page_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert COMMANDS == ["check", "convert-gguf", "demo", "evaluate", "generate", "index", "merge", "train-sparse"]
    for name in COMMANDS:
        assert _page(name).is_file(), f"no page for {name}: add docs/commands/{name}.md"
        assert f"commands/{name}.md" in nav, f"docs/commands/{name}.md is not in mkdocs.yml's nav"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_on_its_page(name):
    missing, stale = option_gaps(name, main.commands[name], _page(name).read_text())
    assert not missing, f"docs/commands/{name}.md: options missing from its Options table: {sorted(missing)}"
    assert not stale, f"docs/commands/{name}.md: the Options table names what {name} lacks: {sorted(stale)}"


def test_the_option_check_catches_a_new_option_and_a_removed_row():
    """Control: an option added to the command, or a row dropped from the page, is reported."""
    cmd = main.commands["merge"]
    text = _page("merge").read_text()
    extra = click.Command("merge", params=[*cmd.params, click.Option(["--shiny/--no-shiny"])])
    assert option_gaps("merge", extra, text) == ({"--shiny", "--no-shiny"}, set())
    without = re.sub(r"^\| `--check` / `--no-check` .*\n", "", text, flags=re.M)
    assert without != text
    assert option_gaps("merge", cmd, without) == ({"--check", "--no-check"}, set())
    renamed = text.replace("| `--provider` |", "| `--providers` |")
    assert option_gaps("merge", cmd, renamed) == ({"--provider"}, {"--providers"})


def command_lines(text: str):
    """``(line, command, args)`` for each ``neuroada-tools`` / ``-m neuroada_tools`` call in the bash blocks."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            for i, tok in enumerate(tokens[:-1]):
                if tok in ("neuroada-tools", "neuroada_tools"):
                    yield line.strip(), tokens[i + 1], tokens[i + 2:]
                    break


def bad_command_lines(text: str) -> list[str]:
    bad = []
    for line, name, args in command_lines(text):
        cmd = main.commands.get(name)
        if cmd is None:
            bad.append(f"{line}: no command {name!r}")
            continue
        try:  # the option parser alone: no callbacks, no type or file checks; an unknown option fails
            cmd.make_parser(_context(name, cmd)).parse_args(list(args))
        except click.UsageError as e:
            bad.append(f"{line}: {e.format_message()}")
    return bad


def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def test_command_lines_in_the_docs_use_real_options():
    seen = 0
    for path in _doc_files():
        text = path.read_text()
        seen += sum(1 for _ in command_lines(text))
        assert bad_command_lines(text) == [], path.relative_to(ROOT)
    assert seen >= 40  # the scan is not vacuous


def test_the_command_line_check_catches_a_made_up_flag():
    text = "```bash\nneuroada-tools merge --model m --index i --delta d --to onnx --fast -o out\n```\n"
    assert len(bad_command_lines(text)) == 1 and "--fast" in bad_command_lines(text)[0]
    assert bad_command_lines(text.replace(" --fast", "")) == []
    assert "no command 'mrege'" in bad_command_lines(text.replace("merge", "mrege"))[0]


def test_readme_is_short_and_keeps_the_two_commands():
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} (reference goes to docs/)"
    text = README.read_text()
    blocks = "".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    assert "bash scripts/demo.sh" in blocks and "bash scripts/test.sh" in blocks
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text(), "CI must run the README's test command"


def test_readme_links_point_at_files():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert len(local) >= 20
    assert [t for t in local if not (ROOT / t).exists()] == []


def test_guarantees_name_tests_that_exist():
    """Every ``tests/x.py::test_name`` (and ``::test_name`` after it) on the guarantees page is defined."""
    text = (DOCS / "guarantees.md").read_text()
    checked = 0
    for item in re.findall(r"^- (.*)$", text, re.M):
        current = None
        for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?(?:\[[^\]]*\])?`", item):
            path, name = m.groups()
            if path:
                current = ROOT / path
                assert current.is_file(), path
            if name:
                assert current is not None, item
                assert re.search(rf"^\s*def {name}\(", current.read_text(), re.M), f"{current.name}::{name}"
                checked += 1
    assert checked >= 60


def _mkdocs_missing() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:
            return module
    return None


def _build(root: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300)


needs_mkdocs = pytest.mark.skipif(_mkdocs_missing() is not None,
                                  reason=f"the docs extra is not installed ({_mkdocs_missing()} missing): "
                                         "pip install -e '.[docs]' (scripts/setup.sh does)")


@needs_mkdocs
def test_the_site_builds_strictly(tmp_path):
    start = time.perf_counter()
    r = _build(ROOT, tmp_path / "site")
    assert r.returncode == 0, r.stdout + r.stderr
    site = tmp_path / "site"
    for page in ("commands/train-sparse/index.html", "formats/index-v1/index.html", "BENCHMARKS/index.html",
                 "api-reference/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api-reference" / "index.html").read_text()
    assert 'id="neuroada_tools.adapters.api.apply"' in api  # mkdocstrings rendered the docstrings
    print(f"mkdocs build --strict: {time.perf_counter() - start:.1f} s")


@needs_mkdocs
def test_a_broken_link_fails_the_strict_build(tmp_path):
    """Control: the same site with one link to a page that does not exist does not build."""
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    for name in ("docs", "formats", "neuroada_tools"):
        shutil.copytree(ROOT / name, copy / name, ignore=ignore)
    for name in ("mkdocs.yml", "BENCHMARKS.md"):
        shutil.copy(ROOT / name, copy / name)
    page = copy / "docs" / "errors.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    r = _build(copy, tmp_path / "site")
    assert r.returncode != 0 and "no-such-page.md" in r.stdout + r.stderr
