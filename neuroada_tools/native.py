"""The compiled kernels (``_native/*.c``: per-row selection, CPU SDDMM), built on first use, cached.

The kernel is plain C with no Python or torch headers, so it compiles in well under a second with
the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) and is loaded with ``ctypes``. The
shared library is cached under ``$NEUROADA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/neuroada-tools``,
else ``~/.cache/neuroada-tools``) in ``native/``, named by a digest of the source, the compiler and
the platform, written atomically. Without a compiler, or when building fails, ``kernel()`` returns
None and ``select.py`` uses its pure-torch path, which gives the same indices, only slower.

``NEUROADA_NATIVE=0`` disables the kernel; ``NEUROADA_NATIVE=1`` makes a failed build an error
instead of a silent fallback (CI sets it, so the fast path is what the tests check).
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
from pathlib import Path

from neuroada_tools.errors import NeuroAdaError

_SOURCES = [Path(__file__).with_name("_native") / name for name in ("select.c", "sddmm.c")]
_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-fno-strict-aliasing"]
# -march=native: the kernels use AVX2/FMA (8x8 transposes, eight-way dots) where the CPU has them.
# The library is built on the machine that runs it, and its cache name includes the CPU's feature
# flags, so a cache folder shared between different machines never hands one the other's build.
_NATIVE_ARCH = ["-march=native"]
_ABI = 2
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
    parts = [p.read_bytes() for p in _SOURCES]
    parts += [cc.encode(), " ".join(_FLAGS + _NATIVE_ARCH).encode(), platform.machine().encode(), sys.platform.encode()]
    parts.append(_cpu_id().encode())
    tag = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out = cache_dir() / "native" / f"kernels-{tag}.so"
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so.tmp", dir=out.parent)
    except OSError:  # cache not writable (read-only home): build into a private temporary folder
        out = Path(tempfile.mkdtemp(prefix="neuroada-native-")) / out.name
        fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        sources = [str(p) for p in _SOURCES]
        try:
            subprocess.run([cc, *_FLAGS, *_NATIVE_ARCH, "-o", tmp, *sources], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:  # a compiler without -march=native: portable build
            subprocess.run([cc, *_FLAGS, "-o", tmp, *sources], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        for fn in (lib.neuroada_select_u16, lib.neuroada_select_u32):
            fn.argtypes = [ptr, i64, i64, i64, i64, ctypes.c_int, ptr, ptr, ptr]
            fn.restype = i64
        for fn in (lib.neuroada_sddmm_f32, lib.neuroada_sddmm_bf16):
            fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, ptr, ptr, ctypes.c_int]
            fn.restype = None
        lib.neuroada_sddmm_scratch.argtypes = [i64, i64]
        lib.neuroada_add_f32.argtypes = [ptr, ptr, i64]
        lib.neuroada_add_f32.restype = None
        for fn in (lib.neuroada_refresh_f32, lib.neuroada_refresh_bf16):
            fn.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64]
            fn.restype = None
        lib.neuroada_sddmm_scratch.restype = i64
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
