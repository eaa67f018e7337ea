"""The PowerRetention layer: notebook defaults, training, its cache, and bad arguments."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from power_retention import PowerRetention, expanded_dim
from power_retention.convolution import ShortConvolution
from power_retention.layer import INITIAL_GATE
from tests.helpers import FP32_TOLERANCE, STATE_FORM_DEG4_TOLERANCE, assert_close, relative_error


def test_notebook_default():
    layer = PowerRetention(dim=32)
    y = layer(mx.random.normal((1, 16, 32)))
    assert y.shape == (1, 16, 32) and y.dtype == mx.float32
    assert np.isfinite(np.array(y)).all()
    assert (layer.deg, layer.num_heads, layer.num_kv_heads, layer.head_dim) == (2, 1, 1, 32)
    assert layer.expanded_dim == expanded_dim(32, 2) == 528
    # S and z of one kv head, and the convolution's last 3 inputs of q, k and v
    assert layer.state_size == 528 * 32 + 528 + 3 * 3 * 32


def test_default_heads_are_at_most_64_wide():
    layer = PowerRetention(dim=256, num_kv_heads=2)
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (4, 2, 64)
    assert layer.state_size == 2 * 2080 * 65 + 3 * (4 + 2 * 2) * 64


def test_trains_with_value_and_grad():
    """A few Adam steps on a fixed regression target reduce the loss; every parameter,
    the gate included, gets a finite nonzero gradient."""
    mx.random.seed(1)
    layer = PowerRetention(dim=32, num_heads=4, num_kv_heads=2)
    x, target = mx.random.normal((2, 24, 32)), mx.random.normal((2, 24, 32))

    def loss_fn(model):
        return ((model(x) - target) ** 2).mean()

    loss_and_grad = nn.value_and_grad(layer, loss_fn)
    loss0, grads = loss_and_grad(layer)
    for name, grad in tree_flatten(grads):
        grad = np.array(grad)
        assert np.isfinite(grad).all(), name
        assert np.abs(grad).max() > 0, f"{name} gets no gradient"
    optimizer = optim.Adam(learning_rate=1e-2)
    for _ in range(20):
        loss, grads = loss_and_grad(layer)
        optimizer.update(layer, grads)
        mx.eval(layer.parameters(), optimizer.state)
    assert loss.item() < 0.9 * loss0.item()


@pytest.mark.parametrize("prefill", [1, 7, 16, 33], ids=lambda n: f"prefill{n}")
@pytest.mark.parametrize("conv_size,rope", [(0, False), (4, False), (4, True)],
                         ids=["conv0", "conv4", "conv4-rope"])
@pytest.mark.parametrize("deg,gating", [(1, True), (2, True), (2, False), (4, True)],
                         ids=["deg1", "deg2", "deg2-ungated", "deg4"])
def test_cache_continues_the_sequence(deg, gating, conv_size, rope, prefill):
    """Prefill (chunked, crossing chunk boundaries) then single-token steps equals one call;
    with the short convolution, its last inputs travel in the cache; with rotary embeddings,
    every piece is rotated from its offset in the sequence."""
    layer = PowerRetention(dim=24, num_heads=4, num_kv_heads=2, head_dim=6, deg=deg,
                           gating=gating, chunk_size=8, conv_size=conv_size, rope=rope)
    x = mx.random.normal((2, 40, 24))
    whole = layer(x)
    cache = layer.make_cache()
    pieces = [layer(x[:, :prefill], cache=cache)]
    pieces += [layer(x[:, t:t + 1], cache=cache) for t in range(prefill, 40)]
    tolerance = STATE_FORM_DEG4_TOLERANCE if deg == 4 else FP32_TOLERANCE
    assert_close("y", mx.concatenate(pieces, axis=1), whole, tolerance)
    D = expanded_dim(6, deg)
    conv = (2, conv_size - 1, (4 + 2 * 2) * 6) if conv_size else None
    slots = cache.state[0]
    assert [None if a is None else a.shape for a in slots[:3]] == [(2, 2, D, 6), (2, 2, D), conv]
    assert slots[3] == (40 if rope else None)  # the position, which only rotary embeddings need
    assert cache.nbytes == 4 * 2 * layer.state_size


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
def test_short_convolution_against_numpy(kernel_size):
    """Each channel: silu of its last kernel_size inputs weighted (zeros before the start);
    fed in two pieces with the tail between them, the same."""
    conv = ShortConvolution(channels=5, kernel_size=kernel_size)
    x = mx.random.normal((2, 11, 5))
    y, tail = conv(x)
    xs, w = np.array(x, dtype=np.float64), np.array(conv.weight, dtype=np.float64)
    padded = np.concatenate([np.zeros((2, kernel_size - 1, 5)), xs], axis=1)
    pre = sum(padded[:, i:i + 11] * w[:, i] for i in range(kernel_size))
    assert_close("y", y, pre / (1 + np.exp(-pre)), FP32_TOLERANCE)
    assert tail.shape == (2, kernel_size - 1, 5)
    assert np.array_equal(np.array(tail), np.array(x)[:, 11 - tail.shape[1]:])
    first, tail = conv(x[:, :4])
    second, _ = conv(x[:, 4:], tail)
    assert_close("in two pieces", mx.concatenate([first, second], axis=1), y, FP32_TOLERANCE)


@pytest.mark.parametrize("gate_init", [None, 0.5, 0.999], ids=lambda g: f"gate{g or '-default'}")
def test_gate_starts_at_gate_init(gate_init):
    options = {} if gate_init is None else {"gate_init": gate_init}
    layer = PowerRetention(dim=16, num_heads=2, **options)
    gate = mx.exp(nn.log_sigmoid(layer.gate_proj(mx.random.normal((2, 5, 16)))))
    assert np.allclose(np.array(gate), gate_init or INITIAL_GATE, rtol=0, atol=1e-6)


def test_without_output_norm_or_convolution():
    layer = PowerRetention(dim=16, num_heads=2, conv_size=0, output_norm=False)
    names = {name for name, _ in tree_flatten(layer.parameters())}
    assert not any(name.startswith(("conv", "norm_weight")) for name in names)
    assert layer(mx.random.normal((1, 6, 16))).shape == (1, 6, 16)


@pytest.mark.parametrize("deg,normalize,expected", [(2, None, False), (4, None, False),
                                                    (1, None, True), (2, False, True)],
                         ids=["deg2", "deg4", "deg1", "deg2-unnormalized"])
def test_output_norm_defaults_to_the_unnormalized_form_only(deg, normalize, expected):
    assert PowerRetention(dim=16, deg=deg, normalize=normalize).output_norm is expected


def test_cache_state_round_trips():
    layer = PowerRetention(dim=16, num_heads=2)
    x = mx.random.normal((1, 10, 16))
    cache = layer.make_cache()
    assert cache.empty()
    layer(x[:, :9], cache=cache)
    copy = type(cache).from_state(cache.state)
    assert_close("continued", layer(x[:, 9:], cache=copy), layer(x[:, 9:], cache=cache), 0.0)


def test_rope_makes_weights_depend_on_distance_only():
    """With rotary embeddings and no convolution or gate, the same two tokens give the same
    output wherever they sit in the sequence (their weight depends on their distance); without
    them, only the tokens matter."""
    layer = PowerRetention(dim=8, num_heads=1, gating=False, conv_size=0, rope=True)
    a, b = mx.random.normal((1, 1, 8)), mx.random.normal((1, 1, 8))
    filler = mx.zeros((1, 5, 8))  # zero keys and values: no weight, nothing to average
    near = layer(mx.concatenate([a, b], axis=1))[:, -1]
    shifted = layer(mx.concatenate([filler, a, b], axis=1))[:, -1]
    apart = layer(mx.concatenate([a, filler, b], axis=1))[:, -1]
    assert_close("shifted", shifted, near, FP32_TOLERANCE)
    assert relative_error(apart, near) > 1e-3
