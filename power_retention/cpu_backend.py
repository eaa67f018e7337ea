"""Making MLX's CPU backend fast on Linux: a real BLAS and a malloc that keeps its memory.

BLAS. 
The Linux wheel of MLX (``mlx[cpu]``) links a reference BLAS: about 3 GFLOP/s for an fp32
matmul on a small x86 server. Debian's OpenBLAS exports the same symbols, so loading it first
with ``LD_PRELOAD`` makes MLX's matmuls run through it (about 50x faster). On macOS MLX uses
Accelerate and Metal, and nothing here applies.

Get it with ``apt-get install libopenblas0-pthread`` (Debian/Ubuntu). Then:

    python -m power_retention                 # which BLAS this process would use
    python -m power_retention -- CMD ARGS...  # run CMD with OpenBLAS preloaded

``train.py`` and the benchmarks call :func:`reexec_with_fast_blas` themselves.

Memory. MLX's CPU allocator hands every buffer to malloc and back. glibc serves large
requests with a fresh mmap and unmaps them on free, so each op's output is page-faulted in
and zeroed by the kernel again: measured here, that is 90% of the time of an elementwise op
on a 272 MB array (200 ms instead of 22 ms). Raising the mmap threshold alone is not enough:
glibc also gives the top of its heap back to the kernel once more than the trim threshold
(at most 2 GB through mallopt) is free there, and a training step that peaks at 6 GB frees
more than that, so the next step faulted its pages in again (fwd+bwd at T=16384: 1.0M page
faults and 8 s of system time per step, 12.8 s instead of 5.4 s). :func:`keep_freed_memory`,
run when ``power_retention`` is imported, stops both: large buffers come from the heap and
the heap is never trimmed, so freed buffers are reused. MLX's own memory accounting (``mx.get_peak_memory``) is unaffected; the
process's resident size stays at its peak instead of shrinking after it. Set
POWER_RETENTION_KEEP_MALLOC=1 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import sys

import mlx.core as mx

# Where Debian/Ubuntu put the pthread build of OpenBLAS (package libopenblas0-pthread).
_OPENBLAS_PATTERNS = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
# Set in the environment of a re-executed process so that a failed preload cannot loop.
_REEXEC_MARKER = "POWER_RETENTION_BLAS_REEXEC"
# Set to 1 to keep MLX's own BLAS (for comparisons).
_OPT_OUT = "POWER_RETENTION_NO_FAST_BLAS"


# glibc mallopt parameters (malloc.h); values are C ints.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
# mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely", and
# "Setting [M_MMAP_MAX] to 0 disables the use of mmap for servicing large allocation requests".
_NEVER_TRIM = -1
_NO_MMAP = 0


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only: musl has neither)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Make glibc reuse freed large buffers instead of unmapping them. True if applied."""
    libc = _glibc()
    if libc is None or os.environ.get("POWER_RETENTION_KEEP_MALLOC") == "1":
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((_M_MMAP_THRESHOLD, _INT_MAX), (_M_MMAP_MAX, _NO_MMAP), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return all([bool(mallopt(param, value)) for param, value in settings])


def release_freed_memory() -> None:
    """Give memory that MLX has freed back to the operating system.

    With ``keep_freed_memory`` the process keeps its peak size; call this after a large
    computation that will not repeat (benchmarks call it between cells).
    """
    mx.clear_cache()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def openblas_library() -> str | None:
    """Path of a system OpenBLAS that can replace MLX's reference BLAS, or None."""
    if not sys.platform.startswith("linux"):
        return None
    for pattern in _OPENBLAS_PATTERNS:
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[0]
    return None


def loaded_blas() -> str:
    """Name the BLAS library mapped into this process (after ``import mlx.core``)."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        return "unknown"
    # numpy ships its own OpenBLAS with renamed symbols (libscipy_openblas64_*): it cannot serve
    # MLX, so only a library named libopenblas* counts.
    openblas = sorted(p for p in paths if os.path.basename(p).startswith("libopenblas"))
    if openblas:
        return f"OpenBLAS ({openblas[0]})"
    reference = sorted(p for p in paths if os.path.basename(p).startswith("libblas"))
    if reference:
        return f"reference BLAS bundled with MLX ({os.path.basename(reference[0])})"
    return "none loaded yet (import mlx.core first)"


@functools.lru_cache(maxsize=1)
def _openblas_symbols():
    """The running process's OpenBLAS (preloaded, so its symbols are global), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        process = ctypes.CDLL(None)
        process.openblas_get_num_threads, process.openblas_set_num_threads  # noqa: B018
    except (OSError, AttributeError):
        return None
    return process


def blas_threads() -> int | None:
    """Threads one BLAS product uses in this process: OpenBLAS's setting, 1 for the reference
    BLAS bundled with MLX on Linux, None where unknown (macOS: Accelerate)."""
    openblas = _openblas_symbols()
    if openblas is not None:
        return int(openblas.openblas_get_num_threads())
    return 1 if sys.platform.startswith("linux") else None


def set_blas_threads(threads: int) -> None:
    """Set OpenBLAS's thread count for the products that follow (ValueError without OpenBLAS).
    Takes effect at once, for the whole process."""
    openblas = _openblas_symbols()
    if openblas is None:
        raise ValueError("set_blas_threads needs OpenBLAS loaded (see python -m power_retention)")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    openblas.openblas_set_num_threads(threads)


def fast_blas_environment(env: dict | None = None) -> dict:
    """A copy of ``env`` with OpenBLAS added to LD_PRELOAD when it is installed (and its
    threads told not to spin between products)."""
    env = dict(os.environ if env is None else env)
    library = openblas_library()
    if library is None or env.get(_OPT_OUT) == "1":
        return env
    preload = env.get("LD_PRELOAD", "")
    if library not in preload.split(":"):
        env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    # OpenBLAS's idle threads spin (sched_yield) for 2^28 cycles after each product by
    # default, while MLX runs its elementwise ops on one of the same cores: at the minimum,
    # 2^4, the chunked form's forward at T=8192 ran about 20% faster here, fwd+bwd 5%, and
    # a lone 2048^3 product no slower.
    env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    return env


def reexec_with_fast_blas() -> None:
    """Restart this Python process with OpenBLAS preloaded, if that would change anything.

    Call it first thing in a script's ``main`` (before heavy work: the process is replaced).
    It does nothing on macOS, when OpenBLAS is absent or already loaded, when the user opted
    out, or when this process is itself the restarted one.
    """
    env = fast_blas_environment()
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD") or os.environ.get(_REEXEC_MARKER):
        return
    env[_REEXEC_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
