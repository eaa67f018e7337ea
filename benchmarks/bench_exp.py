"""exp on MLX's CPU backend: MLX's own, numpy's and the project's compiled one
(``power_retention.native``); then the cross-entropy over a large vocabulary (the biggest user
of exp in a training step) with each, in time and in peak memory.

    python benchmarks/bench_exp.py                       # 786,432 floats; 1024 x 50,257 logits

On x86 Linux MLX's CPU exp has no vector code (about 25 ns a float on a Xeon);
``power_retention.native`` is a loop the compiler vectorises, as C++ primitives with their own
vjp (README, "Linux: fast BLAS").
"""

from __future__ import annotations

import click
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from common import machine_description, machine_line, median_seconds, now, write_report

from power_retention import native
from power_retention.cpu_tuning import tune_process


@click.command()
@click.option("--floats", default=786_432, show_default=True)
@click.option("--positions", default=1024, show_default=True)
@click.option("--vocab", default=50_257, show_default=True)
@click.option("--out", default=None, help="JSON path (default benchmarks/results/exp-DATE.json)")
def main(floats, positions, vocab, out):
    tune_process()
    started, machine = now(), machine_description()
    print(f"# exp on MLX's CPU backend, {started:%Y-%m-%d %H:%M %Z}\n# machine: {machine_line(machine)}")
    if not native.available():
        raise click.UsageError("power_retention.native did not build here (see the message above)")
    x = mx.random.normal((floats,), key=mx.random.key(0)) * 10
    host = np.array(x)
    exact = np.exp(host.astype(np.float64))
    normal = exact > np.finfo(np.float32).tiny
    rows = {}
    for name, fn in [("mx.exp", lambda: mx.exp(x)), ("numpy", lambda: np.exp(host)),
                     ("native.exp", lambda: native.exp(x)), ("mx.sigmoid", lambda: mx.sigmoid(x)),
                     ("native.sigmoid", lambda: native.sigmoid(x))]:
        seconds = median_seconds(fn, repeats=5)
        error = None
        if name in ("mx.exp", "native.exp"):
            values = np.array(fn(), dtype=np.float64)
            error = float(np.max(np.abs(values[normal] - exact[normal]) / exact[normal]))
        rows[name] = {"seconds": seconds, "ns_per_float": seconds / floats * 1e9, "max_relative_error": error}
        print(f"{name:>15}: {seconds * 1e3:7.2f} ms, {seconds / floats * 1e9:5.1f} ns a float"
              + (f", max relative error {error:.1e}" if error is not None else ""))

    logits = mx.random.normal((positions, vocab), key=mx.random.key(1))
    targets = mx.random.randint(0, vocab, (positions,), key=mx.random.key(2))
    mx.eval(logits, targets)
    losses = {"nn.losses.cross_entropy": lambda l: nn.losses.cross_entropy(l, targets).mean(),
              "native.cross_entropy": lambda l: native.cross_entropy(l, targets).mean()}
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
