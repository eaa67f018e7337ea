"""Both cores for a whole training step on the CPU: the micro-batch split across one CPU stream
per core with a single-threaded BLAS, against one stream with the threaded BLAS (what
train.py does today).

    python benchmarks/bench_cpu_streams.py                      # tiny, 8 x 512 tokens, 6 pairs
    python benchmarks/bench_cpu_streams.py --model ultra-tiny --batch-size 16 --seq-len 128

MLX's CPU backend runs one stream's ops one after another, its elementwise ops on one thread,
so with a threaded BLAS only the products use every core (README, "Linux: both cores for the
op"). Here each half of the micro-batch gets its own stream and the gradients are summed:
products and everything else run side by side. The two configurations alternate step by
step (interleaved pairs, after a warm-up step of each, which compiles), and the table gives
each pair and the median ratio; the gradients of the two are compared too. Needs OpenBLAS
(to switch its threads at run time) and at least two cores.
"""

from __future__ import annotations

import os
import statistics
import time

import click

# Read by MLX at its first evaluation: the two streams' graphs overlap only when MLX's
# breadth-first order spans both (see power_retention.cpu_tuning).
os.environ.setdefault("MLX_BFS_MAX_WIDTH", "16384")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from common import machine_description, machine_line, now, write_report  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from llm import RetentionLLM, create_model_config  # noqa: E402
from llm.config import training_form  # noqa: E402
from power_retention.cpu_tuning import blas_threads, loaded_blas, set_blas_threads, tune_process  # noqa: E402


@click.command()
@click.option("--model", "preset", default="tiny", show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seq-len", default=512, show_default=True)
@click.option("--pairs", default=6, show_default=True, help="interleaved timed pairs of steps")
@click.option("--out", default=None, help="JSON path (default benchmarks/results/cpu_streams-DATE.json)")
def main(preset, batch_size, seq_len, pairs, out):
    tune_process()
    cores = os.cpu_count() or 1
    if not loaded_blas().startswith("OpenBLAS") or cores < 2:
        raise click.UsageError(f"needs OpenBLAS (loaded: {loaded_blas()}) and 2+ cores (here {cores})")
    if batch_size % cores:
        raise click.BadParameter(f"must be a multiple of the {cores} cores", param_hint="--batch-size")
    started, machine = now(), machine_description()
    config = create_model_config(preset)
    model = RetentionLLM(config)
    choice = training_form(config, batch_size // cores, seq_len)
    if choice is not None:
        model.set_retention_form(choice.method, choice.chunk_size)
    parameters = model.trainable_parameters()
    mx.eval(parameters)

    def loss(parameters, x, y):
        model.update(parameters)
        return nn.losses.cross_entropy(model(x), y, reduction="sum")

    gradient = mx.compile(mx.value_and_grad(loss))
    x = mx.random.randint(0, config.vocab_size, (batch_size, seq_len), key=mx.random.key(1))
    y = mx.random.randint(0, config.vocab_size, (batch_size, seq_len), key=mx.random.key(2))
    streams = [mx.new_stream(mx.cpu) for _ in range(cores)]
    threads = blas_threads()

    def one_stream():
        return gradient(parameters, x, y)

    def split():
        part = batch_size // cores
        outputs = []
        for index, stream in enumerate(streams):
            with mx.stream(stream):
                rows = slice(index * part, (index + 1) * part)
                outputs.append(gradient(parameters, x[rows], y[rows]))
        total = sum(value for value, _ in outputs)
        return total, tree_map(lambda *parts: sum(parts), *[grads for _, grads in outputs])

    def timed(step, blas):
        set_blas_threads(blas)
        try:
            begin = time.perf_counter()
            result = step()
            mx.eval(result)
            return time.perf_counter() - begin, result
        finally:
            set_blas_threads(threads)

    print(f"# both cores for a training step, {started:%Y-%m-%d %H:%M %Z}")
    print(f"# machine: {machine_line(machine)}")
    print(f"# {preset}, {batch_size} x {seq_len} tokens, fp32, loss and gradients (compiled); "
          f"one stream with {threads} BLAS threads against {cores} streams of "
          f"{batch_size // cores} sequences with 1 BLAS thread each, alternating")
    _, (loss_one, grads_one) = timed(one_stream, threads)
    _, (loss_split, grads_split) = timed(split, 1)
    difference = max(float(mx.abs(a - b).max() / (mx.abs(a).max() + 1e-30))
                     for (_, a), (_, b) in zip(tree_flatten(grads_one), tree_flatten(grads_split)))
    rows = []
    for index in range(pairs):
        one, _ = timed(one_stream, threads)
        both, _ = timed(split, 1)
        rows.append({"one_stream_s": one, "streams_s": both, "ratio": both / one})
        print(f"pair {index}: one stream {one:.2f} s, {cores} streams {both:.2f} s, ratio {both / one:.2f}",
              flush=True)
    ratios = [row["ratio"] for row in rows]
    summary = {"one_stream_s": statistics.median(row["one_stream_s"] for row in rows),
               "streams_s": statistics.median(row["streams_s"] for row in rows),
               "median_ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
               "loss_relative_difference": abs(loss_one.item() - loss_split.item()) / abs(loss_one.item()),
               "gradient_relative_difference": difference}
    print(f"median: one stream {summary['one_stream_s']:.2f} s, {cores} streams "
          f"{summary['streams_s']:.2f} s, ratio {summary['median_ratio']:.2f} (range "
          f"{min(ratios):.2f}-{max(ratios):.2f}); largest gradient difference {difference:.1e} "
          f"of a tensor's largest entry")
    path = write_report("bench_cpu_streams", started, {
        "model": preset, "batch_size": batch_size, "seq_len": seq_len, "blas_threads": threads,
        "streams": cores, "pairs": rows, **summary}, out)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
