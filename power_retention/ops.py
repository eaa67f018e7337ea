"""Public entry points: ``power_retention`` (a whole sequence) and ``power_retention_step``.

Both validate their inputs, compute in float32 (float64 for float64 inputs) and return the
output in q's dtype. See SPEC.md for the math; the three forms live in ``chunk.py`` (chunked
and attention) and ``recurrent.py``.
"""

from __future__ import annotations

import math
import numbers

import mlx.core as mx

from .checks import is_integer
from .chunk import chunk_power_retention
from .recurrent import recurrent_power_retention, recurrent_step
from .state import RetentionState
from .streams import parallel_cpu_streams, stream_parts
from .sympow import check_degree, expanded_dim

METHODS = ("auto", "attention", "chunked", "recurrent")

# Cost model for method="auto", in seconds: dense matmul flops, elementwise passes over
# intermediate arrays, and the fixed cost of one small op (which dominates the recurrent
# form's T sequential steps and the chunked form's scan). Fitted to the MLX CPU backend with
# OpenBLAS (benchmarks/bench_retention.py); only their ratios matter.
_MATMUL_FLOPS_PER_S = 1.0e11
_ELEMENTS_PER_S = 1.0e9
_SECONDS_PER_OP = 2.0e-5
# Elementwise passes per entry of an attention weight matrix (product, power, decay, mask)
# and per expanded feature (one strided product). Fitted to the forward times of
# bench_retention.py at T = 256 .. 4096 (B=1, H=4, d=64, deg 2): the model is within a factor
# 1.6 of each measurement and switches to the chunked form near T = 2000, between the measured 2048
# (attention faster) and 4096 (chunked faster).
_PASSES_PER_WEIGHT = 5
_PASSES_PER_FEATURE = 1
# Estimated work below which a call stays on one stream (see ``streams``).
_MIN_SECONDS_TO_SPLIT = 0.01


def estimated_seconds(method, *, B, T, Hq, H, d, e, deg, chunk_size, gated=True):
    """Cost-model estimate of one forward pass; ``method="auto"`` takes the smallest."""
    D = expanded_dim(d, deg)

    def seconds(flops, elements, ops):
        return flops / _MATMUL_FLOPS_PER_S + elements / _ELEMENTS_PER_S + ops * _SECONDS_PER_OP

    def attention_cost(c):
        weights = B * Hq * T * c
        return 2 * weights * (d + e), _PASSES_PER_WEIGHT * weights

    if method == "attention":
        flops, elements = attention_cost(T)
        return seconds(flops, elements, 10)
    if method == "chunked":
        c = min(chunk_size, T)
        n = -(-T // c)
        flops, elements = attention_cost(c)
        flops += 2 * B * (H + Hq) * n * c * D * e
        elements += _PASSES_PER_FEATURE * B * (H + Hq) * n * c * D + 3 * B * H * n * D * e
        return seconds(flops, elements, 20 + (4 if gated else 2) * n)
    if method == "recurrent":
        per_step = B * (H + Hq) * D * e
        return seconds(2 * T * per_step, 3 * T * per_step, 15 * T)
    raise ValueError(f"method must be one of {METHODS[1:]}, got {method!r}")


def choose_method(**shape) -> str:
    """The form with the smallest estimated cost (ties go to the attention form)."""
    return min(("attention", "chunked", "recurrent"),
               key=lambda method: estimated_seconds(method, **shape))


def _describe(names: str, has_time: bool) -> str:
    dims = [name.strip() for name in names.split(",")]
    if not has_time:
        dims.remove("T")
    return "(" + ", ".join(dims) + ")"


def _check_array(name, x, ndim, layout, has_time):
    if not isinstance(x, mx.array):
        raise ValueError(f"{name} must be an mlx.core.array of shape {_describe(layout, has_time)}, "
                         f"got {type(x).__name__}")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise ValueError(f"{name} must be floating point (float32, float16, bfloat16 or float64), "
                         f"got {x.dtype}")
    expected_ndim = ndim if has_time else ndim - 1
    if x.ndim != expected_ndim:
        raise ValueError(f"{name} must have shape {_describe(layout, has_time)}, got {tuple(x.shape)}")


def prepare_inputs(q, k, v, log_g, deg, scale, normalize, initial_state, has_time):
    """Check everything, then return the inputs with a time axis, in the compute dtype, q
    prepared (scaled, or divided by its largest entry when normalized): what every form takes."""
    deg = check_degree(deg)
    if normalize and deg % 2:
        raise ValueError(f"normalize=True needs an even deg (odd powers give negative weights and "
                         f"the denominator can vanish); got deg={deg}: use normalize=False")
    _check_array("q", q, 4, "B, T, Hq, d", has_time)
    _check_array("k", k, 4, "B, T, H, d", has_time)
    _check_array("v", v, 4, "B, T, H, e", has_time)
    if not has_time:
        q, k, v = q[:, None], k[:, None], v[:, None]
    B, T, Hq, d = q.shape
    H = k.shape[2]
    layout = "(B, T, H, d)" if has_time else "(B, H, d)"
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != d:
        raise ValueError(f"k must have shape {layout} matching q's B={B}"
                         f"{f', T={T}' if has_time else ''}, d={d}; "
                         f"got {tuple(k.shape if has_time else k[:, 0].shape)}")
    if Hq % H:
        raise ValueError(f"q's head count Hq={Hq} must be a multiple of k's head count H={H}")
    if v.shape[:3] != (B, T, H):
        expected = f"(B={B}, T={T}, H={H}, e)" if has_time else f"(B={B}, H={H}, e)"
        raise ValueError(f"v must have shape {expected} like k; "
                         f"got {tuple(v.shape if has_time else v[:, 0].shape)}")
    if T < 1 or d < 1 or v.shape[-1] < 1:
        raise ValueError(f"q, k and v need T >= 1, d >= 1 and e >= 1; got T={T}, d={d}, e={v.shape[-1]}")
    if log_g is not None:
        if not isinstance(log_g, mx.array) or not mx.issubdtype(log_g.dtype, mx.floating):
            raise ValueError("log_g must be None or a floating-point mlx array of shape "
                             f"{_describe('B, T, H', has_time)}")
        expected = (B, T, H) if has_time else (B, H)
        if tuple(log_g.shape) != expected:
            raise ValueError(f"log_g must have shape {expected} (B, {'T, ' if has_time else ''}H of k); "
                             f"got {tuple(log_g.shape)}")
        if not has_time:
            log_g = log_g[:, None]
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) \
                or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number or None (1/sqrt(d)), got {scale!r}")

    compute_dtype = mx.float64 if mx.float64 in (q.dtype, k.dtype, v.dtype) else mx.float32
    if initial_state is not None:
        initial_state = _check_state(initial_state, B, H, expanded_dim(d, deg), v.shape[-1],
                                     compute_dtype)
    q, k, v = q.astype(compute_dtype), k.astype(compute_dtype), v.astype(compute_dtype)
    if log_g is not None:
        log_g = log_g.astype(compute_dtype)

    if normalize:
        # s^p cancels, and so does any per-row factor on q: dividing each query by its largest
        # magnitude makes the result exactly invariant to q's scale and keeps (q . k)^p far
        # from overflow and underflow. The factor is a constant for autodiff, which is exact
        # because the output does not depend on it.
        row_max = mx.stop_gradient(mx.abs(q).max(axis=-1, keepdims=True))
        q = q / mx.where(row_max == 0, 1.0, row_max)
    else:
        q = q * (1.0 / math.sqrt(d) if scale is None else scale)
    return q, k, v, log_g, deg, initial_state


def _check_state(state, B, H, D, e, dtype) -> RetentionState:
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError("initial_state must be a RetentionState(S, z) or None")
    S, z = state
    for name, array, shape in (("S", S, (B, H, D, e)), ("z", z, (B, H, D))):
        if not isinstance(array, mx.array):
            raise ValueError(f"initial_state.{name} must be an mlx array of shape {shape}")
        if tuple(array.shape) != shape:
            raise ValueError(f"initial_state.{name} must have shape {shape} "
                             f"(B, H, D={D}{', e' if name == 'S' else ''}), got {tuple(array.shape)}")
        if array.dtype != dtype:
            raise ValueError(f"initial_state.{name} must be {dtype} (states are kept in float32, "
                             f"float64 for float64 inputs), got {array.dtype}")
    return RetentionState(S, z)


def power_retention(q, k, v, log_g=None, *, deg=2, scale=None, method="auto", chunk_size=64,
                    initial_state=None, return_state=False, normalize=True):
    """Causal power retention over a sequence.

    q (B, T, Hq, d), k (B, T, H, d), v (B, T, H, e), log_g (B, T, H) with log_g <= 0 or None
    (no decay). Query head i reads key/value head i // (Hq // H). Returns y (B, T, Hq, e) in
    q's dtype, and also the final RetentionState when ``return_state``; passing that state as
    ``initial_state`` to the next call continues the sequence exactly.

    method: "attention" (T x T weights, cheapest for short T), "chunked" (attention inside
    chunks of ``chunk_size``, a state across them; linear in T), "recurrent" (one token at a
    time), or "auto" (the cheapest by ``estimated_seconds``).
    """
    return run_power_retention(q, k, v, log_g, deg=deg, scale=scale, method=method,
                               chunk_size=chunk_size, initial_state=initial_state,
                               return_state=return_state, normalize=normalize)


def run_power_retention(q, k, v, log_g=None, *, deg=2, scale=None, method="auto", chunk_size=64,
                        initial_state=None, return_state=False, normalize=True,
                        state_kernels=None):
    """``power_retention``, with the chunked and attention forms' two state products done by
    ``state_kernels`` when given (``chunk_states`` and ``read_states``: see
    ``metal_kernels.dispatch``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if not is_integer(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    out_dtype = q.dtype if isinstance(q, mx.array) else None
    q, k, v, log_g, deg, initial_state = prepare_inputs(q, k, v, log_g, deg, scale, normalize,
                                                        initial_state, has_time=True)
    B, T, Hq, d = q.shape
    shape = dict(B=B, T=T, Hq=Hq, H=k.shape[2], d=d, e=v.shape[-1], deg=deg, chunk_size=chunk_size,
                 gated=log_g is not None)
    if method == "auto":
        method = choose_method(**shape)

    def form(q, k, v, log_g, initial_state):
        if method == "recurrent":
            return recurrent_power_retention(q, k, v, log_g, deg=deg, initial_state=initial_state,
                                             normalize=normalize)
        return chunk_power_retention(q, k, v, log_g, deg=deg,
                                     chunk_size=T if method == "attention" else chunk_size,
                                     initial_state=initial_state, return_state=return_state,
                                     normalize=normalize, state_kernels=state_kernels)

    # The recurrent form is T steps of small ops, which a split only doubles (T=256: 0.22 s on
    # one stream, 0.51 s on two); small calls lose more to the streams' synchronization than
    # they gain (attention form at T=256: 2.2 ms on one stream, 5.7 ms on two).
    split = (state_kernels is None and method != "recurrent" and max(B, k.shape[2]) > 1
             and estimated_seconds(method, **shape) >= _MIN_SECONDS_TO_SPLIT)
    streams = parallel_cpu_streams() if split else []
    if len(streams) > 1:
        y, state = _run_split(form, streams, q, k, v, log_g, initial_state)
    else:
        y, state = form(q, k, v, log_g, initial_state)
    y = y.astype(out_dtype)
    return (y, state) if return_state else y


def _run_split(form, streams, q, k, v, log_g, initial_state):
    """``form`` on parts of the heads (of the batch when there is one head), each part on its
    own stream; the outputs and states joined again (see ``streams``)."""
    H, G = k.shape[2], q.shape[2] // k.shape[2]
    by_heads = H > 1
    state_axis = 1 if by_heads else 0  # heads: axis 2 of q, k, v and log_g, axis 1 of the state

    def part(x, axis, start, stop):
        return None if x is None else x[(slice(None),) * axis + (slice(start, stop),)]

    ys, states = [], []
    for stream, start, stop in stream_parts(H if by_heads else q.shape[0], streams):
        with mx.stream(stream):
            if by_heads:
                inputs = (part(q, 2, start * G, stop * G), part(k, 2, start, stop),
                          part(v, 2, start, stop), part(log_g, 2, start, stop))
            else:
                inputs = tuple(part(x, 0, start, stop) for x in (q, k, v, log_g))
            initial = None if initial_state is None else RetentionState(
                *(part(x, state_axis, start, stop) for x in initial_state))
            y, state = form(*inputs, initial)
        ys.append(y)
        states.append(state)
    y = mx.concatenate(ys, axis=2 if by_heads else 0)
    if states[0] is None:
        return y, None
    return y, RetentionState(*(mx.concatenate(arrays, axis=state_axis) for arrays in zip(*states)))


def power_retention_step(q, k, v, log_g, state, *, deg=2, scale=None, normalize=True):
    """One token: q (B, Hq, d), k (B, H, d), v (B, H, e), log_g (B, H) or None; state None
    starts an empty sequence. Returns y (B, Hq, e) in q's dtype and the new RetentionState."""
    out_dtype = q.dtype if isinstance(q, mx.array) else None
    q, k, v, log_g, deg, state = prepare_inputs(q, k, v, log_g, deg, scale, normalize, state,
                                                has_time=False)
    y, state = recurrent_step(q[:, 0], k[:, 0], v[:, 0], None if log_g is None else log_g[:, 0],
                              state, deg=deg, normalize=normalize)
    return y.astype(out_dtype), state
