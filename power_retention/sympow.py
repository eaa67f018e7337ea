"""The symmetric power embedding phi, with (q . k)^p == phi(q) . phi(k).

phi lists one feature per multiset {a1 <= ... <= ap} of the d input indices,
sqrt(p! / prod(m_i!)) * x_a1 * ... * x_ap, where m_i counts repeats of an index. That is
D = C(d + p - 1, p) features instead of the d^p of the full tensor power.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .checks import is_integer


def check_degree(deg) -> int:
    """Return ``deg`` as an int, or raise ValueError unless it is an integer >= 1."""
    if not is_integer(deg):
        raise ValueError(f"deg must be an integer >= 1, got {deg!r} ({type(deg).__name__})")
    if deg < 1:
        raise ValueError(f"deg must be an integer >= 1, got {deg}")
    return int(deg)


def expanded_dim(d: int, deg: int) -> int:
    """Number of symmetric power features D = C(d + deg - 1, deg) of a d-vector."""
    deg = check_degree(deg)
    if not is_integer(d) or d < 1:
        raise ValueError(f"d must be an integer >= 1, got {d!r}")
    return math.comb(int(d) + deg - 1, deg)


@lru_cache(maxsize=64)
def _multiset_table(d: int, deg: int) -> tuple[tuple[mx.array, ...], np.ndarray]:
    """Index columns (deg arrays of length D) and the sqrt-multinomial weight of each feature."""
    combos = np.fromiter(
        itertools.chain.from_iterable(itertools.combinations_with_replacement(range(d), deg)),
        dtype=np.int32,
    ).reshape(-1, deg)
    # Sorted tuples: the t-th member of a run of equal indices contributes a factor t to
    # prod(m_i!), so a running run length gives the product without counting.
    run = np.ones(len(combos), dtype=np.float64)
    factorial_product = np.ones(len(combos), dtype=np.float64)
    for t in range(1, deg):
        run = np.where(combos[:, t] == combos[:, t - 1], run + 1, 1.0)
        factorial_product *= run
    weights = np.sqrt(math.factorial(deg) / factorial_product)
    columns = tuple(mx.array(combos[:, t]) for t in range(deg))
    return columns, weights


_SQRT2 = math.sqrt(2.0)


def _contiguous_strides(shape) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def _slice(x, axis, start, stop):
    return x[(slice(None),) * axis + (slice(start, stop),)]


def _split_axis(shape, axis, rows, d) -> list[int]:
    """``shape`` with ``axis`` replaced by the two axes (rows, d)."""
    shape = list(shape)
    shape[axis:axis + 1] = [rows, d]
    return shape


def _rolled_rows(x, axis):
    """Overlapping strided view of [x, x[:shifts]] along ``axis``: a new axis of
    shifts = (d - 1) // 2 rows before ``axis``, row r being x rolled by r + 1."""
    d = x.shape[axis]
    shifts = (d - 1) // 2
    wrapped = mx.contiguous(mx.concatenate([x, _slice(x, axis, 0, shifts)], axis=axis))
    strides = _contiguous_strides(wrapped.shape)
    step = strides[axis]
    return mx.as_strided(wrapped, _split_axis(wrapped.shape, axis, shifts, d),
                         strides[:axis] + [step, step] + strides[axis + 1:], offset=step)


def _sympow2_forward(x, axis):
    d = x.shape[axis]
    shifts = (d - 1) // 2
    features = [x * x]
    if shifts:
        products = mx.expand_dims(x * _SQRT2, axis) * _rolled_rows(x, axis)
        merged = list(x.shape)
        merged[axis] = shifts * d
        features.append(products.reshape(merged))
    if d % 2 == 0:
        features.append(_slice(x, axis, 0, d // 2) * _SQRT2 * _slice(x, axis, d // 2, d))
    return mx.concatenate(features, axis=axis)


@lru_cache(maxsize=16)
def _skew_matrix(d: int, dtype) -> mx.array:
    """(shifts * d, d) 0/1 matrix sending entry (r, i) to column (i + r + 1) mod d."""
    shifts = (d - 1) // 2
    rows = np.arange(shifts * d)
    matrix = np.zeros((shifts * d, d), dtype=np.float64)
    matrix[rows, (rows % d + rows // d + 1) % d] = 1.0
    return mx.array(matrix).astype(dtype)


def _skewed_row_sum(left, axis):
    """sum_r left[r, (j - r - 1) mod d] for the rows axis r just before ``axis``."""
    d = left.shape[axis]
    skew = _skew_matrix(d, left.dtype)
    flat = list(left.shape)
    flat[axis - 1:axis + 1] = [flat[axis - 1] * d]
    left = left.reshape(flat)
    if axis == left.ndim:  # features on the last axis: (..., shifts * d) @ (shifts * d, d)
        return left @ skew
    return mx.moveaxis(skew.T @ mx.moveaxis(left, axis - 1, -2), -2, axis - 1)


def _sympow2_backward(x, cotangent, axis):
    """d phi / d x contracted with the cotangent, without differentiating a strided view
    (MLX's vjp of as_strided is a scatter, twenty times slower than these products)."""
    d = x.shape[axis]
    shifts = (d - 1) // 2
    grad = 2 * x * _slice(cotangent, axis, 0, d)
    if shifts:
        g = _slice(cotangent, axis, d, d + shifts * d).reshape(_split_axis(x.shape, axis, shifts, d))
        # x_i as the left factor of sqrt2 x_i x_{i+r}:
        grad = grad + _SQRT2 * (g * _rolled_rows(x, axis)).sum(axis=axis)
        # x_{i+r} as the right factor: row r of g * x, shifted forward by r + 1 and summed
        # over rows. That skewed sum is a fixed 0/1 linear map, so one matmul does it (a
        # roll per row costs about 3x more, a strided view of all rows 4x).
        left = g * mx.expand_dims(x * _SQRT2, axis)
        grad = grad + _skewed_row_sum(left, axis + 1)
    if d % 2 == 0:
        half = d // 2
        g = _slice(cotangent, axis, d + shifts * d, None) * _SQRT2
        grad = grad + mx.concatenate([g * _slice(x, axis, half, d), g * _slice(x, axis, 0, half)],
                                     axis=axis)
    return grad


@lru_cache(maxsize=8)
def _sympow2_function(axis: int):
    @mx.custom_function
    def features(x):
        return _sympow2_forward(x, axis % x.ndim)

    @features.vjp
    def features_vjp(x, cotangent, output):
        # A one-argument custom function gets its primal and returns its gradient unwrapped.
        return _sympow2_backward(x, cotangent, axis % x.ndim)

    return features


def _sympow2(x: mx.array, axis: int) -> mx.array:
    """Degree-2 features along ``axis`` (negative), from shifted views of x instead of a gather.

    Order: the squares x_i^2, then for each shift r = 1 .. (d - 1) // 2 the products
    sqrt(2) x_i x_{(i + r) mod d} for every i, then (even d) sqrt(2) x_i x_{i + d/2} for
    i < d/2. Every unordered pair {i, j} appears exactly once. (MLX's gather on the CPU costs
    about ten times the strided product used here.)
    """
    return _sympow2_function(axis - x.ndim if axis >= 0 else axis)(x)


def sympow(x: mx.array, deg: int, axis: int = -1) -> mx.array:
    """Symmetric power features along ``axis`` (the last by default): d entries become D,
    in x's dtype. Another axis (say -2: the (..., D, c) layout) is computed in place, without
    moving the large result."""
    deg = check_degree(deg)
    if not isinstance(x, mx.array):
        raise ValueError(f"x must be an mlx array, got {type(x).__name__}")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must name an axis of x (ndim {x.ndim}), got {axis}")
    if deg == 1:
        return x
    if deg == 2:
        return _sympow2(x, axis)
    if axis % x.ndim != x.ndim - 1:
        return mx.moveaxis(sympow(mx.moveaxis(x, axis, -1), deg), -1, axis)
    columns, weights = _multiset_table(x.shape[-1], deg)
    features = mx.take(x, columns[0], axis=-1)
    for column in columns[1:]:
        features = features * mx.take(x, column, axis=-1)
    return features * mx.array(weights, dtype=x.dtype)


def integer_power(x: mx.array, deg: int) -> mx.array:
    """x ** deg by repeated squaring: exact sign for odd deg, plain products for autodiff."""
    result = None
    base = x
    while deg:
        if deg & 1:
            result = base if result is None else result * base
        deg >>= 1
        if deg:
            base = base * base
    return result
