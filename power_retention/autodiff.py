"""``custom_function``: MLX's custom function with its hand-written vjp bound to the stream of
its forward.

MLX calls a custom function's vjp while it builds the backward graph, under whichever stream
is the default then, not the stream the forward ran on. A computation split across streams
(``cpu_tuning.split_across_cpu_streams``) needs each backward on the stream of its forward;
everywhere else this is exactly ``mx.custom_function``.
"""

from __future__ import annotations

import functools

import mlx.core as mx


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
