"""What running right after the other framework costs each: the op (its default form) and
PyTorch's causal SDPA, each timed after a run of its own and after a run of the other.

    python benchmarks/bench_order.py              # T = 4096, B=1, 4 heads of 64, degree 2

bench_retention.py times two cases alternately so that the machine's drift cancels. Where one
case leaves work running after it returns (PyTorch's OpenMP threads keep spinning for a while
after each call under libgomp's default wait policy), the case timed next pays for it; this
measures how much, and is why bench_retention.py's ratios are paired (each timed run follows
an untimed run of the same case) by default. Prints the medians and writes them as JSON.
"""

from __future__ import annotations

import statistics

import click
import mlx.core as mx
from bench_retention import make_case, torch_installed
from common import machine_description, machine_line, now, seconds, write_report

from power_retention.cpu_tuning import tune_process


@click.command()
@click.option("--T", "T", default=4096, show_default=True)
@click.option("--batch", "B", default=1, show_default=True)
@click.option("--heads", "H", default=4, show_default=True)
@click.option("--head-dim", "d", default=64, show_default=True)
@click.option("--deg", default=2, show_default=True)
@click.option("--rounds", default=30, show_default=True)
@click.option("--out", default=None, help="JSON path (default benchmarks/results/order-DATE.json)")
def main(T, B, H, d, deg, rounds, out):
    if not torch_installed():
        raise click.UsageError("PyTorch is not installed (pip install torch): nothing to compare")
    tune_process()
    started = now()
    print(f"# which run follows which, {started:%Y-%m-%d %H:%M %Z}; {machine_line(machine_description())}")
    print(f"# B={B} T={T} H={H} d={d} deg={deg}; medians of {rounds} rounds, ms")
    results = {}
    for index, name in enumerate(("forward", "forward_backward")):
        ours = make_case("auto", B, T, H, d, deg, None)[index]
        theirs = make_case("torch", B, T, H, d, deg, None)[index]
        mx.eval(ours(), theirs(), ours(), theirs())
        times = {"ours after ours": [], "ours after torch": [], "torch after ours": [],
                 "torch after torch": []}
        for _ in range(rounds):
            mx.eval(ours())
            times["ours after ours"].append(seconds(ours))
            times["torch after ours"].append(seconds(theirs))
            times["torch after torch"].append(seconds(theirs))
            times["ours after torch"].append(seconds(ours))
        results[name] = {label: statistics.median(seconds) for label, seconds in times.items()}
        print(f"{name:>16}: " + ", ".join(f"{label} {1e3 * s:.1f}" for label, s in results[name].items()))
    out = write_report("bench_order", started, {"config": {"B": B, "T": T, "H": H, "d": d, "deg": deg,
                                                           "rounds": rounds}, "results": results}, out)
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
