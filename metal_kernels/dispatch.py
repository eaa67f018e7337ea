"""Kernel registry and dispatch: the fused Metal kernels where Metal exists, the MLX path
elsewhere, and the CPU emulator on request (how Linux runs this very dispatch code).

Each kernel is built once: at import on a machine with Metal, on first use for the emulator.
Template arguments (dtype, degree, head widths) are picked per call; MLX compiles one
pipeline per distinct set. Every kernel call is an ``mx.custom_function`` whose vjp is the
vjp of the MLX path, so gradients through the kernels are those of the MLX path.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from power_retention.ops import power_retention_step, prepare_inputs, run_power_retention
from power_retention.recurrent import recurrent_step
from power_retention.state import RetentionState
from power_retention.sympow import expanded_dim, sympow

from . import emulator
from .sources import header, kernel_body

BACKENDS = ("metal", "emulator")
# name: (input names, output names, helper headers)
KERNELS = {
    "decode_step": (("q", "k", "v", "decay", "S", "z"),
                    ("S_out", "z_out", "numerator", "denominator"), ("sympow",)),
    "chunk_states": (("k", "v1"), ("S1",), ("sympow",)),
    "query_states": (("q", "S1"), ("out",), ("sympow",)),
}
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# Threadgroup limits. Metal allows up to 1024 threads only to kernels light enough on
# registers, and MLX raises (it does not fall back) above a pipeline's own limit: 256 is a
# cap every kernel here stays under. 32 KB of threadgroup memory is every Apple GPU's.
MAX_THREADS_PER_THREADGROUP = 256
MAX_THREADGROUP_BYTES = 32 * 1024
# Features per threadgroup: decode (its state tiles) and prefill (per pass); queries per
# prefill threadgroup.
DECODE_TILE = 128
FEATURE_TILE = 64
QUERY_ROWS = 16


def _build(factory, **options) -> dict:
    return {name: factory(name=name, input_names=list(inputs), output_names=list(outputs),
                          source=kernel_body(name), header=header(*headers), **options)
            for name, (inputs, outputs, headers) in KERNELS.items()}


_backend = "metal" if mx.metal.is_available() else None
_kernels = _build(mx.fast.metal_kernel) if _backend == "metal" else {}


def set_backend(name: str | None, **emulator_options) -> None:
    """Run the kernels on "metal", on the CPU "emulator" (slow; for tests: options are
    ``order`` and ``seed`` of ``emulator.run_kernel``), or not at all (None: the MLX path)."""
    global _backend, _kernels
    if name not in (*BACKENDS, None):
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    if name == "metal" and not mx.metal.is_available():
        raise ValueError("backend 'metal' needs a Mac with Metal; this machine has none")
    if emulator_options and name != "emulator":
        raise ValueError(f"options {sorted(emulator_options)} apply to the emulator only")
    kernels = {"metal": lambda: _build(mx.fast.metal_kernel),
               "emulator": lambda: _build(emulator.metal_kernel, **emulator_options),
               None: dict}[name]()
    _backend, _kernels = name, kernels


def backend() -> str | None:
    """Where the kernels run now: "metal", "emulator" or None (they do not: MLX path)."""
    return _backend


def _kernel_dtype(*arrays):
    """The one dtype the kernels read the arrays in, or None if they cannot."""
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    return dtype if dtype in KERNEL_DTYPES else None


def decode_launch(q, k, v, log_g, S, z, *, deg: int) -> dict:
    """The decode kernel's call arguments (inputs, template, grid, threadgroup, outputs) for
    prepared inputs (see ``_decode_function``)."""
    B, Hq, d = q.shape
    H, e = k.shape[1], v.shape[-1]
    D = expanded_dim(d, deg)
    tiles = -(-D // DECODE_TILE)
    return dict(
        inputs=[q, k, v, mx.exp(log_g), S, z],
        template=[("T", k.dtype), ("DEG", deg), ("DIM", d), ("E", e), ("G", Hq // H),
                  ("FEATURES", D), ("TILE", DECODE_TILE)],
        grid=(B * H * e, tiles, 1), threadgroup=(e, 1, 1),
        output_shapes=[S.shape, z.shape, (tiles, B, Hq, e), (tiles, B, Hq)],
        output_dtypes=[mx.float32] * 4)


@lru_cache(maxsize=None)
def _decode_function(deg: int, normalize: bool):
    """The fused step on prepared inputs: q (B, Hq, d) float32, k (B, H, d), v (B, H, e) in
    one dtype, log_g (B, H), S, z float32 -> y (in k's dtype), S, z."""

    def mlx_path(q, k, v, log_g, S, z):
        y, state = recurrent_step(q, k.astype(q.dtype), v.astype(q.dtype), log_g,
                                  RetentionState(S, z), deg=deg, normalize=normalize)
        return y.astype(k.dtype), state.S, state.z

    @mx.custom_function
    def step(q, k, v, log_g, S, z):
        S, z, numerator, denominator = _kernels["decode_step"](
            **decode_launch(q, k, v, log_g, S, z, deg=deg))
        y = numerator.sum(axis=0)
        if normalize:
            denominator = denominator.sum(axis=0)[..., None]
            y = y / mx.where(denominator == 0, 1.0, denominator)
        return y.astype(k.dtype), S, z

    @step.vjp
    def step_vjp(primals, cotangents, outputs):
        cotangents = [mx.zeros_like(o) if c is None else c for c, o in zip(cotangents, outputs)]
        return tuple(mx.vjp(mlx_path, list(primals), cotangents)[1])

    return step


def decode_step(q, k, v, log_g, state, *, deg=2, scale=None, normalize=True):
    """``power_retention_step`` (same arguments and results) through the fused decode kernel
    when one runs here and takes these inputs (float32, float16 or bfloat16 q, k, v of one
    dtype; value width <= MAX_THREADS_PER_THREADGROUP); otherwise the MLX path, which also
    reports bad inputs."""
    fits = (all(isinstance(x, mx.array) and x.ndim == 3 for x in (q, k, v))
            and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0
            and v.shape[-1] <= MAX_THREADS_PER_THREADGROUP
            and 4 * (q.shape[1] // k.shape[1] + 1) * q.shape[2] <= MAX_THREADGROUP_BYTES)
    dtype = _kernel_dtype(q, k, v) if fits else None
    if _backend is None or dtype is None:
        return power_retention_step(q, k, v, log_g, state, deg=deg, scale=scale,
                                    normalize=normalize)
    q, _, _, log_g, deg, state = prepare_inputs(q, k, v, log_g, deg, scale, normalize, state,
                                                has_time=False)
    B, H, d, e = k.shape[0], k.shape[1], k.shape[2], v.shape[-1]
    if state is None:
        D = expanded_dim(d, deg)
        state = RetentionState(mx.zeros((B, H, D, e)), mx.zeros((B, H, D)))
    log_g = mx.zeros((B, H)) if log_g is None else log_g[:, 0]
    y, S, z = _decode_function(deg, bool(normalize))(q[:, 0], k, v, log_g, *state)
    return y, RetentionState(S, z)


def chunk_states_launch(k, v1, *, deg: int) -> dict:
    """Call arguments of the chunk_states kernel: k (N, c, d), v1 (N, c, e + 1) float32."""
    N, C, d = k.shape
    E1, D = v1.shape[-1], expanded_dim(d, deg)
    tile = max(1, min(FEATURE_TILE, MAX_THREADGROUP_BYTES // (4 * C)))
    return dict(inputs=[k, v1],
                template=[("DEG", deg), ("DIM", d), ("C", C), ("E1", E1), ("FEATURES", D),
                          ("TILE", tile)],
                grid=(N * E1, -(-D // tile), 1), threadgroup=(E1, 1, 1),
                output_shapes=[(N, D, E1)], output_dtypes=[mx.float32])


def query_states_launch(q, S1, *, deg: int) -> dict:
    """Call arguments of the query_states kernel: q (N * G, c, d), S1 (N, D, e + 1) float32."""
    NG, C, d = q.shape
    N, D, E1 = S1.shape
    rows = min(QUERY_ROWS, C)
    return dict(inputs=[q, S1],
                template=[("DEG", deg), ("DIM", d), ("C", C), ("E1", E1), ("FEATURES", D),
                          ("TILE", FEATURE_TILE), ("ROWS", rows), ("G", NG // N)],
                grid=(NG * E1, -(-C // rows), 1), threadgroup=(E1, 1, 1),
                output_shapes=[(NG, C, E1)], output_dtypes=[mx.float32])


def _chunk_states_mlx(k, v1, deg):
    return sympow(k, deg).swapaxes(-1, -2) @ v1


def _query_states_mlx(q, S1, deg):
    N, (NG, C, d) = S1.shape[0], q.shape
    reads = sympow(q.reshape(N, NG // N, C, d), deg) @ S1[:, None]
    return reads.reshape(NG, C, -1)


# The prefill kernels: call arguments, and the MLX path their vjp goes through.
_PREFILL = {"chunk_states": (chunk_states_launch, _chunk_states_mlx),
            "query_states": (query_states_launch, _query_states_mlx)}


@lru_cache(maxsize=None)
def _prefill_function(name: str, deg: int):
    launch, mlx_path = _PREFILL[name]

    @mx.custom_function
    def kernel(a, b):
        return _kernels[name](**launch(a, b, deg=deg))[0]

    @kernel.vjp
    def kernel_vjp(primals, cotangent, output):
        # One output: MLX may pass its cotangent bare or in a one-element list.
        if isinstance(cotangent, (list, tuple)):
            cotangent = cotangent[0]
        return tuple(mx.vjp(lambda a, b: mlx_path(a, b, deg), list(primals), [cotangent])[1])

    return kernel


def chunk_states(k, v1, deg: int):
    """Each chunk's own [S | z]: k (n, B, H, c, d), v1 (n, B, H, c, e + 1) -> (n, B, H, D, e + 1)."""
    n, B, H, C, d = k.shape
    k, v1 = k.reshape(-1, C, d), v1.reshape(-1, C, v1.shape[-1])
    # A tile of one feature's values over the chunk must fit in threadgroup memory (a long
    # attention-form chunk may not).
    if 4 * C <= MAX_THREADGROUP_BYTES:
        S1 = _prefill_function("chunk_states", deg)(k, v1)
    else:
        S1 = _chunk_states_mlx(k, v1, deg)
    return S1.reshape(n, B, H, *S1.shape[1:])


def read_states(q, states, deg: int):
    """What each query reads from the state entering its chunk: q (n, B, H, G, c, d), states
    (n, B, H, D, e + 1) -> (n, B, H, G, c, e + 1)."""
    n, B, H, G, C, d = q.shape
    D, E1 = states.shape[-2:]
    out = _prefill_function("query_states", deg)(q.reshape(-1, C, d),
                                                 states.reshape(-1, D, E1))
    return out.reshape(n, B, H, G, C, E1)


def power_retention(q, k, v, log_g=None, *, deg=2, scale=None, method="auto", chunk_size=64,
                    initial_state=None, return_state=False, normalize=True):
    """``power_retention`` (same arguments and results) with the chunked form's state
    products on the prefill kernels when they run here and take these inputs (not float64;
    value width < MAX_THREADS_PER_THREADGROUP); otherwise the MLX path, which also reports
    bad inputs. The recurrent form, and the attention form without states, have no kernel."""
    fits = (all(isinstance(x, mx.array) and x.ndim == 4 for x in (q, k, v))
            and v.shape[-1] + 1 <= MAX_THREADS_PER_THREADGROUP
            and mx.float64 not in (q.dtype, k.dtype, v.dtype))
    kernels = _ChunkKernels if _backend is not None and fits else None
    return run_power_retention(q, k, v, log_g, deg=deg, scale=scale, method=method,
                               chunk_size=chunk_size, initial_state=initial_state,
                               return_state=return_state, normalize=normalize,
                               state_kernels=kernels)


class _ChunkKernels:
    """The chunked form's state products on the prefill kernels."""
    chunk_states = staticmethod(chunk_states)
    read_states = staticmethod(read_states)
