"""The symmetric power embedding phi, with (q . k)^p == phi(q) . phi(k).

phi lists one feature per multiset {a1 <= ... <= ap} of the d input indices,
sqrt(p! / prod(m_i!)) * x_a1 * ... * x_ap, where m_i counts repeats of an index. That is
D = C(d + p - 1, p) features instead of the d^p of the full tensor power.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Callable, NamedTuple

import mlx.core as mx
import numpy as np

from .autodiff import custom_function
from .validation import check_degree, check_integer

_SQRT2 = math.sqrt(2.0)


def expanded_dim(d: int, deg: int) -> int:
    """Number of symmetric power features D = C(d + deg - 1, deg) of a d-vector."""
    deg = check_degree(deg)
    check_integer("d", d)
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


def _rolled_rows(x: mx.array, rows: int) -> mx.array:
    """Strided view (..., rows, d) of the last axis: entry [r, i] is x[(i + r) mod d]."""
    d = x.shape[-1]
    wrapped = mx.contiguous(mx.concatenate([x, x[..., :rows - 1]], axis=-1))
    strides = [1]
    for size in reversed(wrapped.shape[1:]):
        strides.insert(0, strides[0] * size)
    return mx.as_strided(wrapped, (*x.shape[:-1], rows, d), (*strides[:-1], 1, 1))


@lru_cache(maxsize=16)
def _skew_matrix(d: int, dtype) -> mx.array:
    """(rows * d, d) 0/1 matrix sending entry (r, i) to column (i + r) mod d."""
    rows = d // 2 + 1
    flat = np.arange(rows * d)
    matrix = np.zeros((rows * d, d), dtype=np.float64)
    matrix[flat, (flat % d + flat // d) % d] = 1.0
    return mx.array(matrix, dtype=dtype)


def _rolled_products_forward(x: mx.array) -> mx.array:
    """Every product x_i x_(i + r) mod d for r = 0 .. d // 2 and all i, unweighted: the degree-2
    features of the chunked form, (..., d) -> (..., (d // 2 + 1) * d), row r after row r - 1.

    Each unordered pair {i, j} appears once, except (even d) the pairs of row d / 2, which appear
    twice (as i and as i + d / 2). With the weights of ``_rolled_weights`` on one side (see
    ``StateLayout``), rolled_products(q) . (w * rolled_products(k)) == (q . k)^2. One strided product computes
    them (no gather, no concatenation), so the cotangent arrives in rows as well.
    """
    rows = x.shape[-1] // 2 + 1
    products = mx.expand_dims(x, -2) * _rolled_rows(x, rows)
    return products.reshape(*x.shape[:-1], rows * x.shape[-1])


def _rolled_products_vjp(x, cotangent, output):
    # A one-argument custom function gets its primal and returns its gradient unwrapped.
    d = x.shape[-1]
    rows = d // 2 + 1
    g = cotangent.reshape(*x.shape[:-1], rows, d)
    # x_i as the left factor of x_i x_(i+r): a product with the same rolled rows, summed.
    grad = (g * _rolled_rows(x, rows)).sum(axis=-2)
    # x_(i+r) as the right factor: row r of g * x, shifted forward by r and summed over rows.
    # That skewed sum is a fixed 0/1 linear map, so one matmul does it (a roll per row costs
    # about 3x more, a strided view of all rows 4x).
    left = (g * mx.expand_dims(x, -2)).reshape(cotangent.shape)
    return grad + left @ _skew_matrix(d, x.dtype)


rolled_products = custom_function(_rolled_products_forward, _rolled_products_vjp)


@lru_cache(maxsize=16)
def _rolled_weights(d: int, dtype) -> mx.array:
    """(D',) weights w with rolled_products(q) . (w * rolled_products(k)) == (q . k)^2: 1 for the
    squares and for the doubled row d / 2, 2 for every other pair."""
    rows = d // 2 + 1
    weights = np.full((rows, d), 2.0)
    weights[0] = 1.0
    if d % 2 == 0:
        weights[-1] = 1.0
    return mx.array(weights.reshape(-1), dtype=dtype)


@lru_cache(maxsize=16)
def _public_scale(d: int, dtype) -> mx.array:
    """(D,) factors turning the first D rolled products into sympow's weighted features."""
    scale = np.full(expanded_dim(d, 2), _SQRT2)
    scale[:d] = 1.0
    return mx.array(scale, dtype=dtype)


class StateLayout(NamedTuple):
    """How the chunked form lays out its state's feature axis (the last): the features it
    computes, the weights it applies to each chunk's contribution, and the conversions from and
    to sympow's layout, which RetentionState uses. Degree 2 uses rolled_products (one strided
    product instead of sympow's concatenated pieces); other degrees use sympow itself."""

    features: Callable[[mx.array], mx.array]
    weigh: Callable[[mx.array], mx.array]
    from_sympow: Callable[[mx.array], mx.array]
    to_sympow: Callable[[mx.array], mx.array]

    @staticmethod
    def for_degree(deg: int, d: int, dtype) -> StateLayout:
        if deg != 2:
            return StateLayout(lambda x: sympow(x, deg), _same, _same, _same)
        D = expanded_dim(d, 2)
        weights = _rolled_weights(d, dtype)
        # A state's rows in sympow's layout over the same rows in the rolled one (first D).
        to_public = _public_scale(d, dtype) / weights[:D]

        def from_sympow(state):
            rolled = state / to_public
            # Even d: the second half of row d / 2 repeats its first half.
            return rolled if d % 2 else mx.concatenate([rolled, rolled[..., D - d // 2:]], axis=-1)

        return StateLayout(rolled_products, lambda state: state * weights, from_sympow,
                           lambda state: state[..., :D] * to_public)


def _same(x):
    return x


def _sympow2(x: mx.array) -> mx.array:
    """Degree-2 features on the last axis: the rolled products, weighted, first D of them.

    Order: the squares x_i^2, then for each shift r = 1 .. (d - 1) // 2 the products
    sqrt(2) x_i x_{(i + r) mod d} for every i, then (even d) sqrt(2) x_i x_{i + d/2} for
    i < d/2. Every unordered pair {i, j} appears exactly once.
    """
    d = x.shape[-1]
    return rolled_products(x)[..., :expanded_dim(d, 2)] * _public_scale(d, x.dtype)


def sympow(x: mx.array, deg: int, axis: int = -1) -> mx.array:
    """Symmetric power features along ``axis`` (the last by default): d entries become D,
    in x's dtype."""
    deg = check_degree(deg)
    if not isinstance(x, mx.array):
        raise ValueError(f"x must be an mlx array, got {type(x).__name__}")
    if not mx.issubdtype(x.dtype, mx.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must name an axis of x (ndim {x.ndim}), got {axis}")
    if deg == 1:
        return x
    if axis % x.ndim != x.ndim - 1:
        return mx.moveaxis(sympow(mx.moveaxis(x, axis, -1), deg), -1, axis)
    if deg == 2:
        return _sympow2(x)
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
