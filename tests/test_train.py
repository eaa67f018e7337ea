"""train.py end to end, in real subprocesses: quick test, kill and resume, guards, errors."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "train.py")]
# Resumed losses must equal the uninterrupted run's (the bound for CPU).
RESUME_TOLERANCE = 1e-6


def corpus(directory: Path) -> Path:
    """A small Python-like corpus: 60 documents with shared structure and distinct names."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(60):
        body = "\n".join(f"    value_{j} = compute(x{i}, {j * i % 17})\n    if value_{j} > {j}:\n"
                         f"        return value_{j}" for j in range(8))
        (directory / f"module_{i:02d}.py").write_text(f"def function_{i}(x{i}):\n{body}\n    return None\n")
    return directory


def small_run(tmp_path, out, *extra, steps=30):
    return [*TRAIN, "--model", "ultra-tiny", "--data", str(corpus(tmp_path / "corpus")),
            "--tokenizer", "byte", "--steps", str(steps), "--batch-size", "4", "--seq-len", "32",
            "--warmup", "3", "--eval-every", "10", "--save-every", "5", "--eval-batches", "2",
            "--patience", "0", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra]


def run(args, timeout=300):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return result


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def steps_logged(run_dir: Path) -> int:
    """The last step in a run's metrics while it is being written (a line may be partial)."""
    step = 0
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                step = max(step, json.loads(line).get("step", 0))
            except json.JSONDecodeError:
                pass
    return step


def kill_after(args, run_dir: Path, step: int):
    """Start train.py with ``args`` and SIGKILL it once ``run_dir`` has logged ``step``."""
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and steps_logged(run_dir) < step:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_quick_test_trains_samples_and_reports(tmp_path):
    out = tmp_path / "quick"
    start = time.perf_counter()
    result = run([*TRAIN, "--quick-test", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "quick test passed" in result.stdout
    assert elapsed < 120  # the 60 s is for an idle machine; this leaves room for CI noise
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_loss"] < summary["initial_val_loss"] - 0.5
    for name in ("train_config.json", "metrics.jsonl", "samples.jsonl",
                 "checkpoints/best/model/model.safetensors", "checkpoints/last/optimizer.safetensors",
                 "checkpoints/last/trainer_state.json"):
        assert (out / name).is_file(), name
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["mode"] for s in samples} == {"greedy", "sampled"}

    sampled = run([*TRAIN, "sample", str(out), "--prompt", "def ", "--max-new-tokens", "20"])
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("def ") and "tokens/s" in sampled.stdout
    reported = run([*TRAIN, "report", str(out)])
    assert reported.returncode == 0, reported.stderr
    assert "best" in reported.stdout and (out / "loss.png").stat().st_size > 1000


def test_killed_run_resumes_exactly(tmp_path):
    """SIGKILL mid-run, --resume: every step's loss equals the uninterrupted run's."""
    whole = run(small_run(tmp_path, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = losses(tmp_path / "whole")
    assert sorted(expected) == list(range(1, 31))

    killed_dir = tmp_path / "killed"
    kill_after(small_run(tmp_path, killed_dir), killed_dir, 17)
    reached = max(losses(killed_dir))
    assert 17 <= reached < 30, f"killed at step {reached}"

    resumed = run([*TRAIN, "--resume", str(killed_dir)])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    got = losses(killed_dir)
    assert sorted(got) == sorted(expected)
    worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected)
    assert worst <= RESUME_TOLERANCE, f"resumed losses differ by {worst:.2e}"


def test_run_of_an_older_version_resumes_with_its_model(tmp_path):
    """A run directory written before the degree was called deg and before the layer options
    existed (train_config.json and config.json without them) resumes with the model it had."""
    out = tmp_path / "old"
    first = run(small_run(tmp_path, out, "--set", "conv_size=0", "--set", "output_norm=true", steps=10))
    assert first.returncode == 0, first.stderr[-3000:]
    options = json.loads((out / "train_config.json").read_text())
    options["power"] = options.pop("deg")
    del options["model_fields"]
    (out / "train_config.json").write_text(json.dumps(options))
    for config_path in out.glob("checkpoints/*/model/config.json"):
        config = json.loads(config_path.read_text())
        config["power"] = config.pop("deg")
        for name in ("gate_init", "conv_size", "output_norm", "rope"):
            del config[name]
        config_path.write_text(json.dumps(config))
    for manifest in out.rglob("checksums.json"):  # older versions wrote none
        manifest.unlink()

    resumed = run([*TRAIN, "--resume", str(out), "--steps", "14"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert sorted(losses(out)) == list(range(1, 15))
    saved = json.loads((out / "checkpoints" / "last" / "model" / "config.json").read_text())
    assert (saved["deg"], saved["conv_size"], saved["gate_init"], saved["rope"]) == (2, 0, 0.999, False)


def test_set_changes_the_model_and_rejects_unknown_fields(tmp_path):
    out = tmp_path / "wide"
    result = run(small_run(tmp_path, out, "--set", "hidden_size=32", "--set", "output_norm=true",
                           steps=4))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "checkpoints" / "last" / "model" / "config.json").read_text())
    assert (config["hidden_size"], config["head_dim"], config["output_norm"]) == (32, 16, True)
    for bad, message in ((["--set", "hidden=3"], "'hidden' is not a model field"),
                         (["--set", "vocab_size=3"], "'vocab_size' is not a model field"),
                         (["--set", "conv_size"], "expected FIELD=VALUE"),
                         (["--set", "gate_init=2"], "gate_init must be a number in \\(0, 1\\)")):
        failed = run(small_run(tmp_path, tmp_path / "bad", *bad, steps=4))
        assert failed.returncode != 0 and re.search(message, failed.stderr), (bad, failed.stderr[-2000:])
        assert not (tmp_path / "bad").exists()


def test_kill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    """Kills at staggered moments while a checkpoint is written every step."""
    out = tmp_path / "run"
    args = small_run(tmp_path, out, "--save-every", "1", steps=120)
    from llm.trainer import load_checkpoint, make_optimizer, TrainConfig
    from llm import RetentionLLM

    for delay in (4.0, 4.3, 4.6):
        process = subprocess.Popen(args if not (out / "checkpoints").exists() else [*TRAIN, "--resume", str(out)],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        last = out / "checkpoints" / "last"
        if not last.exists():
            continue
        model = RetentionLLM.from_pretrained(last / "model")
        state = load_checkpoint(last, model, make_optimizer(TrainConfig()))
        assert state["step"] >= 1
        leftovers = [p.name for p in (out / "checkpoints").iterdir()
                     if p.name not in ("last", "previous", "best")]
        assert all(name.startswith(".") for name in leftovers)  # hidden temporaries only
    finished = run([*TRAIN, "--resume", str(out)])
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert sorted(losses(out)) == list(range(1, 121))


def test_non_finite_steps_are_skipped_then_rolled_back(tmp_path):
    out = tmp_path / "run"
    result = run(small_run(tmp_path, out, "--inject", "nan:8,12,13,14", "--max-bad-steps", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 8: non-finite loss or gradient, step skipped" in result.stdout
    assert "ROLLBACK" in result.stdout and "learning rate halved" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "rollback"] == [10]
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["lr_scale"] == 0.5 and state["rollbacks"] == 1 and state["skipped_steps"] == 4
    assert sorted(losses(out)) == [s for s in range(1, 31) if s != 8]  # 8 skipped, 11-14 redone


def test_early_stopping_on_a_plateau(tmp_path):
    out = tmp_path / "run"
    result = run(small_run(tmp_path, out, "--patience", "1", "--min-delta", "100", steps=60))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"].startswith("early stop") and summary["steps"] == 20


def test_existing_run_is_never_written_over(tmp_path):
    out = tmp_path / "run"
    assert run(small_run(tmp_path, out, steps=5)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run(small_run(tmp_path, out, steps=5))
    assert again.returncode != 0 and "--resume" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    different = run([*TRAIN, "--resume", str(out), "--lr", "0.1"])
    assert different.returncode != 0 and "differs from the run's" in different.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_plan_for_the_failing_users_case():
    """tiny with one 256-wide head at power 2 on an 8 GB Mac: a feasible plan, and a table
    that says why each rung tried was or was not enough."""
    result = run([*TRAIN, "plan", "--model", "tiny", "--head-dim", "256", "--device-profile", "8gb",
                  "--batch-size", "16", "--seq-len", "2048"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "1 heads of 256" in out and "memory plan for 8gb" in out
    rows = [line for line in out.splitlines() if line.startswith("  ") and line.strip()[:2] in
            {f"{i}." for i in range(7)}]
    assert rows[0].split()[1:3] == ["as", "requested"] and " no " in rows[0] and ">" in rows[0]
    assert rows[-1].rstrip().endswith("fits") and all(" no " in row for row in rows[:-1])
    assert "plan: " in out


def test_no_degrade_turns_a_misfit_into_an_error_with_the_table(tmp_path):
    result = run(small_run(tmp_path, tmp_path / "run", "--memory-budget", "0.001", "--no-degrade"))
    assert result.returncode != 0
    assert "0. as requested" in result.stdout and "does not fit" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_small_budget_is_planned_for_and_kept_on_resume(tmp_path):
    out = tmp_path / "run"
    result = run(small_run(tmp_path, out, "--memory-budget", "0.004", steps=6))
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads((out / "train_config.json").read_text())["plan"]
    assert plan["rung"] != "0. as requested" and plan["checkpointing"]
    resumed = run([*TRAIN, "--resume", str(out), "--steps", "8"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # The resumed run starts from the saved plan; it is not planned again from the top (it
    # may still step further down if its measured peak is over this artificial budget).
    assert f"plan: {plan['rung']}" in resumed.stdout and "0. as requested" not in resumed.stdout


def test_memory_error_mid_run_steps_down_and_loses_no_step(tmp_path):
    """An injected Metal resource-limit error at step 7: the trainer re-plans one rung down
    (gradient checkpointing), redoes step 7 from the state before it, and every step's loss
    equals the uninterrupted run's (checkpointing recomputes the same arithmetic)."""
    plain = run(small_run(tmp_path, tmp_path / "plain", steps=12))
    assert plain.returncode == 0, plain.stderr[-2000:]
    failing = run(small_run(tmp_path, tmp_path / "failing", "--inject", "oom:7", steps=12))
    assert failing.returncode == 0, failing.stderr[-2000:]
    assert "MEMORY: step 7 failed" in failing.stdout
    plan = json.loads((tmp_path / "failing" / "train_config.json").read_text())["plan"]
    assert plan["rung"] == "1. gradient checkpointing"
    expected, got = losses(tmp_path / "plain"), losses(tmp_path / "failing")
    assert sorted(got) == list(range(1, 13))
    assert max(abs(got[s] - expected[s]) / expected[s] for s in expected) <= RESUME_TOLERANCE


@pytest.mark.parametrize("options", [["--optimizer", "lion", "--lr", "3e-4"], ["--optimizer", "muon"],
                                     ["--dtype", "bfloat16"], ["--mixer", "softmax"],
                                     ["--power", "1"], ["--grad-accum", "2", "--no-compile"],
                                     ["--document-resets"]],
                         ids=["lion", "muon", "bfloat16", "softmax", "power1", "accumulate-uncompiled",
                              "document-resets"])
def test_options_train(tmp_path, options):
    """Each optimizer, dtype and mixer trains: finite losses, and the validation loss falls."""
    out = tmp_path / "run"
    result = run(small_run(tmp_path, out, *options, steps=20))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_loss"] < summary["initial_val_loss"] - 0.3, summary
    assert summary["skipped_steps"] == 0
    document_start = json.loads((out / "checkpoints" / "last" / "model" / "config.json").read_text())[
        "document_start_id"]
    assert document_start == (ByteTokenizer().bos_id if "--document-resets" in options else None)


def test_legacy_command_form(tmp_path):
    """`python train.py --mode llm --model ultra-tiny --steps N`, the form existing users type."""
    out = tmp_path / "run"
    args = [arg for arg in small_run(tmp_path, out, steps=8) if arg not in ("--warmup", "3")]
    result = run([args[0], args[1], "--mode", "llm", *args[2:]])
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 8
    assert json.loads((out / "train_config.json").read_text())["warmup"] == 0  # min(100, 8 // 10)


def test_memory_errors_down_to_a_model_change_restart_loudly(tmp_path):
    """Step 3 fails at every rung that keeps the model (as requested, checkpointing, two
    micro-batch splits, four forms: 8 failures): the trainer then narrows the heads, restarts
    from step 0 with that model, says so, and keeps the old checkpoints and logs."""
    out = tmp_path / "run"
    result = run(small_run(tmp_path, out, "--inject", "oom:" + ",".join(["3"] * 8), steps=8))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RESTARTING FROM STEP 0" in result.stdout
    plan = json.loads((out / "train_config.json").read_text())["plan"]
    assert plan["rung"] == "4. heads of 16 x 4" and plan["model"]["head_dim"] == 16
    assert sorted(losses(out)) == list(range(1, 9))
    kept = [p for p in out.iterdir() if p.name.startswith("checkpoints-before-")]
    assert len(kept) == 1 and (kept[0] / "metrics.jsonl").is_file()
    config = json.loads((out / "checkpoints" / "last" / "model" / "config.json").read_text())
    assert (config["head_dim"], config["num_attention_heads"]) == (16, 4)


def test_a_skipped_final_step_still_evaluates_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    result = run(small_run(tmp_path, out, "--inject", "nan:12", "--eval-every", "100", steps=12))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 12: non-finite" in result.stdout and "eval at step 12" in result.stdout
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["skipped_steps"] == 1
    assert json.loads((out / "summary.json").read_text())["best_step"] == 12


def test_weight_decay_spares_gains_and_biases_the_gate_included():
    """One AdamW step on zero gradients moves only what weight decay applies to: the matrices
    (the convolution's taps included), never the norm gains or the gate's bias, so the gate
    does not drift from its initial value by decay alone."""
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from llm import RetentionLLM, create_model_config
    from llm.trainer import TrainConfig, make_optimizer

    model = RetentionLLM(create_model_config("ultra-tiny"))
    before = dict(tree_flatten(model.parameters()))
    optimizer = make_optimizer(TrainConfig(lr=0.1, weight_decay=0.5))
    optimizer.update(model, tree_map(mx.zeros_like, model.trainable_parameters()))
    moved = {name for name, value in tree_flatten(model.parameters())
             if not mx.array_equal(value, before[name]).item()}
    assert "layers.0.mixer.gate_proj.bias" not in moved
    assert not any(name.endswith(("norm_weight", "layernorm.weight", "norm.weight")) for name in moved)
    assert {"layers.0.mixer.conv.weight", "layers.0.mixer.q_proj.weight"} <= moved

