"""A training step's micro-batch split across CPU streams (``llm.cpu_streams``): the same loss
and gradients as one stream, the choice measured once and kept, and whole runs that split
(in real train.py subprocesses) training as one stream does and resuming exactly."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from llm import RetentionLLM, create_model_config, cpu_streams
from llm.memory import Adapters, estimate
from llm.plan import RunShape
from llm.trainer import micro_step_function
from power_retention import tuning

from tests.test_train import RESUME_TOLERANCE, TRAIN, kill_after, losses, run, small_run

# The parts' sums add the rows in another order than one stream's: float32 rounding of sums
# over 2 x 64 token losses and of the gradients' reductions, a few ulps of the largest entry.
SPLIT_TOLERANCE = 1e-5


def _model_and_batch(batch_size=4, seq_len=48):
    mx.random.seed(0)
    config = create_model_config("ultra-tiny", num_hidden_layers=2)
    model = RetentionLLM(config)
    keys = mx.random.split(mx.random.key(1), 3)
    tokens = mx.random.randint(0, config.vocab_size, (batch_size, seq_len + 1), key=keys[0])
    mask = (mx.random.uniform(shape=(batch_size, seq_len), key=keys[1]) > 0.2).astype(mx.float32)
    return model, [tokens[:, :-1], tokens[:, 1:], mask]


@pytest.mark.parametrize("streams", [2, 3])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_split_step_equals_one_stream(streams, compiled):
    model, arrays = _model_and_batch()
    step = micro_step_function(model, compiled)
    loss, grads = step(*arrays)
    with cpu_streams.single_threaded_blas():
        split_loss, split_grads = cpu_streams.split_step(step, arrays, cpu_streams.make_streams(streams))
        mx.eval(split_loss, split_grads)
    assert abs(split_loss.item() - loss.item()) <= SPLIT_TOLERANCE * abs(loss.item())
    for (name, whole), (_, part) in zip(tree_flatten(grads), tree_flatten(split_grads)):
        scale = mx.abs(whole).max().item()
        assert mx.abs(whole - part).max().item() <= SPLIT_TOLERANCE * scale, name


def test_more_streams_than_rows_uses_one_per_row():
    model, arrays = _model_and_batch(batch_size=2)
    step = micro_step_function(model, compiled=False)
    loss, _ = step(*arrays)
    split_loss, _ = cpu_streams.split_step(step, arrays, cpu_streams.make_streams(4))
    assert abs(split_loss.item() - loss.item()) <= SPLIT_TOLERANCE * abs(loss.item())


def test_single_threaded_blas_restores_the_threads():
    from power_retention.cpu_tuning import blas_threads

    before = blas_threads()
    with cpu_streams.single_threaded_blas():
        inside = blas_threads()
    assert inside == 1 or before is None
    assert blas_threads() == before


@pytest.mark.parametrize("adapters", [None, Adapters("lora", rank=4), Adapters("dora", 4, 1, bits=4)],
                         ids=["pretraining", "lora", "qdora-last-block"])
def test_choice_is_measured_once_then_kept(tmp_path, monkeypatch, adapters):
    monkeypatch.setenv(tuning.CACHE_VARIABLE, str(tmp_path))
    config = create_model_config("ultra-tiny", num_hidden_layers=2)
    shape = RunShape(config, batch_size=4, grad_accum=1, seq_len=32, method="attention", chunk_size=32,
                     adapters=adapters)
    if cpu_streams.available() < 2:
        assert cpu_streams.choose(shape).count == 1
        return
    first = cpu_streams.choose(shape)
    assert first.source == "measured" and set(first.seconds) == {"1 stream", "2 streams"}
    expected = 2 if first.seconds["2 streams"] <= cpu_streams.MIN_GAIN * first.seconds["1 stream"] else 1
    assert first.count == expected
    kept = json.loads((tmp_path / "tuning.json").read_text())
    assert any("training step" in key for device in kept["devices"].values() for entries in device.values()
               for key in entries)
    again = cpu_streams.choose(shape)
    assert (again.count, again.source, again.seconds) == (first.count, "cached", first.seconds)
    assert "training step" in tuning.report()


def test_nothing_to_split_or_measure_means_one_stream(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_VARIABLE, str(tmp_path))
    config = create_model_config("ultra-tiny", num_hidden_layers=1)
    one_row = RunShape(config, batch_size=1, grad_accum=1, seq_len=32)
    assert cpu_streams.choose(one_row).count == 1
    monkeypatch.setenv(tuning.TUNE_VARIABLE, "0")
    not_measured = cpu_streams.choose(RunShape(config, batch_size=4, grad_accum=1, seq_len=32))
    assert not_measured.count == 1 and not (tmp_path / "tuning.json").exists()


def test_estimate_counts_a_gradient_copy_per_stream():
    config = create_model_config("ultra-tiny")
    one = estimate(config, 8, 64)
    two = estimate(config, 8, 64, cpu_streams=2)
    assert two.gradients == 2 * one.gradients and two.activations == one.activations
    assert estimate(config, 1, 64, cpu_streams=2).gradients == estimate(config, 1, 64).gradients


def test_split_run_trains_as_one_stream_and_resumes_exactly(tmp_path):
    """--cpu-streams 2 against 1: the same losses to float32 rounding, compounded over the
    steps (the parameters drift apart by rounding); killed and resumed, the split run's own
    losses again exactly (its plan keeps the split)."""
    steps = 12
    one = run(small_run(tmp_path, tmp_path / "one", "--cpu-streams", "1", steps=steps))
    assert one.returncode == 0, one.stderr[-3000:]
    split = run(small_run(tmp_path, tmp_path / "split", "--cpu-streams", "2", steps=steps))
    assert split.returncode == 0, split.stderr[-3000:]
    assert "each split across 2 CPU streams" in split.stdout
    assert json.loads((tmp_path / "split" / "train_config.json").read_text())["plan"]["cpu_streams"] == 2
    expected, got = losses(tmp_path / "one"), losses(tmp_path / "split")
    assert abs(got[1] - expected[1]) <= SPLIT_TOLERANCE * abs(expected[1])
    # Adam's first steps divide by tiny second moments, which amplifies rounding; 1e-3 over 12
    # steps still tells a split that drops or double-counts a row (losses differ by > 1e-2).
    assert max(abs(got[s] - expected[s]) / expected[s] for s in expected) <= 1e-3

    killed = tmp_path / "killed"
    kill_after(small_run(tmp_path, killed, "--cpu-streams", "2", steps=steps), killed, 7)
    resumed = run([*TRAIN, "--resume", str(killed)])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    again = losses(killed)
    assert sorted(again) == sorted(got)
    assert max(abs(again[s] - got[s]) / abs(got[s]) for s in got) <= RESUME_TOLERANCE
