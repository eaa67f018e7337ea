"""The fused Metal kernels as the op takes them: each kernel call with the MLX path beside it,
and the choice between the two, in one place (``metal_kernels`` holds the kernels and their
launch arguments; this module is the op's only way to them).

A call with ``use_metal=True`` takes the kernels when they run here (``metal_kernels.launch``
on "metal" with the GPU as MLX's default device, or on the CPU "emulator" that tests select)
and when they take its inputs; anything else runs the MLX path, which gives the same results.
Every kernel call is an ``mx.custom_function`` whose vjp is that of the MLX path, so
gradients through the kernels are those of the MLX path.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache, partial

import mlx.core as mx

from metal_kernels import launch

from .recurrent import recurrent_step
from .state import RetentionState
from .sympow import expanded_dim, sympow

_warned = False
# The kernels index their arrays with 32-bit unsigned integers: an array of 2^32 or more
# elements would be read and written at wrapped-around offsets, so such calls take the MLX
# path.
INDEX_LIMIT = 2**32


def indexable(*shapes) -> bool:
    """Whether arrays of these shapes have fewer elements each than the kernels can index."""
    return all(math.prod(shape) < INDEX_LIMIT for shape in shapes)


def kernels_run(use_metal: bool) -> bool:
    """True when a call asking for the kernels (``use_metal``) gets them; the first call that
    asks and cannot warns once per process why it runs on the MLX path."""
    global _warned
    if not use_metal:
        return False
    where = launch.backend()
    if where == "emulator" or (where == "metal" and mx.default_device() == mx.gpu):
        return True
    if not _warned:
        _warned = True
        reason = ("Metal is not available on this machine" if not mx.metal.is_available() else
                  "the kernels are switched off (metal_kernels.launch.set_backend(None))"
                  if where is None else "MLX's default device is the CPU")
        warnings.warn(f"use_metal=True: {reason}; power retention runs on the MLX path "
                      "(same results).", stacklevel=4)
    return False


# Decoding: one token on the decode kernel.

def decode_fits(q, k, v, deg: int) -> bool:
    """Whether the decode kernel takes these inputs (one of its dtypes for all three; value
    width and a query group's threadgroup memory within the limits; a state it can index)."""
    (B, H, d), e = k.shape, v.shape[-1]
    return (e <= launch.MAX_THREADS_PER_THREADGROUP
            and 4 * (q.shape[1] // H + 1) * q.shape[2] <= launch.MAX_THREADGROUP_BYTES
            and indexable((B, H, expanded_dim(d, deg), e), q.shape)
            and launch.kernel_dtype(q, k, v) is not None)


@lru_cache(maxsize=None)
def _decode_function(deg: int, normalize: bool):
    """The fused step: q (B, Hq, d) float32, k (B, H, d), v (B, H, e) in one dtype, log_g
    (B, H), S, z float32 -> y (in k's dtype), S, z."""

    def mlx_path(q, k, v, log_g, S, z):
        y, state = recurrent_step(q, k.astype(q.dtype), v.astype(q.dtype), log_g,
                                  RetentionState(S, z), deg=deg, normalize=normalize)
        return y.astype(k.dtype), state.S, state.z

    @mx.custom_function
    def step(q, k, v, log_g, S, z):
        S, z, numerator, denominator = launch.run(
            "decode_step", launch.decode_launch(q, k, v, log_g, S, z, deg=deg))
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


def decode_step(q, k, v, log_g, state, *, deg: int, normalize: bool):
    """``recurrent_step`` on the decode kernel: q (B, Hq, d) prepared (float32, scaled), k and
    v (B, H, d / e) as the caller gave them, log_g (B, H) or None, state or None."""
    B, H, d, e = k.shape[0], k.shape[1], k.shape[2], v.shape[-1]
    if state is None:
        D = expanded_dim(d, deg)
        state = RetentionState(mx.zeros((B, H, D, e)), mx.zeros((B, H, D)))
    log_g = mx.zeros((B, H)) if log_g is None else log_g
    y, S, z = _decode_function(deg, bool(normalize))(q, k, v, log_g, *state)
    return y, RetentionState(S, z)


# Prefill: the chunked form's two state products on the prefill kernels.

def prefill_fits(q, k, v) -> bool:
    """Whether the prefill kernels take these inputs (not float64; value width + 1 within the
    threadgroup cap)."""
    return (v.shape[-1] + 1 <= launch.MAX_THREADS_PER_THREADGROUP
            and mx.float64 not in (q.dtype, k.dtype, v.dtype))


def _chunk_states_mlx(k, v1, deg):
    return sympow(k, deg).swapaxes(-1, -2) @ v1


def _query_states_mlx(q, S1, deg):
    N, (NG, C, d) = S1.shape[0], q.shape
    reads = sympow(q.reshape(N, NG // N, C, d), deg) @ S1[:, None]
    return reads.reshape(NG, C, -1)


def _chunk_states_launch(k, v1, deg):
    return launch.chunk_states_launch(k, v1, deg=deg, features=expanded_dim(k.shape[-1], deg))


def _query_states_launch(q, S1, deg):
    return launch.query_states_launch(q, S1, deg=deg)


# name: (call arguments, the MLX path its vjp goes through)
_PREFILL = {"chunk_states": (_chunk_states_launch, _chunk_states_mlx),
            "query_states": (_query_states_launch, _query_states_mlx)}


@lru_cache(maxsize=None)
def _prefill_function(name: str, deg: int):
    arguments, mlx_path = _PREFILL[name]

    @mx.custom_function
    def kernel(a, b):
        return launch.run(name, arguments(a, b, deg))[0]

    @kernel.vjp
    def kernel_vjp(primals, cotangent, output):
        # One output: MLX may pass its cotangent bare or in a one-element list.
        if isinstance(cotangent, (list, tuple)):
            cotangent = cotangent[0]
        return tuple(mx.vjp(lambda a, b: mlx_path(a, b, deg), list(primals), [cotangent])[1])

    return kernel


class StateKernels:
    """What ``chunk_power_retention`` takes as ``state_kernels``: its two state products on
    the prefill kernels."""

    @staticmethod
    def chunk_states_fit(k, v1, deg: int) -> bool:
        """Whether the chunk_states kernel takes k (n, B, H, c, d), v1 (n, B, H, c, e + 1): a
        tile of one feature's values over the chunk fits in threadgroup memory (a long
        attention-form chunk may not), and every array is indexable."""
        *chunks, C, d = k.shape
        return (4 * C <= launch.MAX_THREADGROUP_BYTES
                and indexable(k.shape, v1.shape, (*chunks, expanded_dim(d, deg), v1.shape[-1])))

    @staticmethod
    def read_states_fit(q, states) -> bool:
        """Whether the query_states kernel takes q (n, B, H, G, c, d) and states
        (n, B, H, D, e + 1): every array, the output included, is indexable."""
        return indexable(q.shape, states.shape, (*q.shape[:-1], states.shape[-1]))

    @staticmethod
    def chunk_states(k, v1, deg: int):
        """Each chunk's own [S | z]: k (n, B, H, c, d), v1 (n, B, H, c, e + 1) ->
        (n, B, H, D, e + 1)."""
        n, B, H, C, d = k.shape
        fits = StateKernels.chunk_states_fit(k, v1, deg)
        k, v1 = k.reshape(-1, C, d), v1.reshape(-1, C, v1.shape[-1])
        S1 = (_prefill_function("chunk_states", deg) if fits else partial(_chunk_states_mlx, deg=deg))(k, v1)
        return S1.reshape(n, B, H, *S1.shape[1:])

    @staticmethod
    def read_states(q, states, deg: int):
        """What each query reads from the state entering its chunk: q (n, B, H, G, c, d),
        states (n, B, H, D, e + 1) -> (n, B, H, G, c, e + 1)."""
        n, B, H, G, C, d = q.shape
        D, E1 = states.shape[-2:]
        read = (_prefill_function("query_states", deg) if StateKernels.read_states_fit(q, states)
                else partial(_query_states_mlx, deg=deg))
        out = read(q.reshape(-1, C, d), states.reshape(-1, D, E1))
        return out.reshape(n, B, H, G, C, E1)
