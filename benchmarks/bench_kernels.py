"""Metal kernels against the MLX path.

    python benchmarks/bench_kernels.py

Correctness everywhere: the kernels run through the same dispatch code as on a Mac, on the
CPU emulator (metal_kernels/emulator), at the head shapes of the presets ultra-tiny to 1b, in
forward, reverse and random thread order, against the MLX path (relative error, fp32): the
fused decode step, and a 133-token prefill in chunks of 64 from a non-empty state. Both are
also measured against the exact value (the MLX path in float64): where the kernel and the
MLX path differ by more than 1e-5, that says which of the two fp32 roundings is further off
(a decode output at degree 2 sums D = C(d + 1, 2) products per element, 2,080 at d = 64). Timing
needs Metal: on a Mac this also times, per preset and for one layer, a decode step (kernel
against MLX path, and the state bytes it moves per second) and a 4096-token prefill.
"""

from __future__ import annotations

import click
import mlx.core as mx
import numpy as np
from common import machine_description, machine_line, median_seconds, now, write_report

from llm import create_model_config
from metal_kernels import launch
from metal_kernels.check import relative_error
from power_retention import RetentionState, expanded_dim, power_retention, power_retention_step

PRESETS = ("ultra-tiny", "tiny", "small", "medium", "1b")


def step_inputs(preset: str, seed: int = 0):
    """One decode step's inputs at the preset's head shape (batch 1, one layer)."""
    config = create_model_config(preset)
    d, Hq, H, deg = config.head_dim, config.num_attention_heads, config.num_key_value_heads, config.deg
    D = expanded_dim(d, deg)
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    state = RetentionState(normal(1, H, D, d), mx.abs(normal(1, H, D)))
    log_g = mx.array(-0.01 * rng.random((1, H)).astype(np.float32))
    return config, (normal(1, Hq, d), normal(1, H, d), normal(1, H, d), log_g, state)


def in_float64(*arrays):
    """Arrays (and states) in float64, which MLX computes on the CPU only."""
    def widen(a):
        return RetentionState(widen(a.S), widen(a.z)) if isinstance(a, RetentionState) \
            else a.astype(mx.float64)
    return [widen(a) for a in arrays]


def exact_errors(y, expected_y, exact_y) -> dict:
    """The output's distance from the exact value: the kernel's and the fp32 MLX path's."""
    return {"exact_error_y_kernel": relative_error(y, exact_y),
            "exact_error_y_mlx": relative_error(expected_y, exact_y)}


def correctness_case(preset: str, order: str) -> dict:
    config, inputs = step_inputs(preset)
    launch.set_backend("emulator", order=order)
    y, state = power_retention_step(*inputs, deg=config.deg, use_metal=True)
    expected_y, expected = power_retention_step(*inputs, deg=config.deg)
    with mx.stream(mx.cpu):
        exact_y, _ = power_retention_step(*in_float64(*inputs), deg=config.deg)
    return {"kernel": "decode_step", "preset": preset, "head_dim": config.head_dim,
            "query_heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "deg": config.deg, "order": order, "error_y": relative_error(y, expected_y),
            "error_S": relative_error(state.S, expected.S),
            "error_z": relative_error(state.z, expected.z), **exact_errors(y, expected_y, exact_y)}


def prefill_case(preset: str, order: str, T: int = 133, seed: int = 0) -> dict:
    config = create_model_config(preset)
    d, Hq, H, deg = config.head_dim, config.num_attention_heads, config.num_key_value_heads, config.deg
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    q, k, v = normal(1, T, Hq, d), normal(1, T, H, d), normal(1, T, H, d)
    log_g = mx.array(-0.01 * rng.random((1, T, H)).astype(np.float32))
    _, state = power_retention(q[:, :9], k[:, :9], v[:, :9], deg=deg, return_state=True)
    options = dict(deg=deg, method="chunked", chunk_size=64, initial_state=state, return_state=True)
    launch.set_backend("emulator", order=order)
    y, final = power_retention(q, k, v, log_g, use_metal=True, **options)
    expected_y, expected = power_retention(q, k, v, log_g, **options)
    with mx.stream(mx.cpu):
        *wide, state64 = in_float64(q, k, v, log_g, state)
        exact_y, _ = power_retention(*wide, **dict(options, initial_state=state64))
    return {"kernel": "prefill", "preset": preset, "head_dim": d, "query_heads": Hq,
            "kv_heads": H, "deg": deg, "order": order, "error_y": relative_error(y, expected_y),
            "error_S": relative_error(final.S, expected.S),
            "error_z": relative_error(final.z, expected.z), **exact_errors(y, expected_y, exact_y)}


def timing_case(preset: str) -> dict:
    """One layer's decode step on Metal: kernel vs MLX path, and the state bytes the kernel
    must move (read S and z, write them back) per second of its time."""
    config, inputs = step_inputs(preset)
    launch.set_backend("metal")
    deg = config.deg
    kernel = median_seconds(lambda: power_retention_step(*inputs, deg=deg, use_metal=True), 50)
    mlx_path = median_seconds(lambda: power_retention_step(*inputs, deg=deg), 50)
    state_bytes = 2 * 4 * sum(s.size for s in inputs[-1])
    q, k, v = (mx.random.normal((1, 4096, heads, config.head_dim))
               for heads in (config.num_attention_heads, config.num_key_value_heads,
                             config.num_key_value_heads))
    prefill_kernel = median_seconds(
        lambda: power_retention(q, k, v, deg=deg, method="chunked", use_metal=True), 5)
    prefill_mlx = median_seconds(lambda: power_retention(q, k, v, deg=deg, method="chunked"), 5)
    return {"preset": preset, "kernel_s": kernel, "mlx_path_s": mlx_path,
            "speedup": mlx_path / kernel, "state_bytes": state_bytes,
            "kernel_state_gb_per_s": state_bytes / kernel / 1e9,
            "prefill_tokens_per_s_kernel": 4096 / prefill_kernel,
            "prefill_tokens_per_s_mlx": 4096 / prefill_mlx}


@click.command()
@click.option("--out", default=None, help="JSON path (default benchmarks/results/kernels-DATE.json)")
def main(out):
    started = now()
    machine = machine_description()
    print(f"# Metal kernels vs the MLX path, {started:%Y-%m-%d %H:%M %Z}; {machine_line(machine)}")
    timings = []
    if mx.metal.is_available():
        print("# one layer, batch 1: decode step; prefill of 4096 tokens (tokens/s)")
        print(f"{'preset':<11} {'kernel ms':>10} {'MLX ms':>8} {'speedup':>8} {'state GB/s':>11} "
              f"{'prefill kernel':>15} {'prefill MLX':>12}")
        for preset in PRESETS:
            row = timing_case(preset)
            timings.append(row)
            print(f"{preset:<11} {1e3 * row['kernel_s']:>10.3f} {1e3 * row['mlx_path_s']:>8.3f} "
                  f"{row['speedup']:>8.2f} {row['kernel_state_gb_per_s']:>11.1f} "
                  f"{row['prefill_tokens_per_s_kernel']:>15.0f} "
                  f"{row['prefill_tokens_per_s_mlx']:>12.0f}", flush=True)
    else:
        print("# no Metal here: timings need a Mac; correctness from the CPU emulator")
    header = (f"{'kernel':<12} {'preset':<11} {'d':>3} {'Hq/H':>6} {'order':>8} {'err y':>9} {'err S':>9} "
              f"{'err z':>9} | y vs exact: {'kernel':>7} {'MLX':>8}")
    print(header)
    print("-" * len(header))
    results = []
    for case in (correctness_case, prefill_case):
        for preset, order in ((p, o) for p in PRESETS for o in ("forward", "reverse", "random")):
            row = case(preset, order)
            results.append(row)
            print(f"{row['kernel']:<12} {preset:<11} {row['head_dim']:>3} "
                  f"{row['query_heads']:>3}/{row['kv_heads']:<2} {order:>8} {row['error_y']:>9.1e} "
                  f"{row['error_S']:>9.1e} {row['error_z']:>9.1e} | {'':>12}"
                  f"{row['exact_error_y_kernel']:>7.1e} {row['exact_error_y_mlx']:>8.1e}", flush=True)
    worst = max(max(r["error_y"], r["error_S"], r["error_z"]) for r in results)
    # The bound: within 1e-5 of the MLX path, or no further from the exact value than it is.
    beyond = [r for r in results if max(r["error_y"], r["error_S"], r["error_z"]) > 1e-5
              and r["exact_error_y_kernel"] > max(1e-5, r["exact_error_y_mlx"])]
    worst_exact = max(r["exact_error_y_kernel"] for r in results)
    print(f"# worst relative error against the MLX path {worst:.1e}; the kernels' worst against the "
          f"exact value {worst_exact:.1e}; beyond the bound (1e-5 from the MLX path, or further from "
          f"the exact value than it): {len(beyond)}")
    out = write_report("bench_kernels", started, {"results": results, "timings": timings,
                                                  "worst_relative_error": worst,
                                                  "worst_exact_error_kernel": worst_exact,
                                                  "beyond_bound": len(beyond)}, out)
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
