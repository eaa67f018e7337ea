"""Metal kernels against the MLX path, through the op with ``use_metal=True``: on real Metal
where there is one, and on the CPU emulator (which compiles kernels with g++) in every thread
order."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

os.environ.setdefault("POWER_RETENTION_EMULATOR_CACHE",
                      os.path.join(tempfile.gettempdir(), "power-retention-emulator-tests"))
from metal_kernels import emulator, launch  # noqa: E402
from metal_kernels.sources import header, kernel_body  # noqa: E402
from power_retention import PowerRetention, RetentionState, expanded_dim, sympow  # noqa: E402
from power_retention import power_retention, power_retention_step  # noqa: E402
from tests.helpers import (FP32_TOLERANCE, STATE_FORM_DEG4_TOLERANCE, assert_close,  # noqa: E402
                           run_python)

HAS_METAL = mx.metal.is_available()
BACKENDS = ([("emulator", order) for order in ("forward", "reverse", "random")]
            if shutil.which("g++") else []) + ([("metal", None)] if HAS_METAL else [])
if not BACKENDS:
    pytest.skip("neither Metal nor g++ (the emulator compiles kernels with it)",
                allow_module_level=True)

# Half-precision outputs are rounded once from an fp32 result; two fp32 results a rounding
# apart can land on neighbouring half values, so the bound is one ulp of the output's top
# binade relative to max|y|: 2^-10 (fp16), 2^-7 (bf16).
OUTPUT_ROUNDING = {mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}


def _on_backend(name, order=None):
    previous, device = launch.backend(), mx.default_device()
    launch.set_backend(name, **({"order": order} if order else {}))
    if name == "metal":
        mx.set_default_device(mx.gpu)
    yield SimpleNamespace(decode_step=partial(power_retention_step, use_metal=True),
                          power_retention=partial(power_retention, use_metal=True))
    mx.set_default_device(device)
    launch.set_backend(previous)


@pytest.fixture(params=BACKENDS, ids=[order or name for name, order in BACKENDS])
def kernels(request):
    """The op with use_metal=True on each backend here: the emulator in each thread order, Metal."""
    yield from _on_backend(*request.param)


@pytest.fixture
def on_kernels():
    """The op with use_metal=True on Metal where there is one, else on the emulator."""
    yield from _on_backend(*BACKENDS[-1])


def random_step_inputs(B, Hq, H, d, e, deg, dtype=mx.float32, seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    q, k, v = normal(B, Hq, d).astype(dtype), normal(B, H, d).astype(dtype), normal(B, H, e).astype(dtype)
    log_g = mx.array(-0.3 * rng.random((B, H)).astype(np.float32))
    # A non-negative z is what even degrees produce; random S is any reachable numerator.
    D = expanded_dim(d, deg)
    state = RetentionState(normal(B, H, D, e), mx.abs(normal(B, H, D)))
    return q, k, v, log_g, state


DEGREES = [(1, False), (2, True), (2, False), (3, False), (4, True)]
# (B, Hq, H, d, e): one of everything, grouped queries, odd widths, a width of 33 values.
SHAPES = [(1, 1, 1, 1, 1), (2, 4, 2, 8, 8), (1, 3, 1, 7, 5), (2, 2, 2, 16, 33), (1, 2, 1, 5, 3)]


def degree_id(deg, normalize):
    return f"deg{deg}" + ("" if normalize else "-unnormalized")


# Degree 4 at d = 16 has 3876 features per head: slow in the emulator, and d <= 8 covers it.
DECODE_CASES = [pytest.param(deg, normalize, B, Hq, H, d, e,
                             id=f"B{B}-Hq{Hq}-H{H}-d{d}-e{e}-{degree_id(deg, normalize)}")
                for deg, normalize in DEGREES for B, Hq, H, d, e in SHAPES if deg < 4 or d <= 8]


@pytest.mark.parametrize("deg,normalize,B,Hq,H,d,e", DECODE_CASES)
def test_decode_step_matches_mlx_path(kernels, B, Hq, H, d, e, deg, normalize):
    q, k, v, log_g, state = random_step_inputs(B, Hq, H, d, e, deg, seed=d * 100 + e)
    expected_y, expected = power_retention_step(q, k, v, log_g, state, deg=deg, normalize=normalize)
    y, new_state = kernels.decode_step(q, k, v, log_g, state, deg=deg, normalize=normalize)
    tolerance = STATE_FORM_DEG4_TOLERANCE if deg >= 3 else FP32_TOLERANCE
    assert_close("y", y, expected_y, tolerance)
    assert_close("S", new_state.S, expected.S, FP32_TOLERANCE)
    assert_close("z", new_state.z, expected.z, FP32_TOLERANCE)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("deg", [2, 4], ids=["deg2", "deg4"])
def test_half_precision_inputs_match_mlx_path(on_kernels, dtype, deg):
    """The kernel reads half-precision q, k, v into fp32, keeps the fp32 state and rounds y
    once, as the MLX path does: the two differ by that final rounding at most."""
    q, k, v, log_g, state = random_step_inputs(2, 4, 2, 8, 16, deg, dtype=dtype, seed=3)
    expected_y, expected = power_retention_step(q, k, v, log_g, state, deg=deg)
    y, new_state = on_kernels.decode_step(q, k, v, log_g, state, deg=deg)
    assert y.dtype == dtype
    assert_close("y", y, expected_y, OUTPUT_ROUNDING[dtype], norm="max")
    assert_close("S", new_state.S, expected.S, FP32_TOLERANCE)
    assert_close("z", new_state.z, expected.z, FP32_TOLERANCE)


# Every feature of x, reached by seek(p) (thread p) and by advancing from feature 0 (thread 0).
CURSOR_BODY = """
uint p = thread_position_in_grid.x;
FeatureCursor<DEG, DIM> jumped;
jumped.seek(int(p));
sought[p] = jumped.value(x);
if (p == 0) {
    FeatureCursor<DEG, DIM> walked;
    for (int i = 0; i < FEATURES; ++i) {
        if (i > 0) {
            walked.advance();
        }
        stepped[i] = walked.value(x);
    }
}
"""


@pytest.mark.parametrize("backend", BACKENDS[:1] + BACKENDS[-1:] if HAS_METAL else BACKENDS[:1],
                         ids=lambda backend: backend[0])
@pytest.mark.parametrize("deg", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("d", [1, 2, 5, 8, 9])
def test_feature_cursor_visits_sympow_features_in_order(backend, deg, d):
    """sympow.h's cursor against power_retention.sympow: the order and weights the kernels
    rely on, for odd and even widths and every degree form (closed form, unranking)."""
    if backend[0] == "metal":
        factory, device = mx.fast.metal_kernel, mx.gpu
    else:
        factory, device = emulator.metal_kernel, mx.cpu
    kernel = factory(name="feature_cursor", input_names=["x"], output_names=["sought", "stepped"],
                     source=CURSOR_BODY, header=header("sympow"))
    x = mx.random.normal((d,))
    D = expanded_dim(d, deg)
    with mx.stream(device):
        sought, stepped = kernel(inputs=[x], template=[("DEG", deg), ("DIM", d), ("FEATURES", D)],
                                 grid=(D, 1, 1), threadgroup=(min(D, 64), 1, 1),
                                 output_shapes=[(D,), (D,)], output_dtypes=[mx.float32] * 2)
    expected = sympow(x, deg)
    assert_close("seek", sought, expected, FP32_TOLERANCE)
    assert_close("advance", stepped, expected, FP32_TOLERANCE)


def test_first_token_returns_its_value(on_kernels):
    """y = (w v) / w for the token's own weight w, however small w is: one rounding of a
    product and one of a quotient, at most an ulp from v."""
    q, k, v, _, _ = random_step_inputs(1, 2, 2, 8, 8, 2, seed=1)
    y, _ = on_kernels.decode_step(q * 1e-3, k, v, None, None)
    assert_close("y", y, v, 2.0**-22, norm="max")


def test_tokens_in_sequence_match_the_mlx_path(on_kernels):
    """Eight steps from an empty state, each feeding the kernel its own previous state."""
    rng = np.random.default_rng(2)
    B, Hq, H, d, T = 1, 2, 1, 8, 8
    q, k, v = (mx.array(rng.standard_normal((B, T, h, d)).astype(np.float32)) for h in (Hq, H, H))
    log_g = mx.array(-0.1 * rng.random((B, T, H)).astype(np.float32))
    kernel_state = mlx_state = None
    for t in range(T):
        args = (q[:, t], k[:, t], v[:, t], log_g[:, t])
        y, kernel_state = on_kernels.decode_step(*args, kernel_state)
        expected, mlx_state = power_retention_step(*args, mlx_state)
        assert_close(f"y at step {t}", y, expected, FP32_TOLERANCE)
    assert_close("final S", kernel_state.S, mlx_state.S, FP32_TOLERANCE)


def test_gradients_through_the_kernel_are_the_mlx_paths(on_kernels):
    q, k, v, log_g, state = random_step_inputs(1, 4, 2, 8, 8, 2, seed=4)

    def loss(step):
        def value(q, k, v, log_g, S, z):
            y, new = step(q, k, v, log_g, RetentionState(S, z))
            return (y * y).sum() + (0.1 * new.S).sum() + new.z.sum()
        return mx.grad(value, argnums=tuple(range(6)))

    expected = loss(power_retention_step)(q, k, v, log_g, *state)
    actual = loss(on_kernels.decode_step)(q, k, v, log_g, *state)
    for name, a, b in zip(["q", "k", "v", "log_g", "S", "z"], actual, expected):
        assert_close(f"d{name}", a, b, FP32_TOLERANCE)


# (deg, normalize), (B, T, Hq, H, d, e), chunk size, with an initial state: chunk lengths
# 1 to 160 with a padded last chunk; several feature tiles (d = 16: 136 features, in tiles of
# 64, or of 51 for 160-long chunks); query blocks of 16 split over 4 threads (e = 3) and
# partial (40 queries); grouped queries.
PREFILL = [
    ((2, True), (2, 20, 4, 2, 8, 8), 8, False),
    ((2, True), (1, 70, 2, 1, 16, 33), 40, True),
    ((2, False), (1, 23, 3, 1, 7, 5), 5, True),
    ((2, True), (1, 45, 2, 1, 6, 3), 20, True),
    ((2, True), (1, 170, 1, 1, 16, 4), 160, False),
    ((1, False), (1, 6, 2, 2, 6, 3), 1, True),
    ((3, False), (1, 10, 1, 1, 4, 4), 3, False),
    ((4, True), (1, 19, 2, 1, 5, 4), 4, True),
]


def prefill_id(degree, shape, chunk_size, with_state):
    B, T, Hq, H, d, e = shape
    return (f"{degree_id(*degree)}-B{B}-T{T}-Hq{Hq}-H{H}-d{d}-e{e}-c{chunk_size}"
            + ("-state" if with_state else ""))


def prefill_inputs(B, T, Hq, H, d, e, deg, normalize, with_state, seed=6):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    q, k, v = normal(B, T, Hq, d), normal(B, T, H, d), normal(B, T, H, e)
    log_g = mx.array(-0.1 * rng.random((B, T, H)).astype(np.float32))
    state = None
    if with_state:
        _, state = power_retention(normal(B, 9, Hq, d), normal(B, 9, H, d), normal(B, 9, H, e),
                                   deg=deg, normalize=normalize, return_state=True)
    return q, k, v, log_g, state


@pytest.mark.parametrize("degree,shape,chunk_size,with_state", PREFILL,
                         ids=[prefill_id(*case) for case in PREFILL])
def test_prefill_matches_mlx_path(kernels, degree, shape, chunk_size, with_state):
    deg, normalize = degree
    q, k, v, log_g, state = prefill_inputs(*shape, deg, normalize, with_state)
    options = dict(deg=deg, normalize=normalize, method="chunked", chunk_size=chunk_size,
                   initial_state=state, return_state=True)
    expected_y, expected = power_retention(q, k, v, log_g, **options)
    y, final = kernels.power_retention(q, k, v, log_g, **options)
    tolerance = STATE_FORM_DEG4_TOLERANCE if deg >= 3 else FP32_TOLERANCE
    assert_close("y", y, expected_y, tolerance)
    assert_close("S", final.S, expected.S, FP32_TOLERANCE)
    assert_close("z", final.z, expected.z, FP32_TOLERANCE)


@pytest.mark.parametrize("case", [PREFILL[1], PREFILL[-1]],
                         ids=[prefill_id(*PREFILL[1]), prefill_id(*PREFILL[-1])])
def test_prefill_gradients_are_the_mlx_paths(on_kernels, case):
    (deg, normalize), shape, chunk_size, with_state = case
    q, k, v, log_g, state = prefill_inputs(*shape, deg, normalize, with_state)

    def gradients(run):
        def loss(q, k, v, log_g):
            y = run(q, k, v, log_g, deg=deg, normalize=normalize, method="chunked",
                    chunk_size=chunk_size, initial_state=state)
            return (y * y).sum()
        return mx.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, log_g)

    tolerance = STATE_FORM_DEG4_TOLERANCE if deg >= 3 else FP32_TOLERANCE
    for name, actual, expected in zip("q k v log_g".split(), gradients(on_kernels.power_retention),
                                      gradients(power_retention)):
        assert_close(f"d{name}", actual, expected, tolerance)


def test_layer_runs_on_the_kernels(on_kernels):
    """PowerRetention(use_metal=True): a whole sequence and a prefill on the prefill
    kernels, then one-token steps on the decode kernel."""
    mx.random.seed(5)
    plain = PowerRetention(32, num_heads=4, num_kv_heads=2, chunk_size=4, method="chunked")
    fast = PowerRetention(32, num_heads=4, num_kv_heads=2, chunk_size=4, method="chunked",
                          use_metal=True)
    fast.update(plain.parameters())
    x = mx.random.normal((2, 10, 32))
    assert_close("sequence", fast(x), plain(x), FP32_TOLERANCE)
    plain_cache, fast_cache = plain.make_cache(), fast.make_cache()
    assert_close("prefill", fast(x[:, :7], fast_cache), plain(x[:, :7], plain_cache),
                 FP32_TOLERANCE)
    for t in range(7, 10):
        assert_close(f"token {t}", fast(x[:, t:t + 1], fast_cache),
                     plain(x[:, t:t + 1], plain_cache), FP32_TOLERANCE)


def test_without_kernels_the_dispatch_is_the_mlx_path():
    previous = launch.backend()
    launch.set_backend(None)
    try:
        q, k, v, log_g, state = random_step_inputs(1, 2, 1, 8, 8, 2)
        expected = power_retention_step(q, k, v, log_g, state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # that the kernels are off
            actual = power_retention_step(q, k, v, log_g, state, use_metal=True)
    finally:
        launch.set_backend(previous)
    assert_close("y", actual[0], expected[0], 0.0)


def test_inputs_the_kernel_cannot_take_go_to_the_mlx_path(on_kernels):
    """The kernel reads q, k and v in one dtype: mixed dtypes run on the MLX path (exactly its
    result), as do float64 inputs and value widths above the threadgroup cap."""
    wide = launch.MAX_THREADS_PER_THREADGROUP + 1
    cases = {"mixed": random_step_inputs(1, 2, 1, 4, 4, 2), "float64": None,
             f"e{wide}": random_step_inputs(1, 2, 1, 4, wide, 2)}
    q, k, v, log_g, state = cases["mixed"]
    cases["mixed"] = (q, k.astype(mx.float16), v, log_g, state)
    cases["float64"] = (*(x.astype(mx.float64) for x in (q, k, v)), log_g,
                        RetentionState(*(x.astype(mx.float64) for x in state)))
    for name, inputs in cases.items():
        with mx.stream(mx.cpu):  # float64 exists on the CPU only
            assert_close(name, on_kernels.decode_step(*inputs)[0],
                         power_retention_step(*inputs)[0], 0.0)


@pytest.mark.skipif(not HAS_METAL, reason="needs Metal")
def test_metal_with_the_cpu_as_default_device_runs_the_mlx_path():
    """A Mac whose MLX default device is the CPU keeps the op on the CPU, off the kernels."""
    previous, device = launch.backend(), mx.default_device()
    launch.set_backend("metal")
    mx.set_default_device(mx.cpu)
    try:
        q, k, v, log_g, state = random_step_inputs(1, 2, 1, 8, 8, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            actual = power_retention_step(q, k, v, log_g, state, use_metal=True)
        expected = power_retention_step(q, k, v, log_g, state)
    finally:
        mx.set_default_device(device)
        launch.set_backend(previous)
    assert_close("y", actual[0], expected[0], 0.0)


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        launch.set_backend("cuda")
    if not mx.metal.is_available():
        with pytest.raises(ValueError, match="needs a Mac with Metal"):
            launch.set_backend("metal")


@pytest.mark.skipif(not shutil.which("g++"), reason="the emulator compiles kernels with g++")
@pytest.mark.parametrize("limit", [launch.MAX_THREADGROUP_BYTES, 36_000], ids=["32-KiB", "raised-to-36000"])
def test_the_prefill_guard_keeps_threadgroup_memory_within_apple_gpus(limit, monkeypatch):
    """Chunks of 129 keys: under the dispatch's 32 KiB cap the chunk_states kernel takes 63
    features a tile (32,508 bytes) and matches the MLX path; a cap raised to 36,000 bytes (a
    regression in the guard) gives 64 (33,024 bytes), which the emulator refuses as a Mac would."""
    from power_retention.kernels import StateKernels, _chunk_states_mlx

    monkeypatch.setattr(launch, "MAX_THREADGROUP_BYTES", limit)
    k, v1 = mx.random.normal((1, 1, 2, 129, 8)), mx.random.normal((1, 1, 2, 129, 5))
    with contextlib.contextmanager(_on_backend)("emulator"):
        if limit <= 32 * 1024:
            expected = _chunk_states_mlx(k.reshape(-1, 129, 8), v1.reshape(-1, 129, 5), 2)
            assert_close("chunk states", StateKernels.chunk_states(k, v1, 2)[0, 0], expected,
                         FP32_TOLERANCE)
        else:
            with pytest.raises(emulator.EmulatorError, match=r"threadgroup memory of 33024 bytes"):
                mx.eval(StateKernels.chunk_states(k, v1, 2))


def test_arrays_the_kernels_cannot_index_take_the_mlx_path():
    """The kernels index with 32-bit integers: at 2^32 elements an array goes to the MLX path.
    The arrays here are never evaluated (MLX is lazy), so nothing of that size is allocated."""
    from power_retention.kernels import StateKernels, decode_fits

    # Decode at degree 1: the state (B, H, D = d, e) of 2^16 x 1 x 256 x 256 = 2^32 floats.
    q = k = mx.zeros((2**16, 1, 256))
    assert decode_fits(q, k, mx.zeros((2**16, 1, 255)), deg=1)
    assert not decode_fits(q, k, mx.zeros((2**16, 1, 256)), deg=1)
    # Prefill at degree 2, d = 64 (D = 2080), e + 1 = 64: the chunks' states (N, D, e + 1)
    # are just under 2^32 elements at N = 32263 chunks and just over at 32264.
    for chunks, fits in ((32263, True), (32264, False)):
        keys, v1 = mx.zeros((chunks, 1, 1, 16, 64)), mx.zeros((chunks, 1, 1, 16, 64))
        states = mx.zeros((chunks, 1, 1, 2080, 64))
        assert StateKernels.chunk_states_fit(keys, v1, deg=2) is fits
        assert StateKernels.read_states_fit(mx.zeros((chunks, 1, 1, 1, 16, 64)), states) is fits


def kernel_launches(deg, dtype):
    """(kernel name, call arguments) of every kernel, as the op calls them."""
    q, k, v, log_g, state = random_step_inputs(1, 4, 2, 8, 8, deg, dtype=dtype)
    yield "decode_step", launch.decode_launch(q.astype(mx.float32), k, v, log_g, *state,
                                                deg=deg)
    if dtype == mx.float32:  # the prefill kernels take the op's fp32 compute arrays
        keys, v1, S1 = mx.zeros((6, 16, 8)), mx.zeros((6, 16, 9)), mx.zeros((3, state.S.shape[2], 9))
        yield "chunk_states", launch.chunk_states_launch(keys, v1, deg=deg,
                                                                 features=S1.shape[1])
        yield "query_states", launch.query_states_launch(keys, S1, deg=deg)


@pytest.mark.skipif(shutil.which("clang++") is None or not shutil.which("g++"),
                    reason="clang++ and the emulator's g++ needed")
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("deg", [1, 2, 4])
def test_kernels_pass_a_clang_syntax_check(deg, dtype):
    """Every kernel as the op calls it, wrapped as MLX wraps it, compiles under clang
    as well as g++ (against the Metal shim)."""
    for name, arguments in kernel_launches(deg, dtype):
        inputs, outputs, headers = launch.KERNELS[name]
        emulator.check_syntax(name, inputs, outputs, kernel_body(name), header(*headers),
                              **arguments)


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ needed")
@pytest.mark.parametrize("binding", ["device", "constant"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("deg", [1, 2, 4])
def test_kernels_pass_the_address_space_check(deg, dtype, binding):
    """Every kernel instantiation with device, constant and threadgroup memory as distinct
    pointer types (clang address spaces, as Apple's compiler has them), its array inputs bound
    as device and, as MLX binds inputs of fewer than 8 elements, as constant."""
    for name, arguments in kernel_launches(deg, dtype):
        inputs, outputs, headers = launch.KERNELS[name]
        emulator.check_syntax(name, inputs, outputs, kernel_body(name), header(*headers),
                              binding=binding, **arguments)


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ needed")
def test_the_address_space_check_catches_a_helper_taking_the_wrong_memory():
    """A helper taking `const device float*` planted in sympow.h: called on the keys, it is
    right while they are bound as device memory and wrong as constant (a small input); called
    on the kernel's threadgroup array, it is wrong either way. The emulator, which erases
    address spaces, runs all three."""
    planted = "inline float first_of(const device float* x) { return x[0]; }\n"
    inputs, outputs, headers = launch.KERNELS["chunk_states"]
    arguments = dict(kernel_launches(2, mx.float32))["chunk_states"]
    body = kernel_body("chunk_states")
    on_keys = body.replace("uint m = thread_position_in_threadgroup.x;",
                           "uint m = thread_position_in_threadgroup.x + uint(first_of(k) * 0.0f);")
    on_threadgroup = body.replace("threadgroup_barrier(mem_flags::mem_threadgroup);",
                                  "threadgroup_barrier(mem_flags::mem_threadgroup);\n"
                                  "float unused = first_of(phi);")
    run = lambda source, binding: emulator.check_syntax(  # noqa: E731
        "chunk_states", inputs, outputs, source, planted + header(*headers), binding=binding,
        **arguments)
    run(on_keys, "device")
    with pytest.raises(emulator.EmulatorError, match=r"address-space check \(constant inputs\)"):
        run(on_keys, "constant")
    for binding in ("device", "constant"):
        with pytest.raises(emulator.EmulatorError, match=r"no known conversion from 'threadgroup float"):
            run(on_threadgroup, binding)


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ needed")
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["fp16", "bf16"])
def test_the_address_space_check_covers_half_and_bfloat_inputs(dtype):
    """The same planted helper, generic in the element type, on the decode kernel's fp16 or
    bf16 keys: right as device memory, wrong as constant."""
    planted = "template <class T> inline float first_of(const device T* x) { return float(x[0]); }\n"
    inputs, outputs, headers = launch.KERNELS["decode_step"]
    arguments = dict(kernel_launches(2, dtype))["decode_step"]
    source = kernel_body("decode_step").replace(
        "k_tile[i] = float(k[bh * DIM + i]);", "k_tile[i] = float(k[bh * DIM + i]) + first_of(k) * 0.0f;")
    assert source != kernel_body("decode_step")
    run = lambda binding: emulator.check_syntax(  # noqa: E731
        "decode_step", inputs, outputs, source, planted + header(*headers), binding=binding, **arguments)
    run("device")
    with pytest.raises(emulator.EmulatorError, match=r"address-space check \(constant inputs\)"):
        run("constant")


@pytest.mark.skipif(HAS_METAL, reason="the fallback of a machine without Metal")
def test_metal_flag_without_metal_warns_once_and_falls_back():
    """In a fresh process, so that no earlier test has used the warning up."""
    code = (
        "import warnings, mlx.core as mx\n"
        "from power_retention import PowerRetention\n"
        "x = mx.random.normal((1, 8, 16))\n"
        "plain = PowerRetention(16, num_heads=2)\n"
        "fast = PowerRetention(16, num_heads=2, use_metal=True)\n"
        "fast.update(plain.parameters())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    ys = [fast(x) for _ in range(3)]\n"
        "print(len(caught), str(caught[0].message) if caught else '')\n"
        "print(float(mx.abs(ys[0] - plain(x)).max()))\n")
    count_and_message, difference = run_python(code).strip().splitlines()
    assert count_and_message.startswith("1 ") and "Metal is not available" in count_and_message
    assert float(difference) == 0.0


def test_language_model_generates_the_same_tokens_on_the_kernels(on_kernels):
    """RetentionLLM(use_metal=True): prefill and greedy decoding through the kernels pick the
    tokens the MLX path picks, with logits equal to fp32 rounding."""
    from llm import RetentionLLM, create_model_config

    config = create_model_config("ultra-tiny", chunk_size=8)
    mx.random.seed(7)
    plain = RetentionLLM(config)
    fast = RetentionLLM(config, use_metal=True)
    fast.update(plain.parameters())
    prompt = mx.random.randint(0, config.vocab_size, (1, 13))
    assert_close("logits", fast(prompt), plain(prompt), FP32_TOLERANCE)
    tokens = {}
    for name, model in (("plain", plain), ("fast", fast)):
        model.reset_states()
        tokens[name] = model.generate(prompt[0], max_new_tokens=6, temperature=0.0).tolist()
    assert tokens["fast"] == tokens["plain"]


def test_the_mac_check_compares_every_instantiation(on_kernels):
    """What ``python -m metal_kernels.check`` runs first on a Mac, here on the backend the
    other tests use (the emulator without Metal): every instantiation within its bound."""
    from metal_kernels.check import instantiations, relative_error

    rows = list(instantiations())
    assert len(rows) == 4 * 3 + 4
    for description, kernel, mlx_path, tolerance in rows:
        assert relative_error(kernel, mlx_path) <= tolerance, description


@pytest.mark.skipif(HAS_METAL, reason="what a machine without Metal says")
def test_the_mac_check_says_it_needs_metal():
    result = subprocess.run([sys.executable, "-m", "metal_kernels.check"], capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2 and "needs a Mac with Metal" in result.stdout
