"""Metal kernels against the MLX path, run on the CPU by the emulator."""

import math
import os
import shutil
import tempfile

import mlx.core as mx
import numpy as np
import pytest

if shutil.which("g++") is None:
    pytest.skip("g++ not available (the emulator compiles kernels with it)", allow_module_level=True)

os.environ.setdefault("POWER_RETENTION_EMULATOR_CACHE",
                      os.path.join(tempfile.gettempdir(), "power-retention-emulator-tests"))
from metal_kernels.emulated import (DECODE_INPUTS, DECODE_OUTPUTS, decode_step,  # noqa: E402
                                    decode_step_template)
from metal_kernels.sources import header, kernel_body  # noqa: E402
from power_retention import RetentionState, expanded_dim  # noqa: E402
from power_retention.recurrent import recurrent_step  # noqa: E402
from tests.helpers import FP32_TOLERANCE, assert_close  # noqa: E402

ORDERS = ["forward", "reverse", "random"]


def decode_step_kernel(q, k, v, log_g, state, deg, normalize, order="forward"):
    """One decode step through the kernel, from the arrays the MLX path takes."""
    B, H, D, e = k.shape[0], k.shape[1], expanded_dim(q.shape[-1], deg), v.shape[-1]
    decay = np.ones((B, H), np.float32) if log_g is None else np.exp(np.array(log_g))
    S = np.zeros((B, H, D, e), np.float32) if state is None else np.array(state.S)
    z = np.zeros((B, H, D), np.float32) if state is None else np.array(state.z)
    y, S_out, z_out = decode_step(np.array(q), np.array(k), np.array(v), decay, S, z, deg=deg,
                                  normalize=normalize, order=order)
    return y, RetentionState(mx.array(S_out), mx.array(z_out))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("deg,normalize", [(1, False), (2, True), (2, False)],
                         ids=["deg1", "deg2", "deg2-unnormalized"])
@pytest.mark.parametrize("B,Hq,H,d,e", [(1, 1, 1, 1, 1), (2, 4, 2, 8, 8), (1, 3, 1, 7, 5),
                                        (2, 2, 2, 16, 33)],
                         ids=["d1", "gqa-d8", "odd-d7-e5", "d16-e33"])
def test_decode_step_matches_mlx_path(B, Hq, H, d, e, deg, normalize, order):
    rng = np.random.default_rng(d * 100 + e)
    q = mx.array(rng.standard_normal((B, Hq, d)).astype(np.float32))
    k = mx.array(rng.standard_normal((B, H, d)).astype(np.float32))
    v = mx.array(rng.standard_normal((B, H, e)).astype(np.float32))
    log_g = mx.array(-0.3 * rng.random((B, H)).astype(np.float32))
    D = expanded_dim(d, deg)
    state = RetentionState(mx.array(rng.standard_normal((B, H, D, e)).astype(np.float32)),
                           mx.array(np.abs(rng.standard_normal((B, H, D))).astype(np.float32)))
    # A non-negative z is what even degrees produce; random S is any reachable numerator.
    expected_y, expected_state = recurrent_step(q, k, v, log_g, state, deg=deg, normalize=normalize)
    y, new_state = decode_step_kernel(q, k, v, log_g, state, deg, normalize, order)
    assert_close("y", y, expected_y, FP32_TOLERANCE)
    assert_close("S", new_state.S, expected_state.S, FP32_TOLERANCE)
    assert_close("z", new_state.z, expected_state.z, FP32_TOLERANCE)


def test_first_token_returns_its_value_exactly():
    rng = np.random.default_rng(1)
    q, k = (mx.array(rng.standard_normal((1, 2, 8)).astype(np.float32)) for _ in range(2))
    v = mx.array(rng.standard_normal((1, 2, 8)).astype(np.float32))
    y, _ = decode_step_kernel(q, k, v, None, None, deg=2, normalize=True)
    assert np.array_equal(y, np.array(v))


def test_tokens_in_sequence_match_the_mlx_path():
    """Eight steps from an empty state, each feeding the kernel its own previous state."""
    rng = np.random.default_rng(2)
    B, Hq, H, d, e, T = 1, 2, 1, 8, 8, 8
    q = mx.array(rng.standard_normal((B, T, Hq, d)).astype(np.float32))
    k = mx.array(rng.standard_normal((B, T, H, d)).astype(np.float32))
    v = mx.array(rng.standard_normal((B, T, H, e)).astype(np.float32))
    log_g = mx.array(-0.1 * rng.random((B, T, H)).astype(np.float32))
    kernel_state = mlx_state = None
    for t in range(T):
        args = (q[:, t], k[:, t], v[:, t], log_g[:, t])
        y, kernel_state = decode_step_kernel(*args, kernel_state, deg=2, normalize=True)
        expected, mlx_state = recurrent_step(*args, mlx_state, deg=2, normalize=True)
        assert_close(f"y at step {t}", y, expected, FP32_TOLERANCE)
    assert math.isfinite(float(np.abs(np.array(kernel_state.S)).max()))


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed")
@pytest.mark.parametrize("deg", [1, 2])
def test_kernel_passes_a_clang_syntax_check(deg, tmp_path):
    """Every kernel, wrapped as MLX wraps it, compiles under clang as well as g++ (against
    the Metal shim): catches what one compiler lets through."""
    import subprocess

    from metal_kernels.emulator import _SHIM, _runner_source, generate_source

    d, e, D = 8, 8, expanded_dim(8, deg)
    names, outputs = DECODE_INPUTS, DECODE_OUTPUTS
    inputs = [np.zeros(n, np.float32) for n in (2 * d, d, e, 1, D * e, D)]
    wrapped = generate_source(
        "decode_step", names, outputs, kernel_body("decode_step"), inputs, [np.float32] * 3,
        header=header("sympow"),
        template=decode_step_template(d=d, e=e, groups=2, deg=deg, normalize=True))
    kernel_name, template_def, source, shape_infos, attributes = wrapped
    # The whole program the emulator builds, so that the template is instantiated and checked.
    path = tmp_path / "kernel.cpp"
    path.write_text(_runner_source(kernel_name, template_def, source, names, inputs, outputs,
                                   [np.float32] * 3, shape_infos, attributes, False))
    result = subprocess.run(["clang++", "-fsyntax-only", "-std=c++17", "-Wno-attributes", "-DEMU_SYNTAX_ONLY",
                             f"-I{_SHIM.parent}", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
