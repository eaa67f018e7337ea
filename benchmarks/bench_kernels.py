"""Metal kernels against the MLX path.

    python benchmarks/bench_kernels.py

Timing the kernels needs a Mac, and their dispatch from PowerRetention is not written yet,
so for now this reports correctness everywhere: each kernel runs through the CPU emulator
(metal_kernels/emulator) at the head shapes of the presets ultra-tiny to 1b and is compared
with the MLX path (relative error, fp32), in forward, reverse and random thread order.
"""

from __future__ import annotations

import sys

import click
import mlx.core as mx
import numpy as np
from common import machine_description, machine_line, now, write_report

from llm import create_model_config
from metal_kernels.emulated import decode_step
from power_retention import RetentionState, expanded_dim
from power_retention.recurrent import recurrent_step

PRESETS = ("ultra-tiny", "tiny", "small", "medium", "1b")


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def decode_case(preset: str, order: str, seed: int = 0) -> dict:
    config = create_model_config(preset)
    d, Hq, H = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    deg, B = config.power, 1
    D = expanded_dim(d, deg)
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((B, Hq, d)) / np.sqrt(d)).astype(np.float32)
    k = rng.standard_normal((B, H, d)).astype(np.float32)
    v = rng.standard_normal((B, H, d)).astype(np.float32)
    log_g = (-0.01 * rng.random((B, H))).astype(np.float32)
    S = rng.standard_normal((B, H, D, d)).astype(np.float32)
    z = np.abs(rng.standard_normal((B, H, D))).astype(np.float32)
    y, S_out, z_out = decode_step(q, k, v, np.exp(log_g), S, z, deg=deg, normalize=True,
                                  order=order)
    expected_y, expected = recurrent_step(mx.array(q), mx.array(k), mx.array(v), mx.array(log_g),
                                          RetentionState(mx.array(S), mx.array(z)), deg=deg,
                                          normalize=True)
    return {"kernel": "decode_step", "preset": preset, "head_dim": d, "query_heads": Hq,
            "kv_heads": H, "deg": deg, "order": order,
            "error_y": relative_error(y, expected_y), "error_S": relative_error(S_out, expected.S),
            "error_z": relative_error(z_out, expected.z)}


@click.command()
@click.option("--out", default=None, help="JSON path (default benchmarks/results/kernels-DATE.json)")
def main(out):
    started = now()
    machine = machine_description()
    print(f"# Metal kernels vs the MLX path, {started:%Y-%m-%d %H:%M %Z}; {machine_line(machine)}")
    if sys.platform == "darwin" and mx.metal.is_available():
        print("# this Mac has Metal, but the kernels are not dispatched from MLX yet: timings "
              "will come with the dispatch; correctness below is from the emulator")
    else:
        print("# no Metal here: timings need a Mac; correctness from the CPU emulator")
    header = f"{'kernel':<12} {'preset':<11} {'d':>3} {'Hq/H':>6} {'order':>8} {'err y':>9} {'err S':>9} {'err z':>9}"
    print(header)
    print("-" * len(header))
    results = []
    for preset in PRESETS:
        for order in ("forward", "reverse", "random"):
            row = decode_case(preset, order)
            results.append(row)
            print(f"{row['kernel']:<12} {preset:<11} {row['head_dim']:>3} "
                  f"{row['query_heads']:>3}/{row['kv_heads']:<2} {order:>8} {row['error_y']:>9.1e} "
                  f"{row['error_S']:>9.1e} {row['error_z']:>9.1e}", flush=True)
    worst = max(max(r["error_y"], r["error_S"], r["error_z"]) for r in results)
    print(f"# worst relative error {worst:.1e} (bound: 1e-5 for fp32)")
    out = write_report("bench_kernels", started, {"results": results, "worst_relative_error": worst}, out)
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
