"""Helpers shared by the CLI commands: error mapping, progress bar, summary output.

Kept apart from ``cli/__init__.py`` so command modules can import them without importing the
command group that registers them.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import click

from neuroada_tools.errors import NeuroAdaError


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NeuroAdaError as e:
            if type(e).__name__ == "PeerFailed":  # another rank failed; rank 0 says why
                sys.exit(e.exit_code)
            _fail(str(e), e.exit_code)
        except OSError as e:  # disk full, permission denied, ...
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{where}{e.strerror or e}", 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper


@contextmanager
def progress_bar(quiet: bool, desc: str, unit: str = "B"):
    """A tqdm bar on stderr, silent when ``--quiet`` or stderr is not a terminal.

    Yields ``(set_total, advance)`` callables.
    """
    from tqdm import tqdm

    bar = tqdm(
        total=0, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
        file=sys.stderr, disable=quiet or not sys.stderr.isatty(), leave=False, dynamic_ncols=True,
    )

    def set_total(n: int) -> None:
        bar.total = n
        bar.refresh()

    try:
        yield set_total, bar.update, bar
    finally:
        bar.close()


def emit(summary: dict, as_json: bool, human: Callable[[dict], str]) -> None:
    """Print the final summary: JSON on stdout with ``--json``, else a few human lines.

    The JSON also records which kernels ran (``"kernels"``: ``"compiled"``, ``"torch (why)"``, or
    ``"not loaded"`` for a command that needed none)."""
    if as_json:
        from neuroada_tools.kernels import native

        summary = {**summary, "kernels": native.status()}
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        click.echo(human(summary))
