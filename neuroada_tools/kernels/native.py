"""The compiled kernels (``csrc/*.c``: per-row selection, CPU SDDMM, the bypass refresh), built on
first use, cached. Their prototypes and ABI number are in ``csrc/neuroada.h``; ``kernels/ops.py``
puts them behind torch ops.

The kernel is plain C with no Python or torch headers, so it compiles in well under a second with
the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) and is loaded with ``ctypes``. The
shared library is cached under ``$NEUROADA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/neuroada-tools``,
else ``~/.cache/neuroada-tools``) in ``native/``, named by a digest of the source, the compiler and
the platform, written atomically. A cached library is loaded only from a folder owned by this
user and not writable by group or others (else it is built into a private temporary folder).
Without a compiler, or when building fails, ``kernel()`` returns None, the pure torch kernels
run (same results, slower), a note says so once on stderr, and ``status()`` (in every command's
``--json``) records why. The kernels keep working in a child process forked after they ran (the
C code keeps no thread pool, and the child drops the selection's Python pool and starts its own;
see ``tests/test_kernels.py``).

``NEUROADA_NATIVE=0`` disables the kernel; ``NEUROADA_NATIVE=1`` makes a failed build an error
instead of a silent fallback (CI sets it, so the fast path is what the tests check).

Also here: ``bind_openmp`` (the SDDMM, called per layer and step, runs its parts on the OpenMP
team torch's own ops run on), ``parallel`` (run a kernel's parts on the calling thread and a shared
Python pool; the selection uses it, one call per tensor, where the pool's ~0.3 ms start-up does not
matter) and ``shorten_openmp_spin``
(the ``GOMP_SPINCOUNT`` default the CLI and the benchmarks set before importing torch). This
module never imports torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from neuroada_tools.errors import NeuroAdaError

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("select.c", "sddmm.c", "refresh.c")]
_HEADER = Path(__file__).with_name("csrc") / "neuroada.h"
_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-fno-strict-aliasing", "-pthread"]
# -march=native: the kernels use AVX2/FMA (8x8 transposes) and AVX-512 or AVX2 dots where the CPU has them.
# The library is built on the machine that runs it, and its cache name includes the CPU's feature
# flags, so a cache folder shared between different machines never hands one the other's build.
_NATIVE_ARCH = ["-march=native"]
_lock = threading.Lock()
_state: dict[str, object] = {}
_notes: set[str] = set()


def abi() -> int:
    """The ABI number the sources declare (``NEUROADA_ABI`` in ``csrc/neuroada.h``)."""
    m = re.search(rb"#define NEUROADA_ABI (\d+)", _HEADER.read_bytes())
    if m is None:
        raise NeuroAdaError(f"{_HEADER}: no NEUROADA_ABI")
    return int(m.group(1))


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
    from neuroada_tools.io.outputs import atomic_file  # (imports torch: not at module level)

    parts = [p.read_bytes() for p in (*_SOURCES, _HEADER)]
    parts += [cc.encode(), " ".join(_FLAGS + _NATIVE_ARCH).encode(), platform.machine().encode(), sys.platform.encode()]
    parts.append(_cpu_id().encode())
    tag = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out = cache_dir() / "native" / f"kernels-{tag}.so"
    try:
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        why_not = unsafe_folder(out.parent) or (None if os.access(out.parent, os.W_OK) else "not writable")
    except OSError as e:
        why_not = e.strerror or str(e)
    if why_not is None and out.is_file() and unsafe_file(out) is None:
        return out
    if why_not is not None:  # unsafe or unusable cache: build into a private temporary folder
        note(f"not using the kernel cache {out.parent} ({why_not}); building into a private temporary folder")
        out = Path(tempfile.mkdtemp(prefix="neuroada-native-")) / out.name
    sources = [str(p) for p in _SOURCES]
    with atomic_file(out) as tmp:
        try:
            subprocess.run(
                [cc, *_FLAGS, *_NATIVE_ARCH, "-o", str(tmp), *sources], check=True, capture_output=True, timeout=120
            )
        except subprocess.CalledProcessError:  # a compiler without -march=native: portable build
            subprocess.run([cc, *_FLAGS, "-o", str(tmp), *sources], check=True, capture_output=True, timeout=120)
        os.chmod(tmp, 0o700)  # only this user may replace what this user's processes load
    return out


def unsafe_folder(folder: Path) -> str | None:
    """Why a cache folder must not be loaded from (not ours, or writable by others), or None.

    A shared library runs with the user's rights when loaded: one that another user could have
    replaced is refused, as ssh refuses a key file others can write."""
    st = folder.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by this user"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {st.st_mode & 0o777:o})"
    return None


def unsafe_file(path: Path) -> str | None:
    """As ``unsafe_folder``, for the cached library itself."""
    return unsafe_folder(path)


def note(message: str) -> None:
    """Say something about the kernels once per process on stderr (library code prints nothing else)."""
    if message not in _notes:
        _notes.add(message)
        print(f"neuroada-tools: {message}", file=sys.stderr)


def status() -> str:
    """What the kernels are for this process, for ``--json``: ``"compiled"``, ``"torch (REASON)"``
    (the pure torch path: no compiler, failed build, ``NEUROADA_NATIVE=0``) or ``"not loaded"``."""
    if "lib" not in _state:
        return "not loaded"
    return "compiled" if _state["lib"] is not None else f"torch ({_state.get('why', 'unavailable')})"


def _load() -> ctypes.CDLL | None:
    mode = os.environ.get("NEUROADA_NATIVE", "auto")
    if mode == "0":
        _state["why"] = "NEUROADA_NATIVE=0"
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
        if lib.neuroada_abi_version() != abi():
            raise OSError("stale kernel library (ABI mismatch)")
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        signatures = {  # name: (argument types, result type); must match kernels/csrc/*.c
            "neuroada_select_u16": ([ptr, i64, i64, i64, i64, c_int, ptr, ptr, ptr], None),
            "neuroada_select_u32": ([ptr, i64, i64, i64, i64, c_int, ptr, ptr, ptr], None),
            "neuroada_sddmm": ([c_int, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, c_int, ptr, ptr, ptr], None),
            "neuroada_sddmm_scratch": ([i64], i64),
            "neuroada_refresh_f32": ([ptr, i64, i64, ptr, ptr, ptr, i64, i64, c_int], None),
            "neuroada_refresh_bf16": ([ptr, i64, i64, ptr, ptr, ptr, i64, i64, c_int], None),
            "neuroada_keep_if_changed": ([ptr, ptr, i64], c_int),
            "neuroada_sddmm_set_openmp": ([ptr, ptr, ptr], None),
        }
        for name, (args, result) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
        return lib
    except (OSError, subprocess.SubprocessError) as e:
        detail = e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        if mode == "1":
            raise NeuroAdaError(f"{_SOURCES[0].parent}: building the native kernels failed: {detail}") from e
        _state["why"] = detail.splitlines()[0][:200] if detail else type(e).__name__
        note(
            f"compiled kernels unavailable ({_state['why']}); using the pure torch kernels "
            "(same results, slower; set CC to a C compiler)"
        )
        return None


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it can't be built (then callers use torch).

    On first use with torch imported (every caller in this package imports it), the library is
    also bound to torch's OpenMP team (``bind_openmp``; ``openmp_bound`` tells)."""
    if "lib" in _state:  # loaded (the bypass asks on every forward: no lock once it is there)
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            lib = _load()
            _state["openmp"] = lib is not None and "torch" in sys.modules and bind_openmp(lib)
            _state["lib"] = lib
        return _state["lib"]  # type: ignore[return-value]


# ---------------------------------------------------------------- torch's OpenMP team

_OPENMP_NAMES = ("libgomp", "libiomp5", "libomp")  # runtimes that export libgomp's GOMP_parallel


def _loaded_openmp_runtime() -> str | None:
    """Path of the OpenMP runtime this process has loaded (torch's own first), or None. Linux only
    (``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split()[-1] for line in f if "/" in line}  # mapped files: the last field
    except OSError:
        return None
    found = sorted(p for p in paths if p.startswith("/") and os.path.basename(p).startswith(_OPENMP_NAMES))
    found.sort(key=lambda p: f"{os.sep}torch{os.sep}" not in p)  # torch's bundled runtime first (a stable sort)
    return found[0] if found else None


def bind_openmp(lib: ctypes.CDLL, runtime: str | None = "auto") -> bool:
    """Let the SDDMM run its parts on the OpenMP team that torch's ops run on; True when bound.

    After a matmul, torch's OpenMP worker threads spin for a while waiting for the next op: a
    thread the kernel started itself then competed with them for the cores, and a 2-thread SDDMM
    measured no faster than 1 thread (``bench/bench_kernels.py``). On that same team the parts run
    on the threads that are waiting anyway. ``runtime="auto"`` binds to the runtime torch uses
    when torch's parallel backend is OpenMP (only then: a second team would compete the same way);
    ``None`` unbinds (threads started per call again, for benchmarks and tests); a path binds to
    that library. Call with torch imported."""
    path = runtime
    if runtime == "auto":
        import torch  # the caller has it loaded already

        path = _loaded_openmp_runtime() if "OpenMP" in torch.__config__.parallel_info() else None
    entry = openmp_entry_points(path) if path is not None else [None, None, None]
    lib.neuroada_sddmm_set_openmp(*entry)
    return entry[0] is not None


def openmp_entry_points(path: str) -> list[int | None]:
    """Addresses of ``GOMP_parallel``, ``omp_get_thread_num`` and ``omp_get_num_threads`` in the
    OpenMP runtime at ``path`` (what ``neuroada_sddmm_set_openmp`` takes), or three Nones."""
    try:
        omp = ctypes.CDLL(path)  # already loaded: the same handle, the same team
        return [
            ctypes.cast(getattr(omp, name), ctypes.c_void_p).value
            for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
        ]
    except (OSError, AttributeError):
        return [None, None, None]


def openmp_bound() -> bool:
    """Whether ``kernel()`` bound the kernel library to torch's OpenMP team when it loaded it."""
    return bool(_state.get("openmp"))


# ---------------------------------------------------------------- running kernels on threads

_pool: list[ThreadPoolExecutor] = []


def _after_fork_in_child() -> None:
    """Make the kernels safe in a forked child, which has none of its parent's threads.

    GNU libgomp's team does not survive a fork (a ``GOMP_parallel`` in the child waits forever for
    its members), so the SDDMM and the refresh unbind from it and start their own threads per
    call. The selection's pool would count its parent's idle workers as alive and queue work no
    thread takes, so the child starts a pool of its own.
    """
    global _lock
    _pool.clear()
    _lock = threading.Lock()
    lib = _state.get("lib")
    if lib is not None and _state.get("openmp"):
        lib.neuroada_sddmm_set_openmp(None, None, None)
        _state["openmp"] = False


os.register_at_fork(after_in_child=_after_fork_in_child)


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
    default, holding the cores that work on other threads (the selection's Python pool above)
    needs; the shorter spin costs torch's own ops nothing measurable (BENCHMARKS.md). The SDDMM
    and the refresh no longer depend on it: they run on that same team (``bind_openmp``), and one
    layer measured the same with either spin. Only a default: an exported ``GOMP_SPINCOUNT`` wins,
    and libgomp reads it once, when torch is first imported.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
