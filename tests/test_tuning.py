"""The form and chunk size measured per device (power_retention.tuning): measured once, kept
on disk for every later process, the cost model where measuring is off, and the op's default."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from llm import ModelConfig, create_model_config, load
from llm.config import param_count
from llm.flops import training_flops_per_token
from power_retention import expanded_dim, power_retention, tuning

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(B=1, T=96, Hq=2, H=2, d=8, e=8, deg=2, gated=True)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_VARIABLE, str(tmp_path))
    monkeypatch.setattr(tuning, "_chosen", {})  # this process's memory of earlier choices
    return tmp_path / "tuning.json"


def choose_in_a_new_process(env) -> dict:
    code = ("import json; from power_retention import tuning; "
            f"print(json.dumps(tuning.choose(**{SHAPE!r}, mode='training', measure=False).__dict__))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_shape_is_measured_once_and_kept_for_later_processes(cache):
    choice = tuning.choose(**SHAPE, mode="training", measure=True)
    assert choice.source == "measured"
    assert set(choice.seconds) == {"chunked 32", "chunked 64", "attention"}  # chunks below T
    fastest = min(choice.seconds, key=choice.seconds.get)
    assert fastest.startswith(choice.method)
    assert tuning.choose(**SHAPE, mode="training").source == "cached"
    later = choose_in_a_new_process({**os.environ, tuning.CACHE_VARIABLE: str(cache.parent)})
    assert (later["method"], later["chunk_size"], later["source"]) == \
        (choice.method, choice.chunk_size, "cached")
    # Another length within the same power of two shares the choice; another mode does not.
    assert tuning.choose(**{**SHAPE, "T": 100}, mode="training", measure=False).source == "cached"
    assert tuning.choose(**SHAPE, mode="forward", measure=False).source == "cost model"
    report = subprocess.run([sys.executable, "-m", "power_retention.tuning"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, tuning.CACHE_VARIABLE: str(cache.parent)})
    assert report.returncode == 0, report.stderr
    assert "B=1 T<=128 Hq=2 H=2 d=8 e=8 deg=2 gated float32 training" in report.stdout


def test_measuring_off_takes_the_cost_model_and_writes_nothing(cache, monkeypatch):
    monkeypatch.setenv(tuning.TUNE_VARIABLE, "0")
    choice = tuning.choose(**SHAPE)
    assert (choice.method, choice.chunk_size, choice.source) == ("attention", 64, "cost model")
    assert not cache.exists()
    monkeypatch.setenv(tuning.TUNE_VARIABLE, "yes")
    with pytest.raises(ValueError, match="POWER_RETENTION_TUNE must be 1"):
        tuning.choose(**SHAPE)


def test_an_unreadable_cache_is_measured_again_and_rewritten(cache):
    cache.write_text("{ not json")
    assert tuning.choose(**SHAPE, measure=True).source == "measured"
    assert json.loads(cache.read_text())["format"] == tuning.FORMAT


def test_the_op_default_is_the_kept_choice_exactly(cache):
    q, k, v = (mx.random.normal((1, 300, 2, 8)) for _ in range(3))
    log_g = -0.1 * mx.random.uniform(shape=(1, 300, 2))
    y = power_retention(q, k, v, log_g)
    choice = tuning.choose(**{**SHAPE, "T": 300})
    assert choice.source == "cached" and choice.method in ("chunked", "attention")
    chosen = power_retention(q, k, v, log_g, method=choice.method, chunk_size=choice.chunk_size)
    assert mx.array_equal(y, chosen).item()
    # method="chunked" with no chunk size chooses among the chunk sizes only.
    assert tuning.choose(**{**SHAPE, "T": 300}, method="chunked").method == "chunked"


def test_train_py_measures_the_training_step_and_keeps_the_choice_in_its_plan(tmp_path, cache):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(300)))
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "--model", "ultra-tiny", "--set", "chunk_size=null",
         "--data", str(corpus), "--tokenizer", "byte", "--steps", "2", "--batch-size", "2",
         "--seq-len", "64", "--eval-batches", "1", "--out", str(out),
         "--cache-dir", str(tmp_path / "tokens")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, tuning.CACHE_VARIABLE: str(cache.parent)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "retention form for this step on this device:" in result.stdout
    plan = json.loads((out / "train_config.json").read_text())["plan"]
    kept = next(iter(json.loads(cache.read_text())["devices"].values()))
    entries = next(iter(kept.values()))
    (form,) = [entry for key, entry in entries.items() if "method" in entry]
    assert (plan["method"], plan["chunk_size"]) == (form["method"], form["chunk_size"])
    # And, on more than one core, whether to split its steps across CPU streams (llm.cpu_streams).
    streams = [entry for key, entry in entries.items() if key.startswith("training step")]
    assert [entry["cpu_streams"] for entry in streams] == ([plan["cpu_streams"]] if os.cpu_count() > 1 else [])
    # The summary's model FLOPs utilisation counts the products of the form it ran.
    summary = json.loads((out / "summary.json").read_text())
    config = load(out / "checkpoints" / "last" / "model")[0].config
    assert summary["model_flops_per_token"] == training_flops_per_token(
        config, 64, plan["method"], plan["chunk_size"])
    assert summary["mfu"] > 0 and summary["matmul_peak_gflops"] > 0
    # The second step's report (the first compiles) is the steady step's utilisation.
    assert summary["step_mfu"] > 0
    assert (f"MFU {100 * summary['mfu']:.1f}%, {100 * summary['step_mfu']:.1f}% per step after "
            f"the first, of a") in result.stdout


def test_model_flops_count_the_causal_half_of_every_weight_matrix():
    config = create_model_config("ultra-tiny")
    L, Hq, H, d = (config[name] for name in ("num_hidden_layers", "num_attention_heads",
                                             "num_key_value_heads", "head_dim"))
    weights = param_count(ModelConfig(**config))  # tied embeddings: the head's product
    softmax = ModelConfig(**{**config, "mixer": "softmax", "rope": None})
    assert training_flops_per_token(softmax, 128) == \
        6 * param_count(softmax) + 3 * L * 2 * Hq * 64 * 2 * d
    power = ModelConfig(**config)
    D = expanded_dim(d, power.deg)
    state = 2 * (H + Hq) * D * (d + 1)
    assert training_flops_per_token(power, 1024, "chunked", 32) == \
        6 * weights + 3 * L * (2 * Hq * 16 * (2 * d + 1) + state)
    assert training_flops_per_token(power, 1024, "chunked", 32, frozen=True) == \
        4 * weights + 3 * L * (2 * Hq * 16 * (2 * d + 1) + state)


@pytest.mark.parametrize("arguments, message", [
    (["--tune", "T=x"], "--tune: expected NAME=INT"),
    (["--tune", "B=1,H=4"], "--tune needs T="),
    (["--mode", "backward"], "invalid choice: 'backward'"),
], ids=["tune-not-an-integer", "tune-without-T", "unknown-mode"])
def test_the_tuning_command_names_what_is_wrong(cache, arguments, message):
    result = subprocess.run([sys.executable, "-m", "power_retention.tuning", *arguments],
                            capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, tuning.CACHE_VARIABLE: str(cache.parent)})
    assert result.returncode != 0 and message in result.stderr + result.stdout


def test_choose_names_a_bad_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        tuning.choose(**SHAPE, mode="backward")


def test_measuring_leaves_the_global_random_state_alone(cache):
    mx.random.seed(7)
    expected = mx.random.normal((4,))
    mx.random.seed(7)
    assert tuning.choose(**SHAPE, measure=True).source == "measured"
    assert mx.array_equal(mx.random.normal((4,)), expected).item()


def test_a_shape_first_seen_inside_compile_is_measured_there(cache):
    q, k, v = (mx.random.normal((1, 200, 2, 8)) for _ in range(3))
    compiled = mx.compile(lambda q, k, v: power_retention(q, k, v, check_gates=False))
    y = compiled(q, k, v)
    choice = tuning.choose(**{**SHAPE, "T": 200, "gated": False})
    assert choice.source == "cached"  # the candidates ran on inputs of their own
    assert mx.array_equal(y, power_retention(q, k, v)).item()
