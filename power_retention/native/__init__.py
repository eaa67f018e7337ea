"""Compiled CPU code for what MLX's Linux CPU backend runs slowly: exp, sigmoid, SiLU,
logsumexp and cross-entropy, and the chunked form's products.

MLX's CPU build for x86 evaluates exp one float at a time: about 25 ns a float on a Xeon,
against about 1.2 ns for the loop in ``fast_math.cpp``, which the compiler vectorises. A
language model's training step spends most of its time there (the cross-entropy over a
50,257-token vocabulary and its gradient, and SwiGLU's sigmoid), so the model and the trainer
call these functions instead of MLX's.

The chunked form (``chunk.py``) as MLX ops writes every intermediate array to memory and reads
it back: the c x c weights of each chunk, the T x D' symmetric power features of every query
and key, and their cotangents. ``chunked.cpp`` computes the attention inside each chunk and, at
degree 2, the two state products with their vjps, one (chunk, head) at a time with those arrays
kept in cache, around single-threaded sgemm calls spread over OpenBLAS's threads, and the scan
across chunks in one pass each way (T = 4096-16384, 4 heads of 64: the op's forward and
backward in about half the time of its MLX ops, benchmarks/README.md). The attention form on
its own (``attention``) takes the op's (B, T, H, d) arrays as they are, copying one head's rows
at a time into cache-sized buffers, and normalises inside.

The C++ primitives (with their vjp and vmap, and for the elementwise ones jvp, so that
``mx.grad``, ``mx.compile`` and ``mx.vmap`` work through them) are compiled with g++ at the
first use on a machine, against the installed MLX and nanobind, and kept in the cache directory
(``POWER_RETENTION_CACHE``, as for ``tuning``) under a name that changes with the sources, MLX,
nanobind, Python and the compiler. Where they do not apply, every function here is MLX's own
(and ``chunk.py`` its MLX ops): not on Linux (MLX's CPU code is vectorised on macOS, and the GPU
runs Metal), the default device a GPU, an input that is not float32, no g++ or Python headers,
or ``POWER_RETENTION_NATIVE=0``. A failed build says why once, on stderr, and the run goes on
with MLX's functions.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import subprocess
import sys
import sysconfig

import mlx.core as mx
import mlx.nn as nn

from ..autodiff import custom_function

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, name) for name in ("fast_math.cpp", "chunked.cpp"))
HEADERS = (os.path.join(_HERE, "cpu_dispatch.h"),)
SWITCH = "POWER_RETENTION_NATIVE"


def enabled() -> bool:
    value = os.environ.get(SWITCH, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{SWITCH} must be 1 (use the compiled functions) or 0 (MLX's), got {value!r}")
    return value == "1"


def _build_commands(output: str) -> tuple | str:
    """The g++ command lines building the module at ``output``: compilations that can run side
    by side (our sources, and nanobind's library at -Os as nanobind's own build makes it), and
    the link; or why it cannot be built here."""
    try:
        import nanobind
    except ImportError:
        return "nanobind is not installed (pip install nanobind)"
    python_headers = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(python_headers, "Python.h")):
        return f"no Python headers in {python_headers} (apt-get install python3-dev)"
    mlx_root = os.path.dirname(mx.__file__)  # the wheel's headers and libmlx sit beside core
    nb_root = os.path.dirname(nanobind.include_dir())
    flags = ["-std=c++20", "-fPIC", "-fvisibility=hidden",
             # MLX's Python module registers its array type in nanobind's "mlx" domain.
             "-DNB_DOMAIN=mlx",
             f"-I{os.path.join(mlx_root, 'include')}", f"-I{nanobind.include_dir()}",
             f"-I{os.path.join(nb_root, 'ext', 'robin_map', 'include')}", f"-I{python_headers}"]
    ours = [(source, f"{output}.{os.path.basename(source)}.o") for source in SOURCES]
    theirs = f"{output}.nanobind.o"
    compilations = (*(["g++", "-O3", *flags, "-c", source, "-o", obj] for source, obj in ours),
                    ["g++", "-Os", *flags, "-c", os.path.join(nanobind.source_dir(), "nb_combined.cpp"),
                     "-o", theirs])
    # cblas_sgemm stays undefined here and resolves when loaded as libmlx's does: to an OpenBLAS
    # loaded first, else to the BLAS libmlx links.
    link = ["g++", "-shared", *(obj for _, obj in ours), theirs, f"-L{os.path.join(mlx_root, 'lib')}", "-lmlx",
            f"-Wl,-rpath,{os.path.join(mlx_root, 'lib')}", "-o", output]
    return compilations, link


def _build(output: str) -> str | None:
    """Build the module at ``output``: None, or why it failed."""
    commands = _build_commands(output)
    if isinstance(commands, str):
        return commands
    compilations, link = commands
    print("power_retention.native: compiling the CPU functions (once per machine, about 10 s)",
          file=sys.stderr, flush=True)
    objects = [command[-1] for command in compilations]
    try:
        running = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True) for command in compilations]
        errors = [process.communicate(timeout=600)[1] for process in running]
        errors = [error for process, error in zip(running, errors) if process.returncode]
        if not errors:
            done = subprocess.run(link, capture_output=True, text=True, timeout=600)
            errors = [done.stderr] if done.returncode else []
    finally:
        for path in objects:
            if os.path.exists(path):
                os.remove(path)
    return "g++ failed:\n" + "\n".join(errors[0].splitlines()[-20:]) if errors else None


def _unavailable(reason: str) -> None:
    print(f"power_retention.native: MLX's functions are used instead of the compiled ones: {reason}",
          file=sys.stderr)
    return None


@functools.lru_cache(maxsize=1)
def _library_path() -> str:
    """Where the built module is kept: its name changes with everything the binary depends on."""
    from ..tuning import cache_path

    try:
        import nanobind
        nanobind_version = nanobind.__version__
    except ImportError:
        nanobind_version = "none"
    try:
        compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True,
                                  timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        compiler = "none"
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        with open(path, "rb") as source:
            digest.update(source.read())
    digest.update(f"{mx.__version__} {nanobind_version} {sys.version} {compiler}".encode())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return os.path.join(os.path.dirname(cache_path()), "native",
                        f"fast_math-{digest.hexdigest()[:16]}{suffix}")


@functools.lru_cache(maxsize=1)
def _module():
    """The compiled module (built on first use), or None where it does not apply."""
    if not sys.platform.startswith("linux") or not enabled():
        return None
    path = _library_path()
    if not os.path.exists(path):
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            failure = _build(temporary)
            if failure:
                return _unavailable(failure)
            os.replace(temporary, path)  # another process building the same file meanwhile is fine
        except (OSError, subprocess.SubprocessError) as error:
            return _unavailable(f"could not build in {os.path.dirname(path)} ({error})")
    spec = importlib.util.spec_from_file_location("_fast_math", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        one, e = module.exp(mx.array([0.0, 1.0])).tolist()
        works = one == 1.0 and abs(e - 2.718281828) < 1e-6
    except (ImportError, TypeError) as error:  # TypeError: an MLX built with another nanobind
        return _unavailable(f"the built module does not load here ({error})")
    if not works:
        return _unavailable("the built module computed a wrong exp")
    return module


def _native(x):
    """The compiled module when it applies to ``x``, else None."""
    if not applies_to(x):
        return None
    return _module()


def applies_to(x) -> bool:
    """Whether ``x`` takes the compiled functions: a float32 array, with them available."""
    return isinstance(x, mx.array) and x.dtype == mx.float32 and available()


def available() -> bool:
    """Whether float32 arrays on the CPU take the compiled functions in this process now
    (``POWER_RETENTION_NATIVE`` is read at every call: a benchmark can set it to 0 and back)."""
    return enabled() and mx.default_device() == mx.cpu and _module() is not None


def build() -> str | None:
    """What names the compiled functions in use (it changes with their source and everything
    they are built against), or None where MLX's own are used: measurements kept on disk
    (``tuning``) are taken again when it changes."""
    if not available():
        return None
    return os.path.basename(_library_path()).split(".")[0]


def exp(x):
    native = _native(x)
    return mx.exp(x) if native is None else native.exp(x)


def sigmoid(x):
    native = _native(x)
    return mx.sigmoid(x) if native is None else native.sigmoid(x)


def silu(x):
    """x * sigmoid(x), as ``nn.silu``."""
    native = _native(x)
    return nn.silu(x) if native is None else x * native.sigmoid(x)


def logsumexp(x):
    """log(sum(exp(x))) over the last axis (without keeping it)."""
    native = _native(x)
    return mx.logsumexp(x, axis=-1) if native is None else native.logsumexp(x)


def cross_entropy(logits, targets):
    """Per-position cross-entropy of integer ``targets`` under ``logits`` (..., V), as
    ``nn.losses.cross_entropy(logits, targets, reduction="none")``."""
    native = _native(logits)
    if native is None:
        return nn.losses.cross_entropy(logits, targets, reduction="none")
    chosen = mx.take_along_axis(logits, mx.expand_dims(targets, -1), axis=-1).squeeze(-1)
    return native.logsumexp(logits) - chosen


# The chunked form's products (chunked.cpp). Leading axes are items: (chunk, batch, head).

@functools.lru_cache(maxsize=16)
def _intra_chunk_function(deg: int, gated: bool):
    def forward(q, k, v1, *log_g):
        return _module().intra_chunk(q, k, v1, log_g[0] if gated else None, deg)

    def vjp(primals, cotangent, output):
        q, k, v1, *log_g = primals
        return tuple(_module().intra_chunk_vjp(q, k, v1, log_g[0] if gated else None, deg, cotangent))

    return custom_function(forward, vjp)


def intra_chunk(q, k, v1, log_g, deg):
    """[numerator | denominator] (..., G, c, E) of the attention form within each chunk, from q
    (..., G, c, d), k (..., c, d), values with the ones column v1 (..., c, E) and the log gates
    log_g (..., c) or None: chunk.py's ``_intra_chunk`` for float32 on the CPU."""
    function = _intra_chunk_function(deg, log_g is not None)
    return function(q, k, v1) if log_g is None else function(q, k, v1, log_g)


@functools.lru_cache(maxsize=16)
def _attention_function(deg: int, normalize: bool, gated: bool):
    def forward(q, k, v, *log_g):
        return tuple(_module().attention(q, k, v, log_g[0] if gated else None, deg, normalize))

    def vjp(primals, cotangents, outputs):
        q, k, v, *log_g = primals
        y, sums = outputs
        dy = mx.zeros_like(y) if cotangents[0] is None else cotangents[0]
        return tuple(_module().attention_vjp(q, k, v, log_g[0] if gated else None, deg, normalize, y, sums, dy))

    return custom_function(forward, vjp)


def attention(q, k, v, log_g, deg, normalize):
    """The attention form in the op's own layout: y (B, T, Hq, e) from q (B, T, Hq, d) (scaled),
    k (B, T, H, d), v (B, T, H, e) and log_g (B, T, H) or None; divided by the weight sums when
    ``normalize``. chunk.py's ``attention_power_retention`` for float32 on the CPU, without the
    chunk-major copies of its inputs and output or the column of ones."""
    function = _attention_function(deg, bool(normalize), log_g is not None)
    return (function(q, k, v) if log_g is None else function(q, k, v, log_g))[0]


def _rolled_chunk_states_vjp(primals, cotangent, output):
    return tuple(_module().rolled_chunk_states_vjp(*primals, cotangent))


_rolled_chunk_states = custom_function(lambda k, v1: _module().rolled_chunk_states(k, v1),
                                       _rolled_chunk_states_vjp)


def rolled_chunk_states(k, v1):
    """Each chunk's weighted state contribution [S | z]^T (..., E, D') from its keys k (..., c, d)
    and values with the ones column v1 (..., c, E): w * (v1^T rolled_products(k))."""
    return _rolled_chunk_states(k, v1)


def _rolled_read_states_vjp(primals, cotangent, output):
    return tuple(_module().rolled_read_states_vjp(*primals, cotangent))


_rolled_read_states = custom_function(lambda q, entering: _module().rolled_read_states(q, entering),
                                      _rolled_read_states_vjp)


def rolled_read_states(q, entering):
    """What the queries q (..., M, d) read from the states entering their chunk, [S | z]^T
    (..., E, D'): rolled_products(q) @ entering^T, (..., M, E)."""
    return _rolled_read_states(q, entering)


def _states_entering_chunks_vjp(primals, cotangents, outputs):
    d_entering, d_final = (mx.zeros_like(x) if d is None else d for d, x in zip(cotangents, outputs))
    return tuple(_module().states_entering_chunks_vjp(outputs[0], primals[1], d_entering, d_final))


_states_entering_chunks = custom_function(
    lambda contributions, decay, initial: tuple(_module().states_entering_chunks(contributions, decay, initial)),
    _states_entering_chunks_vjp)


def states_entering_chunks(contributions, decay, initial):
    """The states entering each chunk, stacked (n, ...), and the one after the last: S_0 =
    initial (items, ...), S_(i + 1) = decay_i S_i + contributions_i for contributions (n, items,
    ...) and decay (n, items, 1, 1) (any shape of n x items entries)."""
    return _states_entering_chunks(contributions, decay, initial)
