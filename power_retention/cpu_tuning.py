"""Making MLX's CPU backend fast on Linux: a real BLAS, a malloc that keeps its memory, and the
op's heads split across CPU streams. Nothing here runs unless an entry point asks:
``tune_process()`` (train.py, demo.py and the benchmarks call it first thing in ``main``)
does the first two and lets streams overlap; ``split_across_cpu_streams`` wraps the op for
the third. Importing ``power_retention`` or ``llm`` changes nothing in the process.

BLAS.
The Linux wheel of MLX (``mlx[cpu]``) links a reference BLAS: about 3 GFLOP/s for an fp32
matmul on a small x86 server. Debian's OpenBLAS exports the same symbols, so loading it first
with ``LD_PRELOAD`` makes MLX's matmuls run through it (about 50x faster). On macOS MLX uses
Accelerate and Metal, and nothing here applies.

OpenBLAS picks its kernels by the CPU's family and model, and a release older than the CPU
does not know the model: Debian 12's 0.3.21 falls back to Prescott's SSE3 kernels on a
5th-generation Xeon (family 6, model 207), 31 GFLOP/s for a 2048^3 fp32 product where its
SkylakeX kernels run 250. So when the kernels OpenBLAS would pick predate AVX2 but the CPU
has AVX2 (or AVX-512), ``fast_blas_environment`` also sets ``OPENBLAS_CORETYPE`` to the best
kernels the CPU's flags allow (unless it is set).

Get it with ``apt-get install libopenblas0-pthread`` (Debian/Ubuntu). Then:

    python -m power_retention                 # which BLAS this process would use
    python -m power_retention -- CMD ARGS...  # run CMD with OpenBLAS preloaded

Memory. MLX's CPU allocator hands every buffer to malloc and back. glibc serves large
requests with a fresh mmap and unmaps them on free, so each op's output is page-faulted in
and zeroed by the kernel again: measured here, that is 90% of the time of an elementwise op
on a 272 MB array (200 ms instead of 22 ms). Raising the mmap threshold alone is not enough:
glibc also gives the top of its heap back to the kernel once more than the trim threshold
(at most 2 GB through mallopt) is free there, and a training step that peaks at 6 GB frees
more than that, so the next step faulted its pages in again (fwd+bwd at T=16384: 1.0M page
faults and 8 s of system time per step, 12.8 s instead of 5.4 s). :func:`keep_freed_memory`
stops both: large buffers come from the heap and the heap is never trimmed, so freed buffers
are reused. It applies to the whole process (numpy's buffers too), which is why only entry
points call it. MLX's own memory accounting (``mx.get_peak_memory``) is unaffected; the
process's resident size stays at its peak instead of shrinking after it (until
:func:`release_freed_memory`). Set POWER_RETENTION_KEEP_MALLOC=1 to leave malloc alone.

Streams. MLX's CPU backend runs the ops of one stream one after another on one thread. With a threaded
BLAS the products use every core, but the elementwise ops, reductions and scans between them
(about a third of the chunked form's time here) use one, and the BLAS threads spin meanwhile.
With a single-threaded BLAS, heads split across one stream per core run side by side,
products and everything else alike. So ``split_across_cpu_streams(power_retention)``
splits its heads across ``parallel_cpu_streams()`` when BLAS runs single-threaded on a
multi-core CPU; two streams calling a threaded BLAS at once contend for its threads and run
slower than one stream.

MLX builds its evaluation order breadth-first up to ``MLX_BFS_MAX_WIDTH`` arrays (default 20)
and keeps at most 10 ops in flight: with the default width one stream's part of a large graph
is queued before the other's and the streams take turns. The width a graph needs grows with
its number of chunks (the scan is a loop over them): ``MLX_BFS_MAX_WIDTH=16384`` before MLX
evaluates anything lets the streams overlap, and ``tune_process`` sets it unless it is set
(MLX's peak memory at T=32768, chunk 64, fwd+bwd: 9.3 GB instead of 8.9 GB with a width of
1024). The trainer splits whole training steps the same way (``llm.cpu_streams``).

The hand-written backward passes run on the stream of their forward (``autodiff``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import subprocess
import sys

import mlx.core as mx

from .cost import estimated_seconds
from .state import RetentionState
from .validation import check_integer

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
# Set to 1 to leave glibc's malloc settings alone.
_KEEP_MALLOC = "POWER_RETENTION_KEEP_MALLOC"


def _switch(name: str, env=None) -> bool:
    """The documented on/off variable ``name``: "1" on, "0" or unset off, anything else an
    error naming it (a value that means nothing must not be ignored silently)."""
    value = (os.environ if env is None else env).get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 1 (on) or 0 (off), got {value!r}")
    return value == "1"


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
    if _switch(_KEEP_MALLOC) or libc is None:
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
        core = openblas_core()
        return f"OpenBLAS ({openblas[0]}{f', {core} kernels' if core else ''})"
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
    check_integer("threads", threads)
    openblas.openblas_set_num_threads(threads)


def fast_blas_environment(env: dict | None = None) -> dict:
    """A copy of ``env`` with OpenBLAS added to LD_PRELOAD when it is installed (and its
    threads told not to spin between products)."""
    env = dict(os.environ if env is None else env)
    library = openblas_library()
    if _switch(_OPT_OUT, env) or library is None:
        return env
    preload = env.get("LD_PRELOAD", "")
    if library not in preload.split(":"):
        env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    # OpenBLAS's idle threads spin (sched_yield) for 2^28 cycles after each product by
    # default, while MLX runs its elementwise ops on one of the same cores: at the minimum,
    # 2^4, the chunked form's forward at T=8192 ran about 20% faster here, fwd+bwd 5%, and
    # a lone 2048^3 product no slower.
    env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    if "OPENBLAS_CORETYPE" not in env:
        core = kernels_for_this_cpu(_default_core(library), _cpu_flags())
        if core:
            env["OPENBLAS_CORETYPE"] = core
    return env


# OpenBLAS's names (openblas_get_corename, lower case) of the x86 kernels without AVX2 and
# FMA: where it picks one of these on a CPU that has both, it did not recognise the CPU.
_KERNELS_BEFORE_AVX2 = frozenset((
    "katmai", "coppermine", "northwood", "prescott", "banias", "core2", "penryn", "dunnington",
    "nehalem", "atom", "sandybridge", "athlon", "opteron", "barcelona", "bobcat", "bulldozer",
    "piledriver", "steamroller", "excavator"))
# What OpenBLAS's SkylakeX kernels use (its own AVX-512 check asks for these).
_AVX512_FLAGS = frozenset(("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"))


def kernels_for_this_cpu(default_core: str | None, flags: frozenset) -> str | None:
    """The OPENBLAS_CORETYPE to set: None where OpenBLAS's own pick (``default_core``) is
    AVX2-or-later or unknown, else SkylakeX on a CPU with AVX-512, Haswell on one with AVX2
    and FMA (``flags``: the CPU's, as /proc/cpuinfo lists them)."""
    if default_core is None or default_core.lower() not in _KERNELS_BEFORE_AVX2:
        return None
    if _AVX512_FLAGS <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


@functools.lru_cache(maxsize=4)
def _default_core(library: str) -> str | None:
    """The kernels ``library`` picks by itself on this CPU, asked in a short child process
    (loading it here would start its threads in a process that may never use it)."""
    code = ("import ctypes, sys; name = ctypes.CDLL(sys.argv[1]).openblas_get_corename; "
            "name.restype = ctypes.c_char_p; print(name().decode())")
    env = {"OPENBLAS_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "")}
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", code, library], env=env,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def openblas_core() -> str | None:
    """The kernels the OpenBLAS loaded in this process runs (e.g. "SkylakeX"), or None."""
    openblas = _openblas_symbols()
    if openblas is None or not hasattr(openblas, "openblas_get_corename"):
        return None
    name = openblas.openblas_get_corename
    name.restype = ctypes.c_char_p
    return name().decode()


def reexec_with_fast_blas() -> None:
    """Restart this Python process with OpenBLAS preloaded, if that would change anything.

    Call it first thing in a script's ``main`` (before heavy work: the process is replaced).
    It does nothing on macOS, when OpenBLAS is absent or already loaded, when the user opted
    out, or when this process is itself the restarted one. A process started with OpenBLAS
    preloaded but on kernels older than its CPU is restarted with better ones.
    """
    if os.environ.get(_REEXEC_MARKER):
        return
    env = fast_blas_environment()
    if all(env.get(name) == os.environ.get(name) for name in ("LD_PRELOAD", "OPENBLAS_CORETYPE")):
        return
    env[_REEXEC_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


# Set to a number of streams to force a split (1: never split), whatever the BLAS.
CPU_STREAMS_VARIABLE = "POWER_RETENTION_CPU_STREAMS"

_streams: list = []


def _requested_streams() -> int:
    value = os.environ.get(CPU_STREAMS_VARIABLE, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{CPU_STREAMS_VARIABLE} must be an integer >= 1, got {value!r}")
        return int(value)
    return (os.cpu_count() or 1) if blas_threads() == 1 else 1


def parallel_cpu_streams() -> list:
    """The CPU streams to split the op's heads across: one per core when the default device is
    the CPU and BLAS runs single-threaded, else none (POWER_RETENTION_CPU_STREAMS=N overrides
    the count). Created once and reused."""
    if mx.default_device() != mx.cpu:
        return []
    count = _requested_streams()
    if count < 2:
        return []
    while len(_streams) < count:
        _streams.append(mx.new_stream(mx.cpu))
    return _streams[:count]


def stream_parts(size: int, streams: list) -> list:
    """(stream, start, stop) for an axis of ``size`` entries cut into near-equal parts, one per
    stream (fewer when the axis is shorter than the list of streams)."""
    parts = min(len(streams), size)
    bounds = [size * i // parts for i in range(parts + 1)]
    return list(zip(streams, bounds, bounds[1:]))

# Estimated work below which a call stays on one stream.
MIN_SECONDS_TO_SPLIT = 0.01


def split_across_cpu_streams(op):
    """``op`` (``power_retention``'s signature) with its heads, or its batch when there is one
    head, cut into parts that run side by side on ``parallel_cpu_streams()``; the outputs and
    final states joined again. Calls that would not gain run ``op`` as they are: no streams to
    split across, the recurrent form (T steps of small ops, which a split only doubles: 0.22 s
    on one stream, 0.51 s on two at T=256), and calls estimated under ``MIN_SECONDS_TO_SPLIT``
    (the attention form at T=256: 2.2 ms on one stream, 5.7 ms on two)."""

    @functools.wraps(op)
    def split_op(q, k, v, log_g=None, *, initial_state=None, return_state=False, **options):
        def whole():
            return op(q, k, v, log_g, initial_state=initial_state, return_state=return_state,
                      **options)

        streams = parallel_cpu_streams()
        if len(streams) < 2 or not all(isinstance(x, mx.array) and x.ndim == 4 for x in (q, k, v)) \
                or q.shape[2] % k.shape[2]:
            return whole()  # and the op reports any bad input
        B, T, Hq, d = q.shape
        H = k.shape[2]
        shape = dict(B=B, T=T, Hq=Hq, H=H, d=d, e=v.shape[-1], deg=options.get("deg", 2),
                     gated=log_g is not None)
        from . import tuning  # here, so that python -m power_retention.tuning runs it as a script

        # Chosen for the whole call, not for a part.
        method, chunk_size = tuning.resolve(options.pop("method", "auto"), options.pop("chunk_size", None),
                                            dtype=q.dtype, with_state=initial_state is not None or return_state,
                                            **shape)
        shape["chunk_size"] = chunk_size
        options.update(method=method, chunk_size=chunk_size)
        if method == "recurrent" or max(B, H) < 2 or \
                estimated_seconds(method, **shape) < MIN_SECONDS_TO_SPLIT:
            return whole()

        G = Hq // H
        by_heads = H > 1
        state_axis = 1 if by_heads else 0  # heads: axis 2 of q, k, v and log_g, axis 1 of a state

        def part(x, axis, start, stop):
            return None if x is None else x[(slice(None),) * axis + (slice(start, stop),)]

        ys, states = [], []
        for stream, start, stop in stream_parts(H if by_heads else B, streams):
            with mx.stream(stream):
                if by_heads:
                    inputs = (part(q, 2, start * G, stop * G), part(k, 2, start, stop),
                              part(v, 2, start, stop), part(log_g, 2, start, stop))
                else:
                    inputs = tuple(part(x, 0, start, stop) for x in (q, k, v, log_g))
                initial = None if initial_state is None else RetentionState(
                    *(part(x, state_axis, start, stop) for x in initial_state))
                result = op(*inputs, initial_state=initial, return_state=return_state, **options)
            y, state = result if return_state else (result, None)
            ys.append(y)
            states.append(state)
        y = mx.concatenate(ys, axis=2 if by_heads else 0)
        if not return_state:
            return y
        return y, RetentionState(*(mx.concatenate(arrays, axis=state_axis) for arrays in zip(*states)))

    return split_op


# MLX's evaluation order is breadth-first up to this many arrays: wide enough for the parts
# of a step split across CPU streams to run side by side (see "Streams" above). A tiny
# training step at 8 x 512 on one stream peaked at 5.03 GB with this width and with MLX's 20.
BFS_MAX_WIDTH = "16384"


def tune_process() -> None:
    """What an entry point calls first thing: restart with OpenBLAS preloaded where that helps
    (``reexec_with_fast_blas``), keep freed memory for reuse (``keep_freed_memory``), and let
    CPU streams overlap (``MLX_BFS_MAX_WIDTH``, unless set: MLX reads it at its first
    evaluation, and the restarted process inherits it). Does nothing on macOS."""
    if not sys.platform.startswith("linux"):
        return
    os.environ.setdefault("MLX_BFS_MAX_WIDTH", BFS_MAX_WIDTH)
    reexec_with_fast_blas()
    keep_freed_memory()
