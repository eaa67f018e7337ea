"""Metal kernels against the MLX path: the dispatch code runs them through the CPU emulator."""

import os
import shutil
import subprocess
import sys
import tempfile

import mlx.core as mx
import numpy as np
import pytest

if shutil.which("g++") is None:
    pytest.skip("g++ not available (the emulator compiles kernels with it)", allow_module_level=True)

os.environ.setdefault("POWER_RETENTION_EMULATOR_CACHE",
                      os.path.join(tempfile.gettempdir(), "power-retention-emulator-tests"))
from metal_kernels import dispatch, emulator  # noqa: E402
from metal_kernels.sources import header, kernel_body  # noqa: E402
from power_retention import PowerRetention, RetentionState, expanded_dim  # noqa: E402
from power_retention import power_retention_step  # noqa: E402
from tests.helpers import FP32_TOLERANCE, STATE_FORM_DEG4_TOLERANCE, assert_close  # noqa: E402

# Half-precision outputs are rounded once from the fp32 result: half an ulp of the output.
OUTPUT_ROUNDING = {mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}


@pytest.fixture(params=["forward", "reverse", "random"])
def kernels(request):
    """The dispatch with its kernels on the emulator, threads run in the given order."""
    previous = dispatch.backend()
    dispatch.set_backend("emulator", order=request.param)
    yield dispatch
    dispatch.set_backend(previous)


@pytest.fixture
def emulated():
    previous = dispatch.backend()
    dispatch.set_backend("emulator")
    yield dispatch
    dispatch.set_backend(previous)


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


DEGREES = {"deg1": (1, False), "deg2": (2, True), "deg2-unnormalized": (2, False),
           "deg3": (3, False), "deg4": (4, True)}
SHAPES = {"d1-e1": (1, 1, 1, 1, 1), "gqa-d8-e8": (2, 4, 2, 8, 8), "odd-d7-e5": (1, 3, 1, 7, 5),
          "d16-e33": (2, 2, 2, 16, 33), "d5-e3": (1, 2, 1, 5, 3)}
# Degree 4 at d = 16 has 3876 features per head: slow in the emulator, and d <= 8 covers it.
DECODE_CASES = [pytest.param(*degree, *shape, id=f"{shape_id}-{degree_id}")
                for degree_id, degree in DEGREES.items() for shape_id, shape in SHAPES.items()
                if degree[0] < 4 or shape[3] <= 8]


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
def test_half_precision_inputs_match_mlx_path(emulated, dtype, deg):
    """The kernel reads half-precision q, k, v into fp32, keeps the fp32 state and rounds y
    once: the same arithmetic as the MLX path, so the two differ by that rounding at most."""
    q, k, v, log_g, state = random_step_inputs(2, 4, 2, 8, 16, deg, dtype=dtype, seed=3)
    expected_y, expected = power_retention_step(q, k, v, log_g, state, deg=deg)
    y, new_state = emulated.decode_step(q, k, v, log_g, state, deg=deg)
    assert y.dtype == dtype
    assert_close("y", y, expected_y, OUTPUT_ROUNDING[dtype], norm="max")
    assert_close("S", new_state.S, expected.S, FP32_TOLERANCE)
    assert_close("z", new_state.z, expected.z, FP32_TOLERANCE)


def test_first_token_returns_its_value(emulated):
    """y = (w v) / w for the token's own weight w, however small w is: one rounding of a
    product and one of a quotient, at most an ulp from v."""
    q, k, v, _, _ = random_step_inputs(1, 2, 2, 8, 8, 2, seed=1)
    y, _ = emulated.decode_step(q * 1e-3, k, v, None, None)
    assert_close("y", y, v, 2.0**-22, norm="max")


def test_tokens_in_sequence_match_the_mlx_path(emulated):
    """Eight steps from an empty state, each feeding the kernel its own previous state."""
    rng = np.random.default_rng(2)
    B, Hq, H, d, e, T = 1, 2, 1, 8, 8, 8
    q, k, v = (mx.array(rng.standard_normal((B, T, h, d)).astype(np.float32)) for h in (Hq, H, H))
    log_g = mx.array(-0.1 * rng.random((B, T, H)).astype(np.float32))
    kernel_state = mlx_state = None
    for t in range(T):
        args = (q[:, t], k[:, t], v[:, t], log_g[:, t])
        y, kernel_state = emulated.decode_step(*args, kernel_state)
        expected, mlx_state = power_retention_step(*args, mlx_state)
        assert_close(f"y at step {t}", y, expected, FP32_TOLERANCE)
    assert_close("final S", kernel_state.S, mlx_state.S, FP32_TOLERANCE)


def test_gradients_through_the_kernel_are_the_mlx_paths(emulated):
    q, k, v, log_g, state = random_step_inputs(1, 4, 2, 8, 8, 2, seed=4)

    def loss(step):
        def value(q, k, v, log_g, S, z):
            y, new = step(q, k, v, log_g, RetentionState(S, z))
            return (y * y).sum() + (0.1 * new.S).sum() + new.z.sum()
        return mx.grad(value, argnums=tuple(range(6)))

    expected = loss(power_retention_step)(q, k, v, log_g, *state)
    actual = loss(emulated.decode_step)(q, k, v, log_g, *state)
    for name, a, b in zip(["q", "k", "v", "log_g", "S", "z"], actual, expected):
        assert_close(f"d{name}", a, b, FP32_TOLERANCE)


def test_layer_decodes_through_the_kernel(emulated):
    """PowerRetention(use_metal_kernels=True): a prefill, then one-token steps on the kernel."""
    mx.random.seed(5)
    plain = PowerRetention(32, num_heads=4, num_kv_heads=2)
    fast = PowerRetention(32, num_heads=4, num_kv_heads=2, use_metal_kernels=True)
    fast.update(plain.parameters())
    x = mx.random.normal((2, 7, 32))
    plain_cache, fast_cache = plain.make_cache(), fast.make_cache()
    assert_close("prefill", fast(x[:, :4], fast_cache), plain(x[:, :4], plain_cache), 0.0)
    for t in range(4, 7):
        assert_close(f"token {t}", fast(x[:, t:t + 1], fast_cache),
                     plain(x[:, t:t + 1], plain_cache), FP32_TOLERANCE)


def test_without_kernels_the_dispatch_is_the_mlx_path():
    previous = dispatch.backend()
    dispatch.set_backend(None)
    try:
        q, k, v, log_g, state = random_step_inputs(1, 2, 1, 8, 8, 2)
        expected = power_retention_step(q, k, v, log_g, state)
        actual = dispatch.decode_step(q, k, v, log_g, state)
    finally:
        dispatch.set_backend(previous)
    assert_close("y", actual[0], expected[0], 0.0)


def test_inputs_the_kernel_cannot_take_go_to_the_mlx_path(emulated):
    """float64 has no Metal type: the step runs on the MLX path (exactly its result)."""
    q, k, v, log_g, state = random_step_inputs(1, 2, 1, 4, 4, 2)
    q, k, v = (x.astype(mx.float64) for x in (q, k, v))
    state = RetentionState(*(s.astype(mx.float64) for s in state))
    assert_close("y", emulated.decode_step(q, k, v, log_g, state)[0],
                 power_retention_step(q, k, v, log_g, state)[0], 0.0)


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.set_backend("cuda")
    if not mx.metal.is_available():
        with pytest.raises(ValueError, match="needs a Mac with Metal"):
            dispatch.set_backend("metal")


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed")
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("deg", [1, 2, 4])
def test_decode_kernel_passes_a_clang_syntax_check(deg, dtype):
    """The kernel as the dispatch calls it, wrapped as MLX wraps it, compiles under clang as
    well as g++ (against the Metal shim)."""
    q, k, v, log_g, state = random_step_inputs(1, 4, 2, 8, 8, deg, dtype=dtype)
    launch = dispatch.decode_launch(q.astype(mx.float32), k, v, log_g, *state, deg=deg,
                                    normalize=deg % 2 == 0)
    inputs, outputs, headers = dispatch.KERNELS["decode_step"]
    emulator.check_syntax("decode_step", inputs, outputs, kernel_body("decode_step"),
                          header(*headers), **launch)


def test_metal_flag_without_metal_warns_once_and_falls_back():
    """In a fresh process, so that no earlier test has used the warning up."""
    code = (
        "import warnings, mlx.core as mx\n"
        "from power_retention import PowerRetention\n"
        "x = mx.random.normal((1, 8, 16))\n"
        "plain = PowerRetention(16, num_heads=2)\n"
        "fast = PowerRetention(16, num_heads=2, use_metal_kernels=True)\n"
        "fast.update(plain.parameters())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    ys = [fast(x) for _ in range(3)]\n"
        "print(len(caught), str(caught[0].message) if caught else '')\n"
        "print(float(mx.abs(ys[0] - plain(x)).max()))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    count_and_message, difference = result.stdout.strip().splitlines()
    if mx.metal.is_available():
        assert count_and_message.strip() == "0"
    else:
        assert count_and_message.startswith("1 ") and "Metal is not available" in count_and_message
    assert float(difference) == 0.0
