"""Tests for the CPU Metal-kernel emulator (real g++ compiles, cached per source)."""

import os
import shutil
import tempfile

import numpy as np
import pytest

if shutil.which("g++") is None:
    pytest.skip("g++ not available", allow_module_level=True)

os.environ.setdefault("POWER_RETENTION_EMULATOR_CACHE", os.path.join(tempfile.gettempdir(), "metal_emu_test_cache"))
from metal_kernels.emulator import (  # noqa: E402
    EmulatorError, check_syntax, generate_source, run_kernel)

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


@pytest.mark.parametrize("floats", [8192, 8193], ids=["32-KiB", "32-KiB-and-4-bytes"])
def test_threadgroup_memory_is_limited_to_apple_gpus_32_kib(floats):
    """Two threadgroup arrays that add up to 32 KiB run; 4 bytes more is refused, as an
    Apple GPU refuses to build the pipeline."""
    src = f"""
        threadgroup float first[{floats // 2}];
        threadgroup float second[{floats - floats // 2}];
        uint i = thread_position_in_grid.x;
        first[i] = a[i];
        second[i] = a[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = first[i] + second[i];
    """
    call = lambda: run_kernel(f"tg_memory_{floats}", ["a"], ["out"], src,  # noqa: E731
                              [np.ones(32, np.float32)], [(32,)], [np.float32], grid=(32, 1, 1),
                              threadgroup=(32, 1, 1))
    if floats * 4 <= 32 * 1024:
        assert np.array_equal(call()[0], np.full(32, 2.0, np.float32))
    else:
        with pytest.raises(EmulatorError, match=r"threadgroup memory of 32772 bytes: Apple GPUs allow at most 32768"):
            call()


@pytest.mark.parametrize("threads", [(1024, 1, 1), (2048, 1, 1), (64, 32, 1)],
                         ids=["1024", "2048", "64x32"])
def test_threads_per_threadgroup_are_limited_to_1024(threads):
    src = "out[thread_position_in_grid.x] = a[thread_position_in_grid.x];"
    n = 2048
    call = lambda: run_kernel("tg_threads", ["a"], ["out"], src, [np.ones(n, np.float32)],  # noqa: E731
                              [(n,)], [np.float32], grid=(n, threads[1], 1), threadgroup=threads)
    if threads[0] * threads[1] <= 1024:
        call()
    else:
        with pytest.raises(EmulatorError, match=r"threads: Apple GPUs allow at most 1024"):
            call()


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


SWIZZLE = """
    uint i = thread_position_in_grid.x;
    const device float* pa = a + 4 * i;
    const device float* pb = b + 4 * i;
    float4 p = float4(pa[0], pa[1], pa[2], pa[3]);
    float4 q = float4(pb[0], pb[1], pb[2], pb[3]);
    float4 r[ROWS];
    r[0] = p.wzyx;
    r[1] = p.bgra;
    r[2] = float4(p.zx, q.yw);
    r[3] = float4(p.xyz + q.zyx, 0.0f);
    r[4] = float4(p.xy * 2.0f, 1.5f, p.w);
    r[5] = float4(3.0f - p.yx, q.zw / 2.0f);
    float4 w = p;
    w.wx = q.xy;
    w.gb = float2(7.0f, 8.0f);
    r[6] = w;
    float4 c = q;
    c.xy += p.zw;
    c.zw *= 2.0f;
    c -= 1.0f;
    c.yzx /= float3(2.0f, 4.0f, 8.0f);
    r[7] = c;
    r[8] = float4(float3(q.wz, 2.0f), -1.0f);
    float3 t = float3(p.x, q.yz);
    float2 s = float2(0.5f);
    r[9] = float4(t.zyx * s.r, s.g);
    r[10] = float4(dot(p.xy, q.yx), dot(p.xyz, q.zyx), dot(p, q), length(p.zw));
    r[11] = float4(normalize(p.xyz), length(float3(p.wzy)));
    half4 hv = half4(h[4 * i], h[4 * i + 1], h[4 * i + 2], h[4 * i + 3]);
    half2 hs = hv.yx * half(2) + hv.zw;
    hv.xz = hv.zx;
    r[12] = float4(float2(hs), float(dot(hv.xy, hv.zw)), float(hv.a));
    r[13] = float4(float2(half2(p.xy)), float2(p.yx) - float2(q.x));
    for (int k = 0; k < ROWS; ++k) {
        for (int j = 0; j < 4; ++j) {
            out[(i * ROWS + k) * 4 + j] = r[k][j];
        }
    }
""".replace("ROWS", "14")


def _swizzle_reference(p, q, h):
    """What SWIZZLE computes, per row of p, q (float32) and h (float16), from numpy."""
    x, y, z, w = p.T
    qx, qy, qz, qw = q.T
    one = np.ones_like(x)
    rows = [
        p[:, ::-1],
        p[:, [2, 1, 0, 3]],
        np.stack([z, x, qy, qw], 1),
        np.stack([x + qz, y + qy, z + qx, 0 * one], 1),
        np.stack([x * 2, y * 2, 1.5 * one, w], 1),
        np.stack([3 - y, 3 - x, qz / 2, qw / 2], 1),
        np.stack([qy, 7 * one, 8 * one, qx], 1),
        np.stack([(qx + z - 1) / 8, (qy + w - 1) / 2, (qz * 2 - 1) / 4, qw * 2 - 1], 1),
        np.stack([qw, qz, 2 * one, -one], 1),
        np.stack([qz * 0.5, qy * 0.5, x * 0.5, 0.5 * one], 1),
        np.stack([x * qy + y * qx, x * qz + y * qy + z * qx, (p * q).sum(1),
                  np.sqrt(z * z + w * w)], 1),
        np.concatenate([p[:, :3] / np.linalg.norm(p[:, :3], axis=1, keepdims=True),
                        np.linalg.norm(p[:, 1:], axis=1, keepdims=True)], 1),
        np.stack([h[:, 1] * 2 + h[:, 2], h[:, 0] * 2 + h[:, 3],
                  h[:, 2] * h[:, 0] + h[:, 1] * h[:, 3], h[:, 3]], 1).astype(np.float32),
        np.stack([x.astype(np.float16), y.astype(np.float16), y - qx, x - qx], 1),
    ]
    return np.stack(rows, 1).astype(np.float32)


def test_vector_swizzles_constructors_and_geometry_match_numpy():
    """Swizzle reads (xyzw and rgba), writes, compound assignment, arithmetic with vectors,
    swizzles and scalars, Metal's constructors, dot / length / normalize, half vectors."""
    n = 6
    rng = np.random.default_rng(1)
    p = rng.standard_normal((n, 4)).astype(np.float32)
    q = rng.standard_normal((n, 4)).astype(np.float32)
    h = (rng.integers(-8, 9, (n, 4)) / 4).astype(np.float16)  # half arithmetic below is exact
    (out,) = run_kernel("swizzle", ["a", "b", "h"], ["out"], SWIZZLE, [p, q, h], [(n, 14, 4)],
                        [np.float32], grid=(n, 1, 1), threadgroup=(n, 1, 1))
    ref = _swizzle_reference(p, q, h)
    # float32, rounded per operation on both sides; the tolerance is for np.linalg.norm, which
    # sums differently from length().
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[:, 12], ref[:, 12])  # exact half values


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed")
def test_swizzle_kernel_passes_a_clang_syntax_check():
    """The same kernel compiles under clang too (the union of swizzle members, the macros)."""
    arrays = [np.zeros((6, 4), np.float32)] * 2 + [np.zeros((6, 4), np.float16)]
    check_syntax("swizzle", ["a", "b", "h"], ["out"], SWIZZLE, inputs=arrays,
                 output_dtypes=[np.float32])


CPP17_FEATURES = {
    "if-constexpr": ("", "if constexpr (sizeof(float) == 4) { out[0] = a[0]; }", "constexpr if"),
    "structured-binding": ("struct Pair { float x, y; };",
                           "Pair p = {a[0], a[1]}; auto [x, y] = p; out[0] = x + y;",
                           "decomposition declarations"),
    "inline-variable": ("inline constexpr float SCALE = 2.0f;", "out[0] = a[0] * SCALE;",
                        "inline variables"),
    "fold-expression": ("template <class... T> float sum(T... v) { return (v + ...); }",
                        "out[0] = sum(a[0], a[1]);", "pack fold expression"),
}


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed")
@pytest.mark.parametrize("feature", list(CPP17_FEATURES))
def test_a_cpp17_feature_fails_the_cpp14_check(feature):
    """MLX compiles kernels as Metal 3.1 (C++14-based) on macOS 14: the syntax check compiles
    each kernel as C++14 with C++17 features as errors, in its header as in its body; the
    same kernel written in C++14 passes."""
    header, body, message = CPP17_FEATURES[feature]
    call = lambda source, head: check_syntax(feature.replace("-", "_"), ["a"], ["out"], source, head,  # noqa: E731
                                             inputs=[np.zeros(4, np.float32)],
                                             output_dtypes=[np.float32])
    with pytest.raises(EmulatorError, match=f"{message} (is|are) a C\\+\\+17 extension"):
        call(body, header)
    call("out[0] = a[0] + a[1];", "")


@pytest.mark.parametrize("statement, message", [
    ("v.xx = float2(1.0f, 2.0f);", "may not repeat a component"),  # no repeats when written
    ("float2 u = v.xg;", "no member named"),  # Metal: xyzw and rgba do not mix
    ("float2 u = v.xy; u.z = 1.0f;", "no member named"),  # a float2 has no third component
    ("float4 u = half4(v);", "conversion from"),  # element types convert explicitly only
])
def test_invalid_vector_code_fails_to_compile(statement, message):
    src = f"float4 v = float4(a[0]); {statement} out[0] = v.x;"
    with pytest.raises(EmulatorError, match=message):
        run_kernel("bad_vector", ["a"], ["out"], src, [np.zeros(8, np.float32)], [(1,)],
                   [np.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1))

