"""The op's inputs: checked, then brought to the form every form of the op takes (a time axis,
the compute dtype, q scaled)."""

from __future__ import annotations

import math
import numbers

import mlx.core as mx

from .state import RetentionState
from .sympow import expanded_dim
from .validation import check_degree, check_normalize


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


def prepare_inputs(q, k, v, log_g, deg, scale, normalize, initial_state, has_time,
                   check_gates=True):
    """Check everything, then return the inputs with a time axis, in the compute dtype, q
    prepared (scaled, or divided by its largest entry when normalized), the degree and
    ``normalize`` resolved: what every form takes. ``check_gates``: see ``_check_gates``."""
    deg = check_degree(deg)
    normalize = check_normalize(deg, normalize)
    _check_array("q", q, 4, "B, T, Hq, d", has_time)
    _check_array("k", k, 4, "B, T, H, d", has_time)
    _check_array("v", v, 4, "B, T, H, e", has_time)
    if not has_time:
        q, k, v = q[:, None], k[:, None], v[:, None]
    B, T, Hq, d = q.shape
    H = k.shape[2]
    if min(B, Hq, H) < 1:
        raise ValueError(f"q, k and v need a batch and heads: B >= 1, Hq >= 1 (q) and H >= 1 "
                         f"(k, v); got B={B}, Hq={Hq}, H={H}")
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
        if check_gates:
            _check_gates(log_g)
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
    return q, k, v, log_g, deg, normalize, initial_state


def _check_gates(log_g):
    """log_g > 0 is a gate above 1: the state grows without bound and overflows after a few
    hundred tokens. Checked where the values exist (an eager call, or under mx.grad); inside
    mx.compile or mx.vmap they do not, and the contract (log_g <= 0, -inf allowed: a reset)
    is the caller's. NaN gates are refused too."""
    try:
        bad = mx.logical_not(log_g <= 0).any().item()
    except ValueError:  # a transformation that cannot evaluate (compile, vmap)
        return
    if bad:
        largest = mx.where(mx.isnan(log_g), -mx.inf, log_g).max().item()
        found = "NaN" if mx.isnan(log_g).any().item() else f"a largest value of {largest:g}"
        raise ValueError(f"log_g must be <= 0 (a gate in [0, 1]; -inf resets the state), got "
                         f"{found}")


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
