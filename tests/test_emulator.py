"""Tests for the CPU Metal-kernel emulator (real g++ compiles, cached per source)."""

import os
import shutil
import tempfile

import numpy as np
import pytest

if shutil.which("g++") is None:
    pytest.skip("g++ not available", allow_module_level=True)

os.environ.setdefault("POWER_RETENTION_EMULATOR_CACHE", os.path.join(tempfile.gettempdir(), "metal_emu_test_cache"))
from metal_kernels.emulator import EmulatorError, generate_source, run_kernel  # noqa: E402

ORDERS = ["forward", "reverse", "random"]

ADD = """
    uint i = thread_position_in_grid.x;
    if (i < n) {
        out[i] = a[i] + b[i];
    }
"""


def test_elementwise_add_partial_threadgroup():
    n = 1000  # not a multiple of the threadgroup size
    a = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    b = np.arange(n, dtype=np.float32)
    for order in ORDERS:
        (out,) = run_kernel("add", ["a", "b", "n"], ["out"], ADD, [a, b, np.uint32(n)],
                            [(n,)], [np.float32], grid=(1024, 1, 1), threadgroup=(256, 1, 1),
                            order=order)
        np.testing.assert_array_equal(out, a + b)


REDUCE = """
    threadgroup float buf[128];
    uint t = thread_position_in_threadgroup.x;
    uint g = threadgroup_position_in_grid.x;
    buf[t] = inp[g * 128 + t];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = 64; s > 0; s /= 2) {
        if (t < s) {
            buf[t] += buf[t + s];
        }
        BARRIER
    }
    if (t == 0) {
        out[g] = buf[0];
    }
"""
WITH_BARRIER = REDUCE.replace("BARRIER", "threadgroup_barrier(mem_flags::mem_threadgroup);")
NO_BARRIER = REDUCE.replace("BARRIER", "")


def _reduce(src, order):
    x = (np.arange(4 * 128) % 7).astype(np.float32)  # exact sums
    (out,) = run_kernel("tg_reduce", ["inp"], ["out"], src, [x], [(4,)], [np.float32],
                        grid=(4 * 128, 1, 1), threadgroup=(128, 1, 1), order=order)
    return out, x.reshape(4, 128).sum(1)


@pytest.mark.parametrize("order", ORDERS)
def test_threadgroup_reduction_matches_numpy(order):
    out, ref = _reduce(WITH_BARRIER, order)
    np.testing.assert_array_equal(out, ref)


def test_missing_barrier_is_caught():
    wrong = []
    for order in ORDERS:
        try:
            out, ref = _reduce(NO_BARRIER, order)
            wrong.append(not np.array_equal(out, ref))
        except EmulatorError:
            wrong.append(True)
    assert any(wrong)


def test_out_of_range_write_reported():
    src = "out[thread_position_in_grid.x + 1] = 1.0f;"
    with pytest.raises(EmulatorError, match=r"oob_write.*'out' at index 64 \(size 64\)"):
        run_kernel("oob_write", ["a"], ["out"], src, [np.zeros(64, np.float32)], [(64,)],
                   [np.float32], grid=(64, 1, 1), threadgroup=(32, 1, 1))


def test_lane_divergent_simd_sum_reported():
    src = """
        uint lane = thread_index_in_simdgroup;
        float v = a[thread_position_in_grid.x];
        if (lane < 16) {
            v = simd_sum(v);
        }
        out[thread_position_in_grid.x] = v;
    """
    with pytest.raises(EmulatorError, match="lane-divergent"):
        run_kernel("divergent", ["a"], ["out"], src, [np.ones(64, np.float32)], [(64,)],
                   [np.float32], grid=(64, 1, 1), threadgroup=(64, 1, 1))


def test_simd_collectives():
    src = """
        uint lane = thread_index_in_simdgroup;
        float v = a[thread_position_in_grid.x];
        out[thread_position_in_grid.x] = simd_sum(v) + simd_max(v) + simd_shuffle(v, 31 - lane);
    """
    a = np.arange(64, dtype=np.float32)
    (out,) = run_kernel("simd_ops", ["a"], ["out"], src, [a], [(64,)], [np.float32],
                        grid=(64, 1, 1), threadgroup=(64, 1, 1), order="random")
    g = a.reshape(2, 32)
    ref = g.sum(1, keepdims=True) + g.max(1, keepdims=True) + g[:, ::-1]
    np.testing.assert_array_equal(out, ref.reshape(-1))


def test_early_return_before_barrier_reported():
    src = """
        threadgroup float buf[64];
        uint t = thread_position_in_threadgroup.x;
        if (t == 3) {
            return;
        }
        buf[t] = 1.0f;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[t] = buf[(t + 1) % 64];
    """
    with pytest.raises(EmulatorError, match="returned while others wait at a barrier"):
        run_kernel("early_ret", ["a"], ["out"], src, [np.zeros(64, np.float32)], [(64,)],
                   [np.float32], grid=(64, 1, 1), threadgroup=(64, 1, 1))


def _bf16_reference(x):
    """Round-to-nearest-even float32 -> bfloat16 bits (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_half_and_bfloat_rounding():
    x = np.array([1.0, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, 0.1, -3.14159,
                  65519.0, 70000.0, 1e-6, 2.0**-24 * 0.75, 1 / 3], dtype=np.float32)
    src = """
        uint i = thread_position_in_grid.x;
        h[i] = half(x[i]);
        b[i] = bfloat(x[i]);
    """
    h, b = run_kernel("rounding", ["x"], ["h", "b"], src, [x], [x.shape, x.shape],
                      [np.float16, "bfloat16"], grid=(x.size, 1, 1), threadgroup=(32, 1, 1))
    with np.errstate(over="ignore"):  # 70000 -> inf is the point
        ref_h = x.astype(np.float16)
    np.testing.assert_array_equal(h.view(np.uint16), ref_h.view(np.uint16))
    np.testing.assert_array_equal(b, _bf16_reference(x))


def test_shape_parameter_and_template():
    src = """
        uint i = thread_position_in_grid.x;
        if (i < uint(inp_shape[0])) {
            out[i] = T(inp[i] * N);
        }
    """
    inp = np.arange(10, dtype=np.float32)
    _, _, cpp, shape_infos, _ = generate_source("shape", ["inp"], ["out"], src, [inp], [np.float32],
                                                template=[("T", np.float32), ("N", 3)])
    assert shape_infos == [(True, False, False)]
    assert "inp_shape" in cpp and "inp_strides" not in cpp
    assert "template <typename T, int N>" in cpp
    assert "custom_kernel_shape__float_3_float_float(" in cpp
    (out,) = run_kernel("shape", ["inp"], ["out"], src, [inp], [(16,)], [np.float32],
                        grid=(16, 1, 1), threadgroup=(16, 1, 1), template=[("T", np.float32), ("N", 3)])
    np.testing.assert_array_equal(out[:10], inp * 3)
    assert np.isnan(out[10:]).all()  # untouched outputs keep the NaN pre-fill


def test_compile_error_names_kernel():
    with pytest.raises(EmulatorError, match=r"(?s)kernel 'broken' failed to compile.*not declared"):
        run_kernel("broken", ["a"], ["out"], "out[0] = nope;", [np.zeros(8, np.float32)], [(8,)],
                   [np.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1))


def test_atomic_outputs_and_header_helper():
    header = """
    float twice(threadgroup float* p, uint i) { return 2.0f * p[i]; }
    """
    src = """
        threadgroup float buf[32];
        uint t = thread_index_in_threadgroup;
        buf[t] = a[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        atomic_fetch_add_explicit(&out[0], twice(buf, 31 - t), memory_order_relaxed);
    """
    a = np.arange(96, dtype=np.float32)
    (out,) = run_kernel("atomic_add", ["a"], ["out"], src, [a], [(1,)], [np.float32],
                        grid=(96, 1, 1), threadgroup=(32, 1, 1), header=header,
                        init_value=0.0, atomic_outputs=True, order="random")
    assert out[0] == 2 * a.sum()


def test_out_of_range_read_through_derived_pointer_reported():
    src = """
        uint r = thread_position_in_grid.x;
        const device float* row = inp + r * 8;
        float acc = 0.0f;
        for (int j = 0; j <= 8; ++j) {  // off by one: reads the next row / past the end
            acc += row[j];
        }
        out[r] = acc;
    """
    with pytest.raises(EmulatorError, match=r"'inp' at index 32 \(size 32\).*\(3,0,0\)"):
        run_kernel("oob_read", ["inp"], ["out"], src, [np.ones(32, np.float32)], [(4,)],
                   [np.float32], grid=(4, 1, 1), threadgroup=(4, 1, 1))
