"""exp on MLX's CPU backend: MLX's own, numpy's, and a polynomial written in MLX ops; then the
cross-entropy over a large vocabulary (the biggest user of exp in a training step) with MLX's
own exp and with the polynomial, in time and in peak memory.

    python benchmarks/bench_exp.py                       # 786,432 floats; 1024 x 50,257 logits

On x86 Linux MLX's CPU exp has no vector code; the polynomial (Cody-Waite reduction to
[-ln2/2, ln2/2], Cephes' degree-6 polynomial, 2^n put into the exponent bits, compiled into
one loop) is the obvious workaround. Its bit-level step (``mx.view``) has no gradient in MLX,
so in a model it must be a ``custom_function`` with its own vjp; the second table shows what
that costs in memory, which is why the project does not use it (README, "Linux: fast BLAS").
"""

from __future__ import annotations

import click
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from common import machine_description, machine_line, median_seconds, now, write_report

from power_retention.cpu_tuning import tune_process

LOG2_E, LN2_HIGH, LN2_LOW = 1.4426950408889634, 0.693145751953125, 1.428606765330187e-06
HIGHEST, LOWEST = 88.72283935546875, -87.0  # overflow to inf above; flushed to 0 below
COEFFICIENTS = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                1.6666665459e-1, 5.0000001201e-1)


def exp_ops(x: mx.array) -> mx.array:
    clipped = mx.clip(x, LOWEST, HIGHEST)
    n = mx.floor(clipped * LOG2_E + 0.5)
    r = clipped - n * LN2_HIGH - n * LN2_LOW
    p = COEFFICIENTS[0]
    for c in COEFFICIENTS[1:]:
        p = p * r + c
    y = (p * r * r + r + 1.0) * mx.view(mx.left_shift(n.astype(mx.int32) + 126, 23), mx.float32) * 2.0
    return mx.where(x < LOWEST, 0.0, mx.where(x > HIGHEST, mx.inf, y))


polynomial_exp = mx.compile(exp_ops)


@mx.compile
def _forward(logits, targets):
    top = mx.max(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return mx.log(mx.sum(exp_ops(logits - top), axis=-1)) + top.squeeze(-1) - chosen


@mx.compile
def _backward(logits, targets, loss, cotangent):
    log_total = loss[..., None] + mx.take_along_axis(logits, targets[..., None], axis=-1)
    one_hot = mx.arange(logits.shape[-1]) == targets[..., None]
    return (exp_ops(logits - log_total) - one_hot) * cotangent[..., None]


@mx.custom_function
def polynomial_cross_entropy(logits, targets):
    return _forward(logits, targets)


@polynomial_cross_entropy.vjp
def _(primals, cotangent, output):
    logits, targets = primals
    return _backward(logits, targets, output, cotangent), mx.zeros_like(targets)


@click.command()
@click.option("--floats", default=786_432, show_default=True)
@click.option("--positions", default=1024, show_default=True)
@click.option("--vocab", default=50_257, show_default=True)
@click.option("--out", default=None, help="JSON path (default benchmarks/results/exp-DATE.json)")
def main(floats, positions, vocab, out):
    tune_process()
    started, machine = now(), machine_description()
    print(f"# exp on MLX's CPU backend, {started:%Y-%m-%d %H:%M %Z}\n# machine: {machine_line(machine)}")
    x = mx.random.normal((floats,), key=mx.random.key(0)) * 10
    host = np.array(x)
    exact = np.exp(host.astype(np.float64))
    normal = exact > np.finfo(np.float32).tiny
    rows = {}
    for name, fn in [("mx.exp", lambda: mx.exp(x)), ("numpy", lambda: np.exp(host)),
                     ("polynomial", lambda: polynomial_exp(x))]:
        seconds = median_seconds(fn, repeats=5)
        error = None
        if name != "numpy":
            values = np.array(mx.exp(x) if name == "mx.exp" else polynomial_exp(x), dtype=np.float64)
            error = float(np.max(np.abs(values[normal] - exact[normal]) / exact[normal]))
        rows[name] = {"seconds": seconds, "ns_per_float": seconds / floats * 1e9, "max_relative_error": error}
        print(f"{name:>11}: {seconds * 1e3:7.2f} ms, {seconds / floats * 1e9:5.1f} ns a float"
              + (f", max relative error {error:.1e}" if error is not None else ""))

    logits = mx.random.normal((positions, vocab), key=mx.random.key(1))
    targets = mx.random.randint(0, vocab, (positions,), key=mx.random.key(2))
    mx.eval(logits, targets)
    losses = {"nn.losses.cross_entropy": lambda l: nn.losses.cross_entropy(l, targets).mean(),
              "polynomial, custom vjp": lambda l: polynomial_cross_entropy(l, targets).mean()}
    print(f"# cross-entropy forward+backward (compiled) over {positions} x {vocab:,} logits "
          f"({logits.nbytes / 1e9:.2f} GB); peak memory is MLX's over one call")
    for name, loss in losses.items():
        step = mx.compile(mx.value_and_grad(loss))
        seconds = median_seconds(lambda: step(logits), repeats=3)
        mx.reset_peak_memory()
        mx.eval(step(logits))
        peak = mx.get_peak_memory() / 1e9
        rows[name] = {"seconds": seconds, "peak_gb": peak}
        print(f"{name:>24}: {seconds:6.3f} s, peak {peak:.2f} GB")
    print(f"# wrote {write_report('bench_exp', started, {'floats': floats, 'positions': positions, 'vocab': vocab, 'rows': rows}, out)}")


if __name__ == "__main__":
    main()
