"""Both cores for a whole training step on the CPU: the micro-batch split across one CPU stream
per core with a single-threaded BLAS (llm.cpu_streams), against one stream with the threaded
BLAS. train.py makes the same comparison, shorter, at a run's start, and splits when it pays.

    python benchmarks/bench_cpu_streams.py                      # tiny, 8 x 512 tokens, 6 pairs
    python benchmarks/bench_cpu_streams.py --model ultra-tiny --batch-size 16 --seq-len 128

MLX's CPU backend runs one stream's ops one after another, its elementwise ops on one thread,
so with a threaded BLAS only the products use every core (README, "Linux: both cores").
Here each half of the micro-batch gets its own stream and the gradients are summed:
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
import mlx.core as mx
from common import machine_description, machine_line, now, write_report
from mlx.utils import tree_flatten

from llm import RetentionLLM, create_model_config
from llm.config import training_form
from llm.cpu_streams import make_streams, single_threaded_blas, split_step
from llm.trainer import micro_step_function
from power_retention.cpu_tuning import blas_threads, loaded_blas, tune_process


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
    mx.eval(model.parameters())
    step = micro_step_function(model)
    keys = mx.random.split(mx.random.key(1), 2)
    arrays = [mx.random.randint(0, config.vocab_size, (batch_size, seq_len), key=keys[0]),
              mx.random.randint(0, config.vocab_size, (batch_size, seq_len), key=keys[1]),
              mx.ones((batch_size, seq_len))]
    streams = make_streams(cores)
    threads = blas_threads()

    def one_stream():
        return step(*arrays)

    def split():
        return split_step(step, arrays, streams)

    peaks = {}

    def timed(run):
        mx.reset_peak_memory()
        with single_threaded_blas(run is split):
            begin = time.perf_counter()
            result = run()
            mx.eval(result)
            seconds = time.perf_counter() - begin
        peaks[run.__name__] = max(peaks.get(run.__name__, 0), mx.get_peak_memory())
        return seconds, result

    print(f"# both cores for a training step, {started:%Y-%m-%d %H:%M %Z}")
    print(f"# machine: {machine_line(machine)}")
    print(f"# {preset}, {batch_size} x {seq_len} tokens, fp32, loss and gradients (compiled); "
          f"one stream with {threads} BLAS threads against {cores} streams of "
          f"{batch_size // cores} sequences with 1 BLAS thread each, alternating")
    _, (loss_one, grads_one) = timed(one_stream)
    _, (loss_split, grads_split) = timed(split)
    difference = max(float(mx.abs(a - b).max() / (mx.abs(a).max() + 1e-30))
                     for (_, a), (_, b) in zip(tree_flatten(grads_one), tree_flatten(grads_split)))
    rows = []
    for index in range(pairs):
        one, _ = timed(one_stream)
        both, _ = timed(split)
        rows.append({"one_stream_s": one, "streams_s": both, "ratio": both / one})
        print(f"pair {index}: one stream {one:.2f} s, {cores} streams {both:.2f} s, ratio {both / one:.2f}",
              flush=True)
    ratios = [row["ratio"] for row in rows]
    summary = {"one_stream_s": statistics.median(row["one_stream_s"] for row in rows),
               "streams_s": statistics.median(row["streams_s"] for row in rows),
               "median_ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
               "loss_relative_difference": abs(loss_one.item() - loss_split.item()) / abs(loss_one.item()),
               "gradient_relative_difference": difference,
               "one_stream_peak_gb": peaks["one_stream"] / 1e9, "streams_peak_gb": peaks["split"] / 1e9,
               "bfs_max_width": os.environ["MLX_BFS_MAX_WIDTH"]}
    print(f"median: one stream {summary['one_stream_s']:.2f} s, {cores} streams "
          f"{summary['streams_s']:.2f} s, ratio {summary['median_ratio']:.2f} (range "
          f"{min(ratios):.2f}-{max(ratios):.2f}); largest gradient difference {difference:.1e} "
          f"of a tensor's largest entry; peak memory {summary['one_stream_peak_gb']:.2f} GB with "
          f"one stream, {summary['streams_peak_gb']:.2f} GB with {cores} "
          f"(MLX_BFS_MAX_WIDTH={summary['bfs_max_width']})")
    path = write_report("bench_cpu_streams", started, {
        "model": preset, "batch_size": batch_size, "seq_len": seq_len, "blas_threads": threads,
        "streams": cores, "pairs": rows, **summary}, out)
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
