"""mx.grad of every form against central finite differences (float64), and across forms.

The finite differences are taken of the float64 NumPy reference, not of the MLX code: MLX's
CPU exp is only float32-accurate even on float64 (8e-8 relative), and that noise divided by
a 1e-6 step would swamp the comparison.
"""

import mlx.core as mx
import numpy as np
import pytest

from power_retention import power_retention
from tests.helpers import assert_close, make_inputs
from tests.reference import reference_power_retention

FORMS = [("attention", 8), ("chunked", 2), ("chunked", 3), ("recurrent", 8)]
FORM_IDS = ["attention", "chunked-c2", "chunked-c3", "recurrent"]
INPUT_NAMES = ("q", "k", "v", "log_g")


def _loss(method, chunk_size, deg, normalize, cotangent):
    def loss(q, k, v, log_g):
        y = power_retention(q, k, v, log_g, deg=deg, normalize=normalize, method=method,
                            chunk_size=chunk_size)
        return (y * cotangent).sum()
    return loss


def _central_differences(loss, inputs, step=1e-6):
    """Gradient of loss(*inputs) (NumPy float64 arrays) by central differences."""
    gradients = []
    for index, values in enumerate(inputs):
        gradient = np.zeros_like(values)
        for position in np.ndindex(values.shape):
            shifted = []
            for sign in (1, -1):
                args = list(inputs)
                args[index] = values.copy()
                args[index][position] += sign * step
                shifted.append(loss(*args))
            gradient[position] = (shifted[0] - shifted[1]) / (2 * step)
        gradients.append(gradient)
    return gradients


@pytest.mark.parametrize("deg,normalize", [(1, False), (2, True), (2, False), (4, True)],
                         ids=["deg1-unnormalized", "deg2", "deg2-unnormalized", "deg4"])
@pytest.mark.parametrize("method,chunk_size", FORMS, ids=FORM_IDS)
def test_gradients_match_finite_differences(method, chunk_size, deg, normalize):
    inputs = make_inputs(B=1, T=5, Hq=2, H=1, d=3, e=2, seed=deg, dtype=mx.float64)
    cotangent = mx.array(np.random.default_rng(0).standard_normal((1, 5, 2, 2)), dtype=mx.float64)
    loss = _loss(method, chunk_size, deg, normalize, cotangent)
    analytic = mx.grad(loss, argnums=(0, 1, 2, 3))(*inputs)

    def reference_loss(q, k, v, log_g):
        y = reference_power_retention(q, k, v, log_g, deg=deg, normalize=normalize)
        return float((y * np.array(cotangent)).sum())

    numeric = _central_differences(reference_loss, [np.array(x) for x in inputs])
    for name, a, n in zip(INPUT_NAMES, analytic, numeric):
        # Truncation (third derivative times h^2 ~ 1e-12) and rounding (1e-16 / h ~ 1e-10) of the differences,
        # and the 8e-8-relative exp in mx.grad's gate factors, all stay far below 1e-6.
        assert_close(f"d loss / d {name}", a, n, 1e-6)


@pytest.mark.parametrize("deg", [2, 4])
@pytest.mark.parametrize("chunk_size", [1, 16])
def test_chunked_gradients_match_attention_form(chunk_size, deg):
    inputs = make_inputs(B=2, T=50, Hq=4, H=2, d=8, e=8, seed=3)
    cotangent = mx.random.normal((2, 50, 4, 8))
    reference = mx.grad(_loss("attention", 64, deg, True, cotangent), argnums=(0, 1, 2, 3))(*inputs)
    chunked = mx.grad(_loss("chunked", chunk_size, deg, True, cotangent), argnums=(0, 1, 2, 3))(*inputs)
    for name, c, r in zip(INPUT_NAMES, chunked, reference):
        assert_close(f"d loss / d {name}", c, r, 1e-4)


def test_gradient_through_state_passing():
    q, k, v, log_g = make_inputs(T=30, seed=5)

    def whole(k):
        return power_retention(q, k, v, log_g, method="chunked", chunk_size=8).sum()

    def split(k):
        first, state = power_retention(q[:, :13], k[:, :13], v[:, :13], log_g[:, :13],
                                       method="chunked", chunk_size=8, return_state=True)
        second = power_retention(q[:, 13:], k[:, 13:], v[:, 13:], log_g[:, 13:],
                                 method="chunked", chunk_size=8, initial_state=state)
        return first.sum() + second.sum()

    assert_close("d loss / d k", mx.grad(split)(k), mx.grad(whole)(k), 1e-5)


@pytest.mark.parametrize("method,chunk_size", FORMS, ids=FORM_IDS)
def test_gradients_stay_finite_when_a_weight_sum_is_tiny(method, chunk_size):
    """Degree 4, the first query nearly orthogonal to the first key: its weight sum is 1e-24,
    whose square underflows float32 (autodiff through y = num / den used den^2 and gave NaN
    for every input). Every gradient is finite, and matches float64 except at the first
    position, where rounding is amplified by |q| |k| / (q . k) = 1e6 (an ill-conditioned
    weight, not an error of the method)."""
    q, k, v, log_g = (np.array(x, dtype=np.float64) for x in make_inputs(B=1, T=6, Hq=1, H=1, d=4, e=3))
    q[0, 0, 0], k[0, 0, 0] = [1.0, 0, 0, 0], [1e-6, 1.0, -0.5, 0.25]
    cotangent = np.random.default_rng(1).standard_normal((1, 6, 1, 3))
    gradients = {}
    for dtype in (mx.float32, mx.float64):
        loss = _loss(method, chunk_size, 4, True, mx.array(cotangent, dtype=dtype))
        gradients[dtype] = mx.grad(loss, argnums=(0, 1, 2, 3))(
            *(mx.array(x, dtype=dtype) for x in (q, k, v, log_g)))
    for name, single, double in zip(INPUT_NAMES, gradients[mx.float32], gradients[mx.float64]):
        assert np.isfinite(np.array(single)).all(), f"d loss / d {name} is not finite"
        later = slice(1, None) if name in ("q", "k") else slice(None)
        assert_close(f"d loss / d {name}", single[:, later], double[:, later], 1e-4)
