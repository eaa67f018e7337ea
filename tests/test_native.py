"""The compiled exp, sigmoid, SiLU, logsumexp and cross-entropy (power_retention.native) against
float64 and against MLX's own, their gradients, compile, vmap and streams, and the fallbacks; the
chunked form's compiled products and their vjps against its MLX ops in float64."""

import shutil
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from power_retention import native
from tests.helpers import FP32_TOLERANCE, assert_close, make_inputs, run_python

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


# The chunked form's state products at degree 2, against the MLX ops path in float64: sums of
# up to D' = 2112 products per entry, so fp32 rounding relative to the result's norm.
def _chunk_states(k, v1, layout):
    return layout.weigh(v1.swapaxes(-1, -2) @ layout.features(k))


def _read_states(q, entering, layout):
    return layout.features(q) @ entering.swapaxes(-1, -2)


@pytest.mark.parametrize("items,m,d,E", [(5, 256, 64, 65), (3, 33, 7, 4), (2, 1, 2, 3)],
                         ids=["items5-M256-d64-E65", "items3-M33-d7-E4", "items2-M1-d2-E3"])
def test_state_products_and_their_vjps_match_float64(items, m, d, E):
    """Five items of 256 rows at d = 64 span several blocks of shifts (the last one partial) and
    both threads; odd d has no doubled shift; d = 2 and one row are the smallest case."""
    from power_retention.sympow import StateLayout

    layout = StateLayout.for_degree(2, d, mx.float64)
    D = (d // 2 + 1) * d
    x, v1 = _random((items, m, d), 1.0, seed=1), _random((items, m, E), 1.0, seed=2)
    states, d_reads = _random((items, E, D), 1.0, seed=3), _random((items, m, E), 1.0, seed=4)
    wide = [a.astype(mx.float64) for a in (x, v1, states, d_reads)]
    with mx.stream(mx.cpu):
        for compiled, reference, primals, wide_primals, cotangent in [
                (native.rolled_chunk_states, _chunk_states, (x, v1), wide[:2], wide[2]),
                (native.rolled_read_states, _read_states, (x, states), (wide[0], wide[2]), wide[3])]:
            out, grads = mx.vjp(compiled, list(primals), [cotangent.astype(mx.float32)])
            expected, expected_grads = mx.vjp(lambda *a: reference(*a, layout), list(wide_primals), [cotangent])
            for name, a, b in zip(["output", "first input's vjp", "second input's vjp"],
                                  [*out, *grads], [*expected, *expected_grads]):
                assert a.dtype == mx.float32
                assert_close(f"{compiled.__name__} {name}", a, b, FP32_TOLERANCE)


def test_op_gradients_through_the_compiled_products_match_float64():
    """The chunked op in float32 (compiled products) against float64 (MLX's ops), four query
    heads on two key heads, gated, continuing a state, over three chunks and a partial one."""
    from power_retention import power_retention

    inputs = make_inputs(B=1, T=200, Hq=4, H=2, d=64, e=16, seed=1)
    wide = [x.astype(mx.float64) for x in inputs]
    _, state = power_retention(*[x[:, :30] for x in wide], method="chunked", chunk_size=64, return_state=True)
    cotangent = _random((1, 200, 4, 16), 1.0, seed=5)

    def loss(q, k, v, log_g, state):
        y = power_retention(q, k, v, log_g, method="chunked", chunk_size=64, initial_state=state)
        return (y * cotangent.astype(y.dtype)).sum()

    narrow_state = type(state)(*(x.astype(mx.float32) for x in state))
    grads = mx.grad(loss, argnums=(0, 1, 2, 3))(*inputs, narrow_state)
    expected = mx.grad(loss, argnums=(0, 1, 2, 3))(*wide, state)
    for name, a, b in zip("q k v log_g".split(), grads, expected):
        assert_close(f"d loss / d {name}", a, b, FP32_TOLERANCE)


def test_state_products_leave_the_blas_thread_count_as_it_was():
    from power_retention.cpu_tuning import blas_threads

    before = blas_threads()
    mx.eval(native.rolled_read_states(_random((4, 64, 16)), _random((4, 3, 9 * 16))))
    assert blas_threads() == before


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("deg,G", [(1, 1), (2, 2), (3, 1), (5, 1)], ids=["deg1-G1", "deg2-G2", "deg3-G1", "deg5-G1"])
def test_intra_chunk_and_its_vjp_match_float64(deg, G, gated):
    """Three items of a 150-position chunk (rows in blocks of 64: two whole, one partial), a reset
    gate (log_g = -inf) in the second item."""
    from power_retention import chunk

    items, c, d, E = 3, 150, 8, 6
    q, k = _random((items, 1, 1, G, c, d), 0.5, seed=1), _random((items, 1, 1, 1, c, d), 0.5, seed=2)
    v1 = _random((items, 1, 1, 1, c, E), 1.0, seed=3)
    log_g = -mx.random.uniform(shape=(items, 1, 1, 1, c), key=mx.random.key(4)) if gated else None
    if gated:
        log_g[1, ..., 97] = -mx.inf
    primals = [x for x in (q, k, v1, log_g) if x is not None]
    cotangent = _random((items, 1, 1, G, c, E), 1.0, seed=5)

    def compiled(q, k, v1, *log_g):
        return native.intra_chunk(q, k[:, :, :, 0], v1[:, :, :, 0], log_g[0][:, :, :, 0] if log_g else None, deg)

    def reference(q, k, v1, *log_g):
        return chunk._intra_chunk_function(deg, gated)(q, k, v1, *log_g)[0]

    out, grads = mx.vjp(compiled, primals, [cotangent])
    expected, expected_grads = mx.vjp(reference, [x.astype(mx.float64) for x in primals],
                                      [cotangent.astype(mx.float64)])
    for name, a, b in zip(["output", "dq", "dk", "dv1", "d_log_g"], [*out, *grads], [*expected, *expected_grads]):
        assert_close(f"intra_chunk {name}", a, b, FP32_TOLERANCE)


def test_intra_chunk_keeps_a_non_finite_value_from_earlier_rows():
    q, k, v1 = _random((2, 1, 5, 4), seed=1), _random((2, 5, 4), seed=2), _random((2, 5, 3), seed=3)
    v1[0, 2, 1] = mx.inf
    out = np.asarray(native.intra_chunk(q, k, v1, None, 2))
    assert np.isfinite(out[0, 0, :2]).all() and np.isnan(out[0, 0, 2:]).all() and np.isfinite(out[1]).all()


def _check_attention_against_float64(q, k, v, log_g, deg, normalize, cotangent):
    """native.attention and its vjp against chunk.py's MLX ops (one chunk spanning the sequence)
    in float64, output and every input's cotangent (evaluated here, under the caller's threads)."""
    from power_retention import chunk

    primals = [x for x in (q, k, v, log_g) if x is not None]

    def compiled(q, k, v, *log_g):
        return native.attention(q, k, v, log_g[0] if log_g else None, deg, normalize)

    def reference(q, k, v, *log_g):
        return chunk.chunk_power_retention(q, k, v, log_g[0] if log_g else None, deg=deg, normalize=normalize,
                                           chunk_size=q.shape[1])[0]

    out, grads = mx.vjp(compiled, primals, [cotangent])
    mx.eval(out, grads)
    expected, expected_grads = mx.vjp(reference, [x.astype(mx.float64) for x in primals],
                                      [cotangent.astype(mx.float64)])
    for name, a, b in zip(["output", "dq", "dk", "dv", "d_log_g"], [*out, *grads], [*expected, *expected_grads]):
        assert_close(f"attention {name}", a, b, FP32_TOLERANCE)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("deg,G,normalize", [(1, 1, False), (2, 2, True), (2, 1, False), (3, 2, False), (4, 1, True)],
                         ids=["deg1-G1-raw", "deg2-G2-normalized", "deg2-G1-raw", "deg3-G2-raw", "deg4-G1-normalized"])
def test_attention_in_the_ops_layout_and_its_vjp_match_float64(deg, G, normalize, gated):
    """The whole attention form in (B, T, H, d) against chunk.py's MLX ops in float64: two batches
    of two key/value heads (their rows interleaved in memory), 150 positions (rows in blocks of
    64: two whole, one partial), a reset gate (log_g = -inf) in one head."""
    B, T, H, d, e = 2, 150, 2, 8, 6
    q, k = _random((B, T, H * G, d), 0.5, seed=1), _random((B, T, H, d), 0.5, seed=2)
    v = _random((B, T, H, e), 1.0, seed=3)
    log_g = -mx.random.uniform(shape=(B, T, H), key=mx.random.key(4)) if gated else None
    if gated:
        log_g[1, 97, 0] = -mx.inf
    _check_attention_against_float64(q, k, v, log_g, deg, normalize, _random((B, T, H * G, e), 1.0, seed=5))


@pytest.mark.parametrize("threads,H", [(2, 1), (3, 1), (4, 1), (2, 3)], ids=["threads2-H1", "threads3-H1", "threads4-H1",
                                                                        "threads2-H3"])
def test_attention_split_into_row_ranges_matches_float64(threads, H):
    """Items that do not fill the threads evenly (B * H of them) are split into row ranges of equal
    work, a range whole row blocks (at 4 threads over 150 positions one range is empty); the
    output and its vjp still match the MLX ops in float64, and an inf value at position 100 still
    makes exactly the rows from 100 on NaN, in every range that holds them."""
    from power_retention.cpu_tuning import blas_threads, set_blas_threads

    if blas_threads() is None or not native.available():
        pytest.skip("needs OpenBLAS and the compiled products")
    B, T, G, d, e = 1, 150, 2, 8, 6
    q, k = _random((B, T, H * G, d), 0.5, seed=1), _random((B, T, H, d), 0.5, seed=2)
    v = _random((B, T, H, e), 1.0, seed=3)
    log_g = -mx.random.uniform(shape=(B, T, H), key=mx.random.key(4))
    log_g[0, 97, 0] = -mx.inf
    inf_at_100 = mx.zeros(v.shape)
    inf_at_100[0, 100, 0, 1] = mx.inf
    before = blas_threads()
    set_blas_threads(threads)
    try:
        _check_attention_against_float64(q, k, v, log_g, 2, True, _random((B, T, H * G, e), 1.0, seed=5))
        y = np.asarray(native.attention(q, k, v + inf_at_100, log_g, 2, True))
    finally:
        set_blas_threads(before)
    assert np.isnan(y[0, 100:, :G]).all() and np.isfinite(y[0, :100]).all() and np.isfinite(y[0, :, G:]).all()


def test_attention_keeps_a_non_finite_value_and_a_zero_query_to_their_rows():
    """An inf in one head's value at position 2 makes that head's rows from 2 on NaN, and no other
    head's (their rows lie between its rows); a zero query row gets y = 0 and no NaN gradient."""
    q, k, v = _random((1, 5, 4, 4), seed=1), _random((1, 5, 2, 4), seed=2), _random((1, 5, 2, 3), seed=3)
    v[0, 2, 1, 1] = mx.inf
    y = np.asarray(native.attention(q, k, v, None, 2, True))
    assert np.isnan(y[0, 2:, 2:]).all() and np.isfinite(y[0, :2]).all() and np.isfinite(y[0, :, :2]).all()
    q[0, 3, 0] = 0.0
    v[0, 2, 1, 1] = 1.0
    y, dq = mx.value_and_grad(lambda q: native.attention(q, k, v, None, 2, True).sum())(q)
    assert np.asarray(native.attention(q, k, v, None, 2, True))[0, 3, 0].tolist() == [0.0, 0.0, 0.0]
    assert np.isfinite(np.asarray(dq)).all()


@pytest.mark.parametrize("method,chunk_size", [("attention", None), ("chunked", 8)], ids=["attention", "chunked8"])
def test_vmap_goes_through_the_compiled_products(method, chunk_size):
    """mx.vmap of the op, and of its gradient, over every compiled product (at chunks of 8 over
    40 positions: the in-chunk product, both state products and the scan), equals the op called
    once per mapped index; so does mapping one input alone along another axis."""
    from power_retention import power_retention

    q, k, v = (_random((3, 2, 40, 2, 8), 0.5, seed=seed) for seed in (1, 2, 3))
    log_g = -mx.random.uniform(shape=(3, 2, 40, 2), key=mx.random.key(4))

    def op(q, k, v, log_g):
        return power_retention(q, k, v, log_g, method=method, chunk_size=chunk_size)

    gradient = mx.grad(lambda *args: op(*args).sum(), argnums=(0, 1, 2, 3))
    assert_close("vmap output", mx.vmap(op)(q, k, v, log_g),
                 mx.stack([op(q[i], k[i], v[i], log_g[i]) for i in range(3)]), FP32_TOLERANCE)
    looped = [gradient(q[i], k[i], v[i], log_g[i]) for i in range(3)]
    for name, mapped, *each in zip(["dq", "dk", "dv", "d_log_g"], mx.vmap(gradient)(q, k, v, log_g), *looped):
        assert_close(f"vmap {name}", mapped, mx.stack(each), FP32_TOLERANCE)
    keys_mapped = mx.vmap(op, in_axes=(None, 2, None, None), out_axes=1)(q[0], k.transpose(1, 2, 0, 3, 4), v[0],
                                                                         log_g[0])
    assert_close("vmap over k alone", keys_mapped, mx.stack([op(q[0], k[i], v[0], log_g[0]) for i in range(3)], axis=1),
                 FP32_TOLERANCE)


@pytest.mark.parametrize("with_final_cotangent", [True, False], ids=["final-read", "final-unread"])
def test_states_entering_chunks_and_its_vjp_match_float64(with_final_cotangent):
    """Four chunks, two heads of 5 x 1000 state entries (slices of 4096 per thread: one whole,
    one partial), decays in (0, 1) and one reset (0)."""
    from power_retention import chunk

    contributions, initial = _random((4, 1, 2, 5, 1000), 1.0, seed=1), _random((1, 2, 5, 1000), 1.0, seed=2)
    decay = mx.random.uniform(shape=(4, 1, 2, 1, 1), key=mx.random.key(3))
    decay[2, 0, 1] = 0.0
    d_entering = _random((4, 1, 2, 5, 1000), 1.0, seed=4)
    d_final = _random((1, 2, 5, 1000), 1.0, seed=5)

    def loss(scan, *primals):
        entering, final = scan(*primals)
        return (entering * d_entering.astype(entering.dtype)).sum() + \
            ((final * d_final.astype(final.dtype)).sum() if with_final_cotangent else 0.0)

    primals = [contributions, decay, initial]
    outputs = native.states_entering_chunks(*primals)
    grads = mx.grad(lambda *p: loss(native.states_entering_chunks, *p), argnums=(0, 1, 2))(*primals)
    wide = [x.astype(mx.float64) for x in primals]
    expected = chunk._stacked_states_entering_chunks(*wide)
    expected_grads = mx.grad(lambda *p: loss(chunk._stacked_states_entering_chunks, *p), argnums=(0, 1, 2))(*wide)
    for name, a, b in zip(["entering", "final", "d_contributions", "d_decay", "d_initial"],
                          [*outputs, *grads], [*expected, *expected_grads]):
        assert_close(f"states_entering_chunks {name}", a, b, FP32_TOLERANCE)


def test_compiled_products_refuse_mismatched_shapes_by_name():
    module = native._module()
    k, q = _random((2, 5, 4)), _random((2, 5, 4))
    with pytest.raises(ValueError, match="v1: leading axes or rows differ"):
        module.rolled_chunk_states(k, _random((2, 6, 3)))
    entering = _random((2, 3, 12))
    with pytest.raises(ValueError, match="d_reads: expected the reads' shape"):
        module.rolled_read_states_vjp(q, entering, _random((2, 5, 4)))
    with pytest.raises(ValueError, match="d_states: expected v1's last axis"):
        module.rolled_chunk_states_vjp(k, _random((2, 5, 3)), _random((2, 4, 12)))
    with pytest.raises(ValueError, match="k: expected no empty axis"):
        module.rolled_chunk_states(_random((2, 0, 4)), _random((2, 0, 3)))
    q, k, v = _random((1, 6, 4, 8)), _random((1, 6, 2, 8)), _random((1, 6, 2, 5))
    with pytest.raises(ValueError, match="k: expected \\(B, T, H, d\\) with q's B, T and d"):
        module.attention(q, _random((1, 7, 2, 8)), v, None, 2, True)
    with pytest.raises(ValueError, match="v: expected \\(B, T, H, e\\) with k's B, T and H"):
        module.attention(q, k, _random((1, 6, 3, 5)), None, 2, True)
    with pytest.raises(ValueError, match="log_g: expected \\(B, T, H\\)"):
        module.attention(q, k, v, _random((1, 6, 4)), 2, True)
    y, sums = module.attention(q, k, v, None, 2, True)
    with pytest.raises(ValueError, match="sums: expected \\(B, T, Hq\\)"):
        module.attention_vjp(q, k, v, None, 2, True, y, sums[..., :2], y)
