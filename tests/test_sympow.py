import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from power_retention import expanded_dim, sympow
from power_retention.sympow import StateLayout, rolled_products
from tests.helpers import assert_close


@pytest.mark.parametrize("deg", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("d", [1, 2, 3, 16, 64])
def test_expanded_dim_is_binomial(d, deg):
    assert expanded_dim(d, deg) == math.comb(d + deg - 1, deg)


def test_expanded_dim_spec_values():
    assert (expanded_dim(64, 2), expanded_dim(16, 2), expanded_dim(256, 2)) == (2080, 136, 32896)


@pytest.mark.parametrize("deg", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [1, 2, 3, 16, 64])
def test_sympow_shape(d, deg):
    x = mx.random.normal((2, 3, d)) if deg < 4 or d < 64 else mx.random.normal((1, d))
    assert sympow(x, deg).shape == (*x.shape[:-1], expanded_dim(d, deg))


@settings(max_examples=25, deadline=None)
@given(deg=st.integers(1, 4), d=st.sampled_from([1, 2, 3, 16, 64]), seed=st.integers(0, 2**31 - 1),
       magnitude=st.floats(1e-2, 1e2))
def test_sympow_dot_is_power_of_dot(deg, d, seed, magnitude):
    rng = np.random.default_rng(seed)
    q64, k64 = rng.standard_normal((2, 3, d)) * magnitude
    q, k = mx.array(q64, dtype=mx.float64), mx.array(k64, dtype=mx.float64)
    features_dot = (sympow(q, deg) * sympow(k, deg)).sum(axis=-1)
    exact = (q64 * k64).sum(axis=-1) ** deg
    # Compare against the scale of the terms (|q| |k|)^deg, since q . k itself may cancel.
    term_scale = (np.linalg.norm(q64, axis=-1) * np.linalg.norm(k64, axis=-1)) ** deg
    error = np.abs(np.asarray(features_dot) - exact) / term_scale
    assert error.max() <= 1e-12


@pytest.mark.parametrize("deg", [1, 2, 3, 4])
def test_sympow_norm_identity(deg):
    x = mx.random.normal((5, 7)).astype(mx.float64)
    assert_close("phi(x).phi(x)", (sympow(x, deg) ** 2).sum(-1),
                 (x * x).sum(-1) ** deg, 1e-12)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_sympow_keeps_dtype(dtype):
    assert sympow(mx.ones((2, 4), dtype=dtype), 2).dtype == dtype


@pytest.mark.parametrize("bad_deg", [0, -1, 2.0, "2", True])
def test_sympow_rejects_bad_degree(bad_deg):
    with pytest.raises(ValueError, match="deg must be an integer >= 1"):
        sympow(mx.ones((2, 4)), bad_deg)


def test_sympow_rejects_integer_input():
    with pytest.raises(ValueError, match="floating-point"):
        sympow(mx.ones((2, 4), dtype=mx.int32), 2)


@pytest.mark.parametrize("deg", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [1, 2, 5, 8])
def test_sympow_along_second_to_last_axis_is_the_transpose(d, deg):
    x = mx.random.normal((3, d, 7))
    assert_close("sympow(axis=-2)", sympow(x, deg, axis=-2),
                 sympow(x.swapaxes(-1, -2), deg).swapaxes(-1, -2), 0.0)


def _central_differences(loss, x):
    """Central differences with a unit step: exact up to float64 rounding for a quadratic."""
    flat = np.array(x).reshape(-1)
    differences = np.empty_like(flat)
    for i in range(flat.size):
        step = np.zeros_like(flat)
        step[i] = 1.0
        plus, minus = (loss(mx.array((flat + s).reshape(x.shape), dtype=mx.float64)).item()
                       for s in (step, -step))
        differences[i] = (plus - minus) / 2
    return differences.reshape(x.shape)


@pytest.mark.parametrize("axis", [-1, -2, 0])
@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 64])
def test_sympow_gradient_matches_central_differences(d, axis):
    # sum(phi(x) * w) is quadratic in x at degree 2: an independent check of the hand-written vjp.
    x = mx.random.normal((d, 3, 2) if axis == 0 else (3, d, 2) if axis == -2 else (2, 3, d))
    x = x.astype(mx.float64)
    weights = mx.random.normal(sympow(x, 2, axis=axis).shape).astype(mx.float64)

    def loss(x):
        return (sympow(x, 2, axis=axis) * weights).sum()

    assert_close(f"d sympow / dx (axis {axis})", mx.grad(loss)(x), _central_differences(loss, x),
                 1e-12)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 64])
def test_rolled_products_gradient_matches_central_differences(d):
    # Every output weighted, the duplicated half row of even d included (sympow drops it).
    x = mx.random.normal((2, 3, d)).astype(mx.float64)
    weights = mx.random.normal(rolled_products(x).shape).astype(mx.float64)

    def loss(x):
        return (rolled_products(x) * weights).sum()

    assert_close("d rolled_products / dx", mx.grad(loss)(x), _central_differences(loss, x), 1e-12)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 64])
def test_rolled_products_weighted_dot_is_square_of_dot(d):
    q, k = (mx.random.normal((4, d)).astype(mx.float64) for _ in range(2))
    layout = StateLayout.for_degree(2, d, mx.float64)
    assert rolled_products(q).shape == (4, d * (d // 2 + 1))
    assert_close("phi(q) . w phi(k)", (rolled_products(q) * layout.weigh(rolled_products(k))).sum(-1),
                 ((q * k).sum(-1)) ** 2, 1e-12)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 64])
def test_rolled_state_layout_converts_sympow_states_both_ways(d):
    # A state summed from keys in the rolled layout reads like the sympow state it converts to,
    # and converting a sympow state in and out returns it unchanged.
    k, v, q = (mx.random.normal(shape).astype(mx.float64) for shape in ((9, d), (9, 3), (5, d)))
    layout = StateLayout.for_degree(2, d, mx.float64)
    rolled = layout.weigh((v.T @ rolled_products(k)))
    public = v.T @ sympow(k, 2)
    assert_close("to_sympow", layout.to_sympow(rolled), public, 1e-12)
    assert_close("from_sympow", layout.from_sympow(public), rolled, 1e-12)
    assert_close("reads", rolled_products(q) @ layout.from_sympow(public).T, sympow(q, 2) @ public.T,
                 1e-12)
