"""Running the op's heads on several MLX CPU streams at once.

MLX's CPU backend runs the ops of one stream one after another on one thread. With a threaded
BLAS the products use every core, but the elementwise ops, reductions and scans between them
(about a third of the chunked form's time here) use one, and the BLAS threads spin meanwhile.
With a single-threaded BLAS, heads split across one stream per core run side by side,
products and everything else alike. So ``power_retention`` splits its heads across
``parallel_cpu_streams()`` when BLAS runs single-threaded on a multi-core CPU; two streams
calling a threaded BLAS at once contend for its threads and run slower than one stream.

MLX builds its evaluation order breadth-first up to ``MLX_BFS_MAX_WIDTH`` arrays (default 20)
and keeps at most 10 ops in flight: with the default width one stream's part of a large graph
is queued before the other's and the streams take turns. The width a graph needs grows with
its number of chunks (the scan is a loop over them): set ``MLX_BFS_MAX_WIDTH=16384`` before MLX
evaluates anything to let the streams overlap (the benchmark does; MLX's peak memory at
T=32768, chunk 64, fwd+bwd: 9.3 GB instead of 8.9 GB with a width of 1024).

The hand-written backward passes must run on the stream of their forward too: MLX calls a
custom function's vjp while it builds the backward graph, under whichever stream is the
default then. ``custom_function`` binds it.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

from .cpu_backend import blas_threads

# Set to a number of streams to force a split (1: never split), whatever the BLAS.
CPU_STREAMS_VARIABLE = "POWER_RETENTION_CPU_STREAMS"

_streams: list = []


def custom_function(forward, vjp):
    """``mx.custom_function(forward)`` with ``vjp`` as its vjp, run on the stream that was the
    default when the forward was called (one custom function per stream)."""
    by_stream = {}

    @functools.wraps(forward)
    def call(*args):
        stream = mx.default_stream(mx.default_device())
        function = by_stream.get(stream)
        if function is None:
            function = mx.custom_function(forward)

            def vjp_on_stream(*vjp_args):
                with mx.stream(stream):
                    return vjp(*vjp_args)

            function.vjp(vjp_on_stream)
            by_stream[stream] = function
        return function(*args)

    return call


def _requested_streams() -> int:
    value = os.environ.get(CPU_STREAMS_VARIABLE, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{CPU_STREAMS_VARIABLE} must be an integer >= 1, got {value!r}")
        return int(value)
    return (os.cpu_count() or 1) if blas_threads() == 1 else 1


def parallel_cpu_streams() -> list:
    """The CPU streams to split the op's heads across: one per core when the default device is
    the CPU and BLAS runs single-threaded, else none (POWER_RETENTION_CPU_STREAMS=N overrides
    the count). Created once and reused."""
    if mx.default_device() != mx.cpu:
        return []
    count = _requested_streams()
    if count < 2:
        return []
    while len(_streams) < count:
        _streams.append(mx.new_stream(mx.cpu))
    return _streams[:count]


def stream_parts(size: int, streams: list) -> list:
    """(stream, start, stop) for an axis of ``size`` entries cut into near-equal parts, one per
    stream (fewer when the axis is shorter than the list of streams)."""
    parts = min(len(streams), size)
    bounds = [size * i // parts for i in range(parts + 1)]
    return list(zip(streams, bounds, bounds[1:]))
