"""Training throughput with one process and with two (data parallel under mlx.launch, ring
backend, on this machine), and the bytes each step all-reduces.

    python benchmarks/bench_distributed.py                  # ultra-tiny and tiny
    python benchmarks/bench_distributed.py --presets ultra-tiny --repeats 3

Each case runs train.py itself, the same global batch in both (each of two ranks takes half
of it), one after the other, repeated ``--repeats`` times in alternation; the throughput of a
run is the median tokens/s of its progress lines after the first (compilation and the first
evaluation excluded). The bytes: every trainable parameter's gradient in float32, plus the
loss and the token count, once per step; a ring all-reduce sends and receives 2 (n - 1) / n
of that per rank.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click
from common import machine_description, machine_line, now, write_report

from llm import create_model_config, param_count

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring",
          "--python", sys.executable]
SHAPES = {"ultra-tiny": dict(batch_size=16, seq_len=128, steps=60),
          "tiny": dict(batch_size=8, seq_len=512, steps=8)}


def throughput(command: list, run_dir: Path) -> float:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0 or not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    rates = [r["tokens_per_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "tokens_per_s" in r]
    return statistics.median(rates[1:] or rates)


@click.command()
@click.option("--presets", default="ultra-tiny,tiny", show_default=True)
@click.option("--repeats", default=2, show_default=True)
@click.option("--out", default=None, help="JSON path (default benchmarks/results/distributed-DATE.json)")
def main(presets, repeats, out):
    started = now()
    machine = machine_description()
    print(f"# data-parallel training throughput, {started:%Y-%m-%d %H:%M %Z}; {machine_line(machine)}")
    print(f"{'preset':<11} {'B x T':>9} {'1 process':>10} {'2 processes':>12} {'ratio':>6} "
          f"{'all-reduced/step':>17}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as scratch:
        for preset in presets.split(","):
            shape = SHAPES[preset]
            steps = shape["steps"]
            rates = {1: [], 2: []}
            for repeat in range(repeats):
                for processes in (1, 2):
                    run_dir = Path(scratch) / f"{preset}-{processes}-{repeat}"
                    args = ["train.py", "--model", preset, "--tokenizer", "byte", "--steps", str(steps),
                            "--batch-size", str(shape["batch_size"]), "--seq-len", str(shape["seq_len"]),
                            "--eval-every", str(steps), "--eval-batches", "1", "--patience", "0",
                            "--out", str(run_dir), "--cache-dir", str(Path(scratch) / "cache")]
                    command = [*LAUNCH, *args] if processes == 2 else [sys.executable, *args]
                    rates[processes].append(throughput(command, run_dir))
            config = create_model_config(preset, vocab_size=258)
            reduced = 4 * param_count(config) + 8
            row = {"preset": preset, **shape,
                   "tokens_per_s_1": statistics.median(rates[1]), "tokens_per_s_2": statistics.median(rates[2]),
                   "runs": rates, "all_reduced_bytes_per_step": reduced,
                   "ring_bytes_sent_per_rank_per_step": reduced}  # 2 (n - 1) / n = 1 at n = 2
            row["ratio"] = row["tokens_per_s_2"] / row["tokens_per_s_1"]
            results.append(row)
            size = f"{shape['batch_size']} x {shape['seq_len']}"
            print(f"{preset:<11} {size:>9} "
                  f"{row['tokens_per_s_1']:>10,.0f} {row['tokens_per_s_2']:>12,.0f} {row['ratio']:>6.2f} "
                  f"{reduced / 1e6:>14.2f} MB", flush=True)
    out = write_report("bench_distributed", started, {"results": results, "cpu_count": os.cpu_count()}, out)
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
