"""The compiled exp, sigmoid, SiLU, logsumexp and cross-entropy (power_retention.native) against
float64 and against MLX's own, their gradients, compile, vmap and streams, and the fallbacks."""

import shutil
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from power_retention import native
from tests.helpers import run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                                reason="the compiled functions are built with g++ on Linux")

# Relative error of one fp32 exp or logistic: a few ulp (2^-24 = 6e-8 each); MLX's own exp is
# off by up to 1.7e-6 here.
ELEMENTWISE_TOLERANCE = 4e-7
# logsumexp over V = 50,257 terms: the sum is kept in double, so only the final fp32 rounding of
# a value near 20 and of the log remain (MLX's own was off by 8.7e-5 on the same rows).
LOGSUMEXP_TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.available(), "the compiled functions did not build (see stderr)"


def _random(shape, scale=5.0, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


def _max_relative(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-30))


def test_exp_and_sigmoid_match_float64():
    x = _random((257, 1031))
    x64 = np.asarray(x, np.float64)
    assert _max_relative(native.exp(x), np.exp(x64)) < ELEMENTWISE_TOLERANCE
    assert _max_relative(native.sigmoid(x), 1 / (1 + np.exp(-x64))) < ELEMENTWISE_TOLERANCE


def test_exp_at_the_edges_of_float32():
    x = mx.array([-mx.inf, mx.inf, mx.nan, -200.0, 200.0, 0.0, -0.0, -87.0, 88.5, 88.72])
    y = np.asarray(native.exp(x))
    assert y[0] == 0 and y[1] == np.inf and np.isnan(y[2]) and y[3] == 0 and y[4] == np.inf
    assert y[5] == 1 and y[6] == 1
    assert _max_relative(y[7:], np.exp(np.asarray(x[7:], np.float64))) < ELEMENTWISE_TOLERANCE
    # Subnormal results: as exact as their fewer bits allow (2^-149 apart).
    tiny = mx.array([-90.0, -100.0, -103.9])
    assert np.max(np.abs(np.asarray(native.exp(tiny), np.float64) - np.exp(np.asarray(tiny, np.float64)))) <= 2**-149
    assert np.asarray(native.sigmoid(mx.array([-200.0, 200.0, -mx.inf]))).tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("V", [1, 15, 16, 17, 50257], ids=lambda V: f"V{V}")
def test_logsumexp_matches_float64(V):
    x = _random((9, V), seed=V)
    x64 = np.asarray(x, np.float64)
    top = x64.max(-1, keepdims=True)
    expected = (top + np.log(np.exp(x64 - top).sum(-1, keepdims=True)))[:, 0]
    assert _max_relative(native.logsumexp(x), expected) < LOGSUMEXP_TOLERANCE


def test_logsumexp_of_infinite_and_nan_rows():
    rows = mx.array([[-mx.inf, -mx.inf], [mx.inf, 1.0], [mx.nan, 1.0], [mx.inf, mx.nan], [-mx.inf, 0.0]])
    out = np.asarray(native.logsumexp(rows))
    assert out[0] == -np.inf and out[1] == np.inf and np.isnan(out[2]) and np.isnan(out[3])
    assert out[4] == 0.0
    # An empty row: log of an empty sum (MLX's own refuses an empty array).
    assert np.asarray(native.logsumexp(mx.zeros((3, 0)))).tolist() == [-np.inf] * 3


def test_cross_entropy_and_its_gradient_match_mlx():
    logits, targets = _random((4, 33, 1000)), mx.random.randint(0, 1000, (4, 33), key=mx.random.key(1))
    mine = native.cross_entropy(logits, targets)
    theirs = nn.losses.cross_entropy(logits, targets, reduction="none")
    assert _max_relative(mine, theirs) < LOGSUMEXP_TOLERANCE
    gradient = mx.grad(lambda x: native.cross_entropy(x, targets).sum())(logits)
    expected = mx.grad(lambda x: nn.losses.cross_entropy(x, targets).sum())(logits)
    # Entries are probabilities (minus 1 at the target): absolute error, at the logsumexp's.
    assert mx.abs(gradient - expected).max().item() < 1e-4 * 5


def test_silu_and_sigmoid_gradients_match_mlx():
    x = _random((64, 300), scale=3.0)
    for mine, theirs in ((native.silu, nn.silu), (native.sigmoid, mx.sigmoid), (native.exp, mx.exp)):
        gradient = mx.grad(lambda x: (mine(x) * x).sum())(x)
        expected = mx.grad(lambda x: (theirs(x) * x).sum())(x)
        # Against the largest entry: the SiLU's derivative crosses zero, where relative errors blow up.
        error = mx.abs(gradient - expected).max().item() / mx.abs(expected).max().item()
        assert error < 1e-6, mine.__name__


def test_jvp_and_vmap_go_through():
    x, tangent = _random((5, 40)), _random((5, 40), seed=1)
    _, (directional,) = mx.jvp(native.logsumexp, [x], [tangent])
    _, (expected,) = mx.jvp(lambda x: mx.logsumexp(x, axis=-1), [x], [tangent])
    assert _max_relative(directional, expected) < LOGSUMEXP_TOLERANCE
    mapped = mx.vmap(native.logsumexp, in_axes=1, out_axes=0)(x)  # maps the last axis
    assert _max_relative(mapped, mx.logsumexp(x.T, axis=-1)) < LOGSUMEXP_TOLERANCE
    assert _max_relative(mx.vmap(native.exp)(x), mx.exp(x)) < 2e-6


def test_compiled_and_on_another_stream():
    x = _random((8, 500))
    step = mx.compile(mx.grad(lambda x: native.logsumexp(native.silu(x)).sum()))
    expected = mx.grad(lambda x: mx.logsumexp(nn.silu(x), axis=-1).sum())(x)
    with mx.stream(mx.new_stream(mx.cpu)):
        elsewhere = step(x)
    assert _max_relative(step(x), expected) < 1e-4 and _max_relative(elsewhere, expected) < 1e-4


def test_other_dtypes_take_mlx_functions():
    x = _random((3, 7)).astype(mx.bfloat16)
    assert native.exp(x).dtype == mx.bfloat16
    assert mx.array_equal(native.logsumexp(x), mx.logsumexp(x, axis=-1))


@pytest.mark.parametrize("variable, value", [("POWER_RETENTION_NATIVE", "0"),
                                             ("POWER_RETENTION_CACHE", "/proc/no-such-directory")],
                         ids=["switched-off", "unwritable-cache"])
def test_without_the_build_everything_is_mlx_own(variable, value):
    code = (f"import os; os.environ[{variable!r}] = {value!r}\n"
            "import mlx.core as mx; from power_retention import native\n"
            "x = mx.random.normal((3, 9)); t = mx.array([0, 1, 2])\n"
            "import mlx.nn as nn\n"
            "print(native.available(), mx.array_equal(native.cross_entropy(x, t), "
            "nn.losses.cross_entropy(x, t, reduction='none')).item())")
    assert run_python(code).split() == ["False", "True"]
