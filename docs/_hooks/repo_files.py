"""MkDocs hook: put files that live outside ``docs/`` into the site, unchanged.

``formats/*.md`` (the sidecar specs) and ``BENCHMARKS.md`` (the benchmark record) stay where the
repository keeps them; the site shows them under the same relative paths (``formats/index-v1.md``,
``BENCHMARKS.md``), so pages link to them as if they were in ``docs/``. Read from disk at build time,
so a fresh clone builds without any copy step.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]


def _sources() -> dict[str, Path]:
    found = {f"formats/{p.name}": p for p in sorted((ROOT / "formats").glob("*.md"))}
    found["BENCHMARKS.md"] = ROOT / "BENCHMARKS.md"
    return found


def on_files(files, config):
    for uri, path in _sources().items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
