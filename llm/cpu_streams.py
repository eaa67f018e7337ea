"""Both cores for a training step on the CPU: each micro-batch split by rows across one CPU
stream per core, with a single-threaded BLAS, and the parts' losses and gradients summed.

MLX's CPU backend runs one stream's ops one after another; with a threaded BLAS only the
matrix products use every core, while the elementwise ops, reductions and scans between them
(the cross-entropy's exp over the vocabulary, the norms, the retention's scans) run on one.
Two streams with one BLAS thread each run everything side by side. Whether that pays depends
on the machine and the step (``benchmarks/bench_cpu_streams.py`` times both), so a new run
measures its own step once (``choose``), keeps the answer in the tuning cache beside the
retention form (``power_retention.tuning``) and stores it in its plan: a resumed run splits
as it began, and computes the same numbers.

The parts' sums are not bitwise those of one stream (the rows are summed in another order):
they agree to float32 rounding. MLX must lay its evaluation order out breadth-first wide
enough to interleave the parts (``MLX_BFS_MAX_WIDTH``, read once, at MLX's first evaluation;
``power_retention.cpu_tuning.tune_process`` sets it for our entry points): at its default
width of 20 one part is queued before the other and the streams take turns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time

import mlx.core as mx
from mlx.utils import tree_map

from power_retention import tuning
from power_retention.cpu_tuning import blas_threads, set_blas_threads, stream_parts

# A split is kept only when it measured at least this much faster than one stream: the two
# timings come from a few steps each, and a tie is not worth the extra gradient copy.
MIN_GAIN = 0.9
# Layers of the model the measurement times: the ratio is the blocks' and the head's, and a
# whole deep model would make a run's start wait for several of its steps.
MEASURED_LAYERS = 2


def available() -> int:
    """Streams a step could be split across here: one per core on the CPU backend, else 1."""
    return (os.cpu_count() or 1) if mx.default_device() == mx.cpu else 1


def make_streams(count: int) -> list:
    """``count`` new CPU streams, or none for ``count`` 1 (the default stream runs the step)."""
    return [mx.new_stream(mx.cpu) for _ in range(count)] if count > 1 else []


@contextlib.contextmanager
def single_threaded_blas(active: bool = True):
    """OpenBLAS at one thread inside the block (each stream is one core's), as before after it;
    nothing to do with MLX's own BLAS, which is single-threaded, nor with Accelerate."""
    threads = blas_threads() if active else None  # more than 1 only with OpenBLAS
    if threads is None or threads <= 1:
        yield
        return
    set_blas_threads(1)
    try:
        yield
    finally:
        set_blas_threads(threads)


def split_step(step, arrays: list, streams: list) -> tuple:
    """``step(*arrays)`` -> (loss, gradients) with the arrays' rows cut into one part per stream,
    each part run on its stream; the losses and gradients summed part by part, in order (the
    same order every step, so a run computes the same numbers when it is run again). ``step``
    returns sums over rows (a mean would weigh the parts wrongly)."""
    parts = []
    for stream, start, stop in stream_parts(arrays[0].shape[0], streams):
        with mx.stream(stream):
            parts.append(step(*(array[start:stop] for array in arrays)))
    loss, grads = parts[0]
    for part_loss, part_grads in parts[1:]:
        loss = loss + part_loss
        grads = tree_map(mx.add, grads, part_grads)
    return loss, grads


@dataclasses.dataclass(frozen=True)
class StreamChoice:
    count: int
    source: str  # "measured", "cached", or why nothing was measured
    seconds: dict | None = None  # "1 stream" / "N streams" -> median seconds, when measured

    def describe(self) -> str:
        times = ", ".join(f"{label} {s:.3f} s" for label, s in (self.seconds or {}).items())
        return (f"{self.count} CPU stream{'s' if self.count > 1 else ''} ({self.source}"
                + (f": {times}" if times else "") + ")")


def step_key(shape, dtype: str, count: int) -> str:
    config = shape.config
    form = f"{shape.method} {shape.chunk_size}" if config.mixer == "power" else "softmax"
    return (f"training step {config.mixer} deg={config.deg} L={config.num_hidden_layers} "
            f"D={config.hidden_size} heads={config.num_attention_heads}/{config.num_key_value_heads}"
            f"x{config.head_dim} mlp={config.intermediate_size} conv={config.conv_size} "
            f"vocab={config.vocab_size} B={shape.batch_size} T={shape.seq_len} {form}"
            f"{' checkpointing' if shape.checkpointing else ''} {dtype}"
            f"{f' {shape.adapters}' if shape.adapters is not None else ''}, {count} streams")


def measure(shape, dtype: str, count: int, repeats: int = 2) -> dict:
    """Median seconds of a training micro-step of ``shape`` (llm.plan.RunShape, with
    ``MEASURED_LAYERS`` of its blocks, and its adapters over a frozen base when it fine-tunes)
    on one stream with the threaded BLAS and split across ``count`` streams with one BLAS
    thread each, alternating, after a warm-up of each (which compiles). Draws from the global
    random state (the model's initialisation)."""
    from .adapters import add_adapters, quantize_base
    from .model import RetentionLLM
    from .trainer import DTYPES, micro_step_function

    layers = min(MEASURED_LAYERS, shape.config.num_hidden_layers)
    model = RetentionLLM(dataclasses.replace(shape.config, num_hidden_layers=layers))
    model.set_dtype(DTYPES[dtype])
    adapters = shape.adapters
    if adapters is not None and adapters.kind != "full":  # fine-tuning: a frozen base
        if adapters.bits:
            quantize_base(model, adapters.bits)
        add_adapters(model, adapters.kind, adapters.rank, min(adapters.layers or layers, layers))
    model.checkpointing = shape.checkpointing
    model.set_retention_form(shape.method, shape.chunk_size)
    keys = mx.random.split(mx.random.key(0), 2)
    size = (shape.batch_size, shape.seq_len)
    arrays = [mx.random.randint(0, shape.config.vocab_size, size, key=keys[0]),
              mx.random.randint(0, shape.config.vocab_size, size, key=keys[1]), mx.ones(size)]
    mx.eval(model.parameters(), arrays)
    step = micro_step_function(model)
    streams = make_streams(count)
    label = f"{count} streams"
    times = {"1 stream": [], label: []}
    for _ in range(repeats + 1):
        for name in times:
            with single_threaded_blas(name == label):
                started = time.perf_counter()
                mx.eval(split_step(step, arrays, streams) if name == label else step(*arrays))
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(runs[1:]) for name, runs in times.items()}


def choose(shape, dtype: str = "float32", measure_now: bool | None = None) -> StreamChoice:
    """How many CPU streams a training step of ``shape`` (llm.plan.RunShape) runs on: kept from
    an earlier measurement on this device, else measured now (``measure_now``: default
    ``POWER_RETENTION_TUNE``, on) and kept; 1 where there is one core, a GPU, one sequence per
    micro-batch."""
    count = min(available(), shape.batch_size)
    if count < 2:
        return StreamChoice(1, "one stream: nothing to split across")
    key = step_key(shape, dtype, count)
    entry = tuning.kept(key)
    if entry:
        return StreamChoice(entry["cpu_streams"], "cached", entry.get("seconds"))
    if not (tuning.measuring_enabled() if measure_now is None else measure_now):
        return StreamChoice(1, f"not measured ({tuning.TUNE_VARIABLE}=0)")
    print(f"timing a training step on one CPU stream and split across {count} (once per device "
          f"and shape; {tuning.TUNE_VARIABLE}=0 skips it)", flush=True)
    try:
        seconds = measure(shape, dtype, count)
    except Exception as error:  # noqa: BLE001 (a failed measurement must not stop the run)
        print(f"llm.cpu_streams: measuring {key} failed ({error}); one stream", file=sys.stderr)
        return StreamChoice(1, "measuring failed")
    split = seconds[f"{count} streams"] <= MIN_GAIN * seconds["1 stream"]
    choice = StreamChoice(count if split else 1, "measured", seconds)
    tuning.remember(key, {"cpu_streams": choice.count, "seconds": seconds})
    return choice
