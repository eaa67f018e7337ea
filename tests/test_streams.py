"""Heads split across CPU streams (``split_across_cpu_streams``): the same numbers as one
stream, backward passes on the streams of their forwards, and the switch that turns it on."""

import os

import mlx.core as mx
import pytest

from power_retention import RetentionState, estimated_seconds, power_retention
from power_retention.autodiff import custom_function
from power_retention.cpu_tuning import (CPU_STREAMS_VARIABLE, MIN_SECONDS_TO_SPLIT, blas_threads,
                                        loaded_blas, parallel_cpu_streams, set_blas_threads,
                                        split_across_cpu_streams)

from tests.helpers import FP32_TOLERANCE, assert_close, make_inputs

needs_loaded_openblas = pytest.mark.skipif(not loaded_blas().startswith("OpenBLAS"),
                                    reason="OpenBLAS not loaded (run through python -m power_retention)")


def _outputs_and_gradients(inputs, **options):
    """y, the final state and the gradients of a weighted sum of y and the state in q, k, v, log_g."""
    split_power_retention = split_across_cpu_streams(power_retention)

    def loss(q, k, v, log_g):
        y, state = split_power_retention(q, k, v, log_g, return_state=True, **options)
        weighted = (y * mx.cos(mx.arange(y.size).reshape(y.shape))).sum() + state.S.sum() + state.z.sum()
        return weighted, y, state.S, state.z

    (_, *outputs), gradients = mx.value_and_grad(loss, argnums=(0, 1, 2, 3))(*inputs)
    return [*outputs, *gradients]


# Long enough that the cost model's estimate clears the split threshold (short calls stay on
# one stream), odd so that the last chunk is partial.
LENGTHS = {"chunked": 2401, "attention": 1201}


@pytest.mark.parametrize("method", ["chunked", "attention"])
@pytest.mark.parametrize("B,Hq,H", [(1, 4, 2), (2, 1, 1), (1, 6, 3)], ids=lambda x: str(x))
@pytest.mark.parametrize("streams", [2, 3])
def test_split_across_streams_equals_one_stream(monkeypatch, method, B, Hq, H, streams):
    T, d, e, chunk_size = LENGTHS[method], 8, 6, 16
    assert estimated_seconds(method, B=B, T=T, Hq=Hq, H=H, d=d, e=e, deg=2,
                             chunk_size=chunk_size) >= MIN_SECONDS_TO_SPLIT
    inputs = make_inputs(B=B, T=T, Hq=Hq, H=H, d=d, e=e)
    initial = RetentionState(mx.random.uniform(shape=(B, H, 36, e)), mx.random.uniform(shape=(B, H, 36)))
    options = dict(deg=2, method=method, chunk_size=chunk_size, initial_state=initial)
    monkeypatch.setenv(CPU_STREAMS_VARIABLE, "1")
    expected = _outputs_and_gradients(inputs, **options)
    monkeypatch.setenv(CPU_STREAMS_VARIABLE, str(streams))
    assert len(parallel_cpu_streams()) == streams
    actual = _outputs_and_gradients(inputs, **options)
    names = ["y", "S", "z", "dq", "dk", "dv", "dlog_g"]
    for name, a, e in zip(names, actual, expected):
        assert_close(name, a, e, FP32_TOLERANCE)


def test_custom_backward_runs_on_the_stream_of_its_forward():
    seen = []

    def forward(x):
        return x * x

    def vjp(x, cotangent, output):  # one argument: primal and cotangent come unwrapped
        seen.append(mx.default_stream(mx.default_device()))
        return 2 * x * cotangent

    square = custom_function(forward, vjp)
    stream = mx.new_stream(mx.cpu)

    def loss(x):
        with mx.stream(stream):
            return square(x).sum()

    gradient = mx.grad(loss)(mx.array([1.0, -2.0, 3.0]))
    assert seen == [stream]
    assert gradient.tolist() == [2.0, -4.0, 6.0]


@needs_loaded_openblas
def test_streams_follow_single_threaded_blas(monkeypatch):
    monkeypatch.delenv(CPU_STREAMS_VARIABLE, raising=False)
    threads = blas_threads()
    try:
        set_blas_threads(1)
        assert blas_threads() == 1
        assert len(parallel_cpu_streams()) == (os.cpu_count() if os.cpu_count() > 1 else 0)
        set_blas_threads(2)
        assert blas_threads() == 2 and parallel_cpu_streams() == []
    finally:
        set_blas_threads(threads)


@needs_loaded_openblas
@pytest.mark.parametrize("threads", [0, 1.5])
def test_bad_blas_thread_count_is_refused(threads):
    with pytest.raises(ValueError, match="threads"):
        set_blas_threads(threads)
