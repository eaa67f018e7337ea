"""The op against the float64 reference, across forms, and its state passing and numerics."""

import mlx.core as mx
import numpy as np
import pytest

from power_retention import RetentionState, expanded_dim, power_retention, power_retention_step, sympow
from power_retention.naive import naive_power_retention, naive_recurrent_power_retention
from tests.helpers import (FP32_TOLERANCE, STATE_FORM_DEG4_TOLERANCE, assert_close, make_inputs,
                           relative_error)
from tests.reference import reference_power_retention, reference_state

# (method, chunk_size): every form, the chunked one at the chunk sizes the issue names.
FORMS = [("attention", 64), ("recurrent", 64), ("chunked", 1), ("chunked", 16), ("chunked", 64)]
FORM_IDS = [m if m != "chunked" else f"chunked-c{c}" for m, c in FORMS]
# deg 1 is plain linear attention: odd degrees are only defined unnormalized.
DEGREES = [(1, False), (2, True), (4, True)]
DEGREE_IDS = ["deg1-unnormalized", "deg2", "deg4"]


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 257], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("deg,normalize", DEGREES, ids=DEGREE_IDS)
@pytest.mark.parametrize("method,chunk_size", FORMS, ids=FORM_IDS)
def test_matches_float64_reference(method, chunk_size, deg, normalize, gated, T):
    q, k, v, log_g = make_inputs(B=2, T=T, Hq=4, H=2, d=8, e=6, gated=gated, seed=T)
    y, state = power_retention(q, k, v, log_g, deg=deg, method=method, chunk_size=chunk_size,
                               normalize=normalize, return_state=True)
    expected = reference_power_retention(q, k, v, log_g, deg=deg, normalize=normalize)
    assert y.dtype == mx.float32 and y.shape == expected.shape
    state_form = method == "recurrent" or chunk_size == 1
    assert_close("y", y, expected,
                 STATE_FORM_DEG4_TOLERANCE if state_form and deg == 4 else FP32_TOLERANCE)
    S, z = reference_state(sympow(k.astype(mx.float64), deg), v, log_g)
    assert_close("S", state.S, S, FP32_TOLERANCE)
    assert_close("z", state.z, z, FP32_TOLERANCE)


NAIVE_FORMS = {"naive": naive_power_retention, "naive-recurrent": naive_recurrent_power_retention}


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("deg,normalize", DEGREES, ids=DEGREE_IDS)
@pytest.mark.parametrize("form", NAIVE_FORMS, ids=list(NAIVE_FORMS))
def test_naive_definition_matches_float64_reference(form, deg, normalize, gated):
    """The reader's definition (``naive.py``) is the reference's math, state passing included:
    the second half of a sequence continued from the first half's final state."""
    q, k, v, log_g = make_inputs(B=2, T=40, Hq=4, H=2, d=6, e=5, gated=gated, seed=3,
                                 dtype=mx.float64)
    naive = NAIVE_FORMS[form]
    options = dict(deg=deg, normalize=normalize, return_state=True)

    def half(x, part):
        return None if x is None else x[:, :20] if part == 0 else x[:, 20:]

    with mx.stream(mx.cpu):  # float64 exists on the CPU only
        y1, state = naive(*(half(x, 0) for x in (q, k, v, log_g)), **options)
        y2, final = naive(*(half(x, 1) for x in (q, k, v, log_g)), initial_state=state, **options)
        S, z = reference_state(sympow(k, deg), v, log_g)
    expected = reference_power_retention(q, k, v, log_g, deg=deg, normalize=normalize)
    # float64 throughout, but MLX's CPU exp is float32-accurate (see below): 1e-6 covers it.
    assert_close("y", mx.concatenate([y1, y2], axis=1), expected, 1e-6)
    assert_close("S", final.S, S, 1e-6)
    assert_close("z", final.z, z, 1e-6)


# MLX's CPU exp is float32-accurate even on float64 (8e-8 relative, measured), so the gates
# limit float64 agreement to about that; without gates every operation is float64-exact.
@pytest.mark.parametrize("gated,tolerance", [(False, 1e-12), (True, 1e-6)],
                         ids=["ungated", "gated"])
@pytest.mark.parametrize("deg,normalize", DEGREES, ids=DEGREE_IDS)
@pytest.mark.parametrize("method,chunk_size", FORMS, ids=FORM_IDS)
def test_float64_agrees_to_float64_rounding(method, chunk_size, deg, normalize, gated, tolerance):
    q, k, v, log_g = make_inputs(T=65, d=6, e=4, seed=11, dtype=mx.float64, gated=gated)
    y = power_retention(q, k, v, log_g, deg=deg, normalize=normalize, method=method,
                        chunk_size=chunk_size)
    assert y.dtype == mx.float64
    assert_close("y", y, reference_power_retention(q, k, v, log_g, deg=deg, normalize=normalize),
                 tolerance)


@pytest.mark.parametrize("method,chunk_size", FORMS, ids=FORM_IDS)
def test_head_dim_64_matches_reference(method, chunk_size):
    q, k, v, log_g = make_inputs(B=1, T=130, Hq=2, H=1, d=64, e=64, seed=1, decay_strength=0.05)
    y = power_retention(q, k, v, log_g, method=method, chunk_size=chunk_size)
    assert_close("y", y, reference_power_retention(q, k, v, log_g), FP32_TOLERANCE)


@pytest.mark.parametrize("scale", [0.1, 0.5, 2.0])
def test_explicit_scale_unnormalized(scale):
    q, k, v, log_g = make_inputs(T=40, seed=3)
    y = power_retention(q, k, v, log_g, deg=2, scale=scale, normalize=False, method="chunked",
                        chunk_size=16)
    expected = reference_power_retention(q, k, v, log_g, deg=2, scale=scale, normalize=False)
    assert_close("y", y, expected, FP32_TOLERANCE)


@pytest.mark.parametrize("method,chunk_size", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("split", [1, 17, 32, 50], ids=lambda s: f"split{s}")
def test_split_and_resume_equals_one_call(method, chunk_size, split):
    q, k, v, log_g = make_inputs(T=70, seed=split)
    whole, whole_state = power_retention(q, k, v, log_g, method=method, chunk_size=chunk_size,
                                         return_state=True)
    first, state = power_retention(q[:, :split], k[:, :split], v[:, :split], log_g[:, :split],
                                   method=method, chunk_size=chunk_size, return_state=True)
    second, final_state = power_retention(q[:, split:], k[:, split:], v[:, split:],
                                          log_g[:, split:], method=method, chunk_size=chunk_size,
                                          initial_state=state, return_state=True)
    assert_close("y", mx.concatenate([first, second], axis=1), whole, FP32_TOLERANCE)
    assert_close("S", final_state.S, whole_state.S, FP32_TOLERANCE)
    assert_close("z", final_state.z, whole_state.z, FP32_TOLERANCE)


@pytest.mark.parametrize("deg,normalize", DEGREES, ids=DEGREE_IDS)
def test_token_steps_equal_one_call(deg, normalize):
    q, k, v, log_g = make_inputs(T=40, seed=4)
    whole, whole_state = power_retention(q, k, v, log_g, deg=deg, normalize=normalize,
                                         method="chunked", chunk_size=16, return_state=True)
    state, outputs = None, []
    for t in range(q.shape[1]):
        y, state = power_retention_step(q[:, t], k[:, t], v[:, t], log_g[:, t], state, deg=deg,
                                        normalize=normalize)
        outputs.append(y)
    assert isinstance(state, RetentionState)
    assert_close("y", mx.stack(outputs, axis=1), whole, FP32_TOLERANCE)
    assert_close("S", state.S, whole_state.S, FP32_TOLERANCE)


@pytest.mark.parametrize("method", ["attention", "chunked", "recurrent"])
@pytest.mark.parametrize("factor", [1e-3, 1e-1, 10.0, 1e3])
def test_invariant_to_query_scale(method, factor):
    q, k, v, log_g = make_inputs(T=80, seed=5)
    y = power_retention(q, k, v, log_g, method=method, chunk_size=16)
    scaled = power_retention(q * factor, k, v, log_g, method=method, chunk_size=16)
    assert relative_error(scaled, y) < 1e-4


@pytest.mark.parametrize("method", ["attention", "chunked", "recurrent"])
def test_zero_query_row_gives_zero(method):
    q, k, v, log_g = make_inputs(T=20, seed=6)
    q = mx.concatenate([q[:, :5], mx.zeros_like(q[:, 5:6]), q[:, 6:]], axis=1)
    y = power_retention(q, k, v, log_g, method=method, chunk_size=8)
    assert np.isfinite(np.array(y)).all()
    assert mx.abs(y[:, 5]).max().item() == 0.0


@pytest.mark.parametrize("log_g_value", [0.0, -0.01, -1.0, -80.0], ids=lambda g: f"log_g{g}")
def test_long_sequence_is_finite(log_g_value):
    T = 65536
    q, k, v, _ = make_inputs(B=1, T=T, Hq=1, H=1, d=4, e=4, seed=7)
    log_g = mx.full((1, T, 1), log_g_value)
    y, state = power_retention(q * 30, k * 30, v, log_g, method="chunked", return_state=True)
    mx.eval(y, state)
    for name, array in (("y", y), ("S", state.S), ("z", state.z)):
        assert np.isfinite(np.array(array)).all(), f"{name} is not finite"
    # The last output is a weighted average of values: it lies within their range.
    assert mx.abs(y).max().item() <= mx.abs(v).max().item() * (1 + 1e-5)


@pytest.mark.parametrize("dtype,tolerance", [(mx.bfloat16, 2e-2), (mx.float16, 5e-3)],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", ["attention", "chunked", "recurrent"])
def test_half_precision_inputs(method, dtype, tolerance):
    q, k, v, log_g = make_inputs(T=100, d=16, e=16, seed=8)
    expected = power_retention(q, k, v, log_g, method=method, chunk_size=32)
    y, state = power_retention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                               log_g.astype(dtype), method=method, chunk_size=32,
                               return_state=True)
    assert y.dtype == dtype
    assert state.S.dtype == mx.float32 and state.z.dtype == mx.float32
    assert relative_error(y, expected, norm="max") <= tolerance


def test_auto_picks_attention_for_short_and_chunked_for_long():
    from power_retention import choose_method
    shape = dict(B=1, Hq=4, H=4, d=64, e=64, deg=2, chunk_size=64)
    assert choose_method(T=64, **shape) == "attention"
    assert choose_method(T=32768, **shape) == "chunked"


def test_auto_matches_reference():
    q, k, v, log_g = make_inputs(T=300, seed=9)
    assert_close("y", power_retention(q, k, v, log_g), reference_power_retention(q, k, v, log_g),
                 FP32_TOLERANCE)


def test_state_shapes_and_dtype():
    q, k, v, log_g = make_inputs(B=3, T=10, Hq=4, H=2, d=8, e=5)
    _, state = power_retention(q, k, v, log_g, return_state=True)
    D = expanded_dim(8, 2)
    assert state.S.shape == (3, 2, D, 5) and state.z.shape == (3, 2, D)
    assert state.S.dtype == mx.float32


# The forms as the op runs them, and the definition: what resets and causality must hold for.
ALL_FORMS = FORMS + [("naive", 0), ("naive-recurrent", 0)]
ALL_FORM_IDS = FORM_IDS + ["naive", "naive-recurrent"]


def _run_form(method, chunk_size, q, k, v, log_g, **options):
    if method in NAIVE_FORMS:
        return NAIVE_FORMS[method](q, k, v, log_g, **options)
    return power_retention(q, k, v, log_g, method=method, chunk_size=chunk_size, **options)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("method,chunk_size", ALL_FORMS, ids=ALL_FORM_IDS)
def test_packed_documents_with_reset_gates_equal_documents_run_apart(method, chunk_size, gated):
    """A gate of zero (log_g = -inf) at each document's first token: a packed sequence gives
    each document's outputs, and the last document's state, as if it ran alone. Documents
    start inside chunks and on their boundaries."""
    lengths = [5, 16, 23, 1, 19]
    q, k, v, log_g = make_inputs(B=1, T=sum(lengths), Hq=4, H=2, d=8, e=6, gated=True, seed=4)
    if not gated:
        log_g = mx.zeros_like(log_g)
    starts = np.cumsum([0] + lengths[:-1])
    is_start = np.zeros(sum(lengths), dtype=bool)
    is_start[starts[1:]] = True
    packed_gates = mx.where(mx.array(is_start)[None, :, None], -mx.inf, log_g)
    y, state = _run_form(method, chunk_size, q, k, v, packed_gates, return_state=True)
    expected = []
    for start, length in zip(starts, lengths):
        piece = slice(int(start), int(start + length))
        alone, last_state = _run_form(method, chunk_size, q[:, piece], k[:, piece], v[:, piece],
                                      log_g[:, piece] if gated else None, return_state=True)
        expected.append(alone)
    tolerance = STATE_FORM_DEG4_TOLERANCE if method == "recurrent" else FP32_TOLERANCE
    assert_close("y", y, mx.concatenate(expected, axis=1), tolerance)
    assert_close("S", state.S, last_state.S, tolerance)
    assert_close("z", state.z, last_state.z, tolerance)


@pytest.mark.parametrize("method,chunk_size", FORMS, ids=FORM_IDS)
def test_reset_gates_give_finite_gradients(method, chunk_size):
    q, k, v, log_g = make_inputs(B=1, T=40, Hq=2, H=1, d=4, e=3, seed=6)
    resets = mx.where((mx.arange(40) % 13 == 7)[None, :, None], -mx.inf, log_g)

    def loss(q, k, v):
        return power_retention(q, k, v, resets, method=method, chunk_size=chunk_size).sum()

    for name, gradient in zip("qkv", mx.grad(loss, argnums=(0, 1, 2))(q, k, v)):
        assert mx.isfinite(gradient).all().item(), f"d{name} is not finite"


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("method,chunk_size", FORMS, ids=FORM_IDS)
def test_a_non_finite_value_reaches_no_earlier_position(method, chunk_size, where, value):
    """One NaN or inf at position 30 changes nothing before it, in every form."""
    q, k, v, log_g = make_inputs(B=1, T=50, Hq=4, H=2, d=8, e=6, seed=8)
    clean = power_retention(q, k, v, log_g, method=method, chunk_size=chunk_size)
    arrays = {"k": k, "v": v}
    position = mx.arange(50)[None, :, None, None] == 30
    arrays[where] = mx.where(position, value, arrays[where])
    y = power_retention(q, arrays["k"], arrays["v"], log_g, method=method, chunk_size=chunk_size)
    assert mx.array_equal(y[:, :30], clean[:, :30]).item()


def test_default_normalize_is_the_degrees_in_the_op_as_in_the_layer():
    q, k, v, log_g = make_inputs(T=20, seed=9)
    for deg, normalized in ((1, False), (2, True), (3, False), (4, True)):
        expected = power_retention(q, k, v, log_g, deg=deg, normalize=normalized)
        assert mx.array_equal(power_retention(q, k, v, log_g, deg=deg), expected).item()


def test_gates_are_not_read_inside_compile():
    """Inside mx.compile the values do not exist: log_g <= 0 is the caller's contract there."""
    q, k, v, log_g = make_inputs(T=12, seed=10)
    compiled = mx.compile(lambda q, k, v, log_g: power_retention(q, k, v, log_g))
    assert_close("y", compiled(q, k, v, log_g), power_retention(q, k, v, log_g), FP32_TOLERANCE)
