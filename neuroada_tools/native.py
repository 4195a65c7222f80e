"""The compiled kernels (``_native/*.c``: per-row selection, CPU SDDMM, the bypass refresh), built on
first use, cached.

The kernel is plain C with no Python or torch headers, so it compiles in well under a second with
the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) and is loaded with ``ctypes``. The
shared library is cached under ``$NEUROADA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/neuroada-tools``,
else ``~/.cache/neuroada-tools``) in ``native/``, named by a digest of the source, the compiler and
the platform, written atomically. Without a compiler, or when building fails, ``kernel()`` returns
None and ``select.py`` uses its pure-torch path, which gives the same indices, only slower.

``NEUROADA_NATIVE=0`` disables the kernel; ``NEUROADA_NATIVE=1`` makes a failed build an error
instead of a silent fallback (CI sets it, so the fast path is what the tests check).

Also here: ``parallel`` (run a kernel's parts on the calling thread and a shared Python pool;
the selection uses it, one call per tensor, where the pool's ~0.3 ms start-up does not matter;
the SDDMM, called per layer and step, starts its threads in C instead) and ``shorten_openmp_spin``
(the ``GOMP_SPINCOUNT`` default the CLI and the benchmarks set before importing torch). This
module never imports torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from neuroada_tools.errors import NeuroAdaError

_SOURCES = [Path(__file__).with_name("_native") / name for name in ("select.c", "sddmm.c", "refresh.c")]
_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-fno-strict-aliasing", "-pthread"]
# -march=native: the kernels use AVX2/FMA (8x8 transposes) and AVX-512 or AVX2 dots where the CPU has them.
# The library is built on the machine that runs it, and its cache name includes the CPU's feature
# flags, so a cache folder shared between different machines never hands one the other's build.
_NATIVE_ARCH = ["-march=native"]
_ABI = 7
_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where neuroada-tools caches derived, recomputable files (never user data)."""
    env = os.environ.get("NEUROADA_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "neuroada-tools"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: str) -> Path:
    from neuroada_tools.safetensors_io import atomic_file  # (imports torch: not at module level)

    parts = [p.read_bytes() for p in _SOURCES]
    parts += [cc.encode(), " ".join(_FLAGS + _NATIVE_ARCH).encode(), platform.machine().encode(), sys.platform.encode()]
    parts.append(_cpu_id().encode())
    tag = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out = cache_dir() / "native" / f"kernels-{tag}.so"
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(out.parent, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # cache not writable (read-only home): build into a private temporary folder
        out = Path(tempfile.mkdtemp(prefix="neuroada-native-")) / out.name
    sources = [str(p) for p in _SOURCES]
    with atomic_file(out) as tmp:
        try:
            subprocess.run([cc, *_FLAGS, *_NATIVE_ARCH, "-o", str(tmp), *sources], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:  # a compiler without -march=native: portable build
            subprocess.run([cc, *_FLAGS, "-o", str(tmp), *sources], check=True, capture_output=True, timeout=120)
    return out


def _load() -> ctypes.CDLL | None:
    mode = os.environ.get("NEUROADA_NATIVE", "auto")
    if mode == "0":
        return None
    try:
        cc = _compiler()
        if cc is None:
            raise OSError("no C compiler found (set CC)")
        path = _build(cc)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a damaged cached library (say, truncated by a full disk): build it again
            path.unlink(missing_ok=True)
            lib = ctypes.CDLL(str(_build(cc)))
        if lib.neuroada_abi_version() != _ABI:
            raise OSError("stale kernel library (ABI mismatch)")
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        signatures = {  # name: (argument types, result type); must match _native/*.c
            "neuroada_select_u16": ([ptr, i64, i64, i64, i64, c_int, ptr, ptr, ptr], None),
            "neuroada_select_u32": ([ptr, i64, i64, i64, i64, c_int, ptr, ptr, ptr], None),
            "neuroada_sddmm": ([c_int, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, c_int, ptr, ptr, ptr], None),
            "neuroada_sddmm_scratch": ([i64], i64),
            "neuroada_refresh_f32": ([ptr, i64, i64, ptr, ptr, ptr, i64, i64], None),
            "neuroada_refresh_bf16": ([ptr, i64, i64, ptr, ptr, ptr, i64, i64], None),
            "neuroada_keep_if_changed": ([ptr, ptr, i64], c_int),
        }
        for name, (args, result) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
        return lib
    except (OSError, subprocess.SubprocessError) as e:
        if mode == "1":
            detail = e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
            raise NeuroAdaError(f"{_SOURCES[0].parent}: building the native kernels failed: {detail}") from e
        return None


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it can't be built (then callers use torch)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load()
        return _state["lib"]  # type: ignore[return-value]


# ---------------------------------------------------------------- running kernels on threads

_pool: list[ThreadPoolExecutor] = []


def parallel(work: Callable[[int], None], parts: int) -> None:
    """Run ``work(0) ... work(parts - 1)``: part 0 on the calling thread, the others on a shared
    pool (kernel calls drop the GIL, so the parts run side by side). Re-raises the first error."""
    if parts <= 1:
        work(0)
        return
    with _lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(max_workers=8, thread_name_prefix="neuroada-kernel"))
    futures = [_pool[0].submit(work, i) for i in range(1, parts)]
    try:
        work(0)
    finally:
        for f in futures:
            f.result()


def shorten_openmp_spin() -> None:
    """Default ``GOMP_SPINCOUNT`` to 10000 when torch is not imported yet.

    torch's OpenMP worker threads (libgomp) spin for up to ~1 ms after every parallel op by
    default, holding the cores that the next op (a kernel here, or any Python-thread work) needs;
    the shorter spin costs torch's own ops nothing measurable (BENCHMARKS.md). Only a default: an
    exported ``GOMP_SPINCOUNT`` wins, and libgomp reads it once, when torch is first imported.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
