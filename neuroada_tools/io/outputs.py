"""The one owner of output policy: what may be written where, under which temporary name, and how
a finished output replaces what was there.

Every output (index, delta, resume state, merged folder, ONNX folder, compiled kernel) is written
under a temporary name in the folder of its final path and renamed into place when complete, so a
kill -9 at any moment leaves either no output or a complete one:

- a file ``out`` is written as ``.out.tmp-PID`` (:func:`atomic_file`);
- a folder ``out`` is built as ``.out.tmp-PID`` (:func:`staged_dir`), or as ``.out.merged-PID`` /
  ``.out.onnx-PID`` for the two stages of a merge-then-export; an existing ``out`` (``--force``)
  is moved to ``.out.old-PID`` only once the new one is complete, then deleted
  (:func:`replace_dir`);
- leftovers of a killed run (a temporary whose PID no longer runs) are deleted by the next run
  that writes the same output (:func:`remove_stale_temporaries`).

Refusals (:func:`check_output`, :func:`check_output_dir`) raise :class:`OutputError` with one line
naming the path: an existing output without ``--force``, an output that is an input, an output
inside (or containing) the base model folder, a missing parent folder.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from neuroada_tools.errors import OutputError

TEMP_KINDS = ("tmp", "old", "merged", "onnx")
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def temp_name(final: Path, kind: str = "tmp") -> Path:
    """The temporary name used while ``final`` is being made: same folder, so the rename is atomic.

    >>> temp_name(Path("out/model.index.safetensors")).name  # doctest: +SKIP
    '.model.index.safetensors.tmp-4242'
    """
    if kind not in TEMP_KINDS:
        raise ValueError(f"temporary kind {kind!r}: expected one of {TEMP_KINDS}")
    final = Path(final)
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}")


def check_output(final: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse an output file that exists (unless ``force``), that is one of ``inputs``, or whose
    folder does not exist."""
    final = Path(final)
    for inp in inputs:
        if inp is None:
            continue
        try:
            if final.exists() and Path(inp).exists() and final.samefile(inp):
                raise OutputError(f"{final}: output path is an input; choose another -o")
        except OSError:
            pass
        if final.resolve() == Path(inp).resolve():
            raise OutputError(f"{final}: output path is an input; choose another -o")
    if final.exists() and not force:
        raise OutputError(f"{final}: already exists (use --force to overwrite)")
    if not final.parent.exists():
        raise OutputError(f"{final.parent}: output folder does not exist")


def check_output_dir(model_root: Path, out: Path, force: bool) -> None:
    """Refuse an output folder that is, is inside, or contains the base folder; or that exists
    without ``force``; or whose parent folder is missing."""
    out = Path(out)
    base = Path(model_root).resolve()
    o = out.resolve()
    if o == base or base in o.parents:
        raise OutputError(f"{out}: output folder is or lies inside the base model folder {model_root}")
    if o in base.parents:
        raise OutputError(f"{out}: output folder contains the base model folder {model_root}")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to overwrite)")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: parent folder does not exist")


def check_empty_output_dir(model_dir: Path, out_dir: Path) -> None:
    """Refuse an export folder that exists and is not empty, or that lies inside the model folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputError(f"{out_dir}: output folder exists and is not empty")
    model_abs, out_abs = Path(model_dir).resolve(), out_dir.resolve()
    if out_abs == model_abs or model_abs in out_abs.parents:
        raise OutputError(f"{out_dir}: output folder lies inside the model folder {model_dir}")


def check_delta_outputs(output: Path, state_file: Path, model_dir: Path, inputs: Iterable[Path | None], *,
                        force: bool, resume: bool) -> None:
    """Refuse the outputs of a training run (delta sidecar and resume state): a missing folder, a
    path inside the base model folder or equal to an input, an existing file without ``force``;
    with ``resume``, a missing resume state."""
    if not output.parent.is_dir():
        raise OutputError(f"{output.parent}: output folder does not exist")
    root = model_dir.resolve()
    for path in (output, state_file):
        if path.resolve().is_relative_to(root):
            raise OutputError(f"{path}: lies inside the base model folder {model_dir}; write the delta elsewhere")
        for inp in inputs:
            if inp is not None and path.resolve() == Path(inp).resolve():
                raise OutputError(f"{path}: output path is an input; choose another -o")
    if resume:
        if not state_file.is_file():
            raise OutputError(f"{state_file}: no resume state to continue from (train without --resume first)")
        return
    for path in (output, state_file):
        if path.exists() and not force:
            raise OutputError(f"{path}: already exists (use --force to overwrite, or --resume to continue)")


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it into place only if the block succeeds."""
    final = Path(final)
    tmp = temp_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


@contextmanager
def staged_dir(final: Path, kind: str = "tmp", *, keep: bool = False) -> Iterator[Path]:
    """Yield a fresh, empty folder next to ``final`` (``.NAME.<kind>-PID``).

    On success the folder replaces ``final`` (:func:`replace_dir`), unless ``keep``: then it stays
    where it is for the caller to use (a staging step) and is deleted when the block ends, whatever
    happens. On failure it is deleted and ``final`` is untouched.
    """
    final = Path(final)
    tmp = temp_name(final, kind)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if not keep:
            replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` goes only after."""
    try:
        if out.exists():
            old = temp_name(out, "old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        raise OutputError(f"{out}: cannot move the finished output into place: {e.strerror or e}") from e


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete temporaries a killed run left next to ``out`` (``.NAME.<kind>-PID`` whose PID is gone)."""
    out = Path(out)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    prefix = f".{out.name}."
    for p in out.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        kind, _, pid = p.name[len(prefix):].rpartition("-")
        if kind not in TEMP_KINDS or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that process still runs: not ours to delete
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def copy_file(src: Path, dst: Path) -> None:
    """``shutil.copyfile`` whose write errors name ``dst``: on a full disk shutil names the
    *source*, which would read as if the input were at fault."""
    try:
        shutil.copyfile(src, dst)
    except OSError as e:
        if e.errno in _DISK_ERRNOS:
            raise OSError(e.errno, e.strerror or str(e), str(dst)) from None
        raise


def write_text(path: Path, text: str) -> None:
    """``Path.write_text`` whose errors name ``path``."""
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
