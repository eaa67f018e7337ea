"""Fine-tuning with adapters through train.py, in real subprocesses: only the adapters train
and are saved, the base stays bit for bit, a killed run resumes exactly, QLoRA trains over a
4-bit base, fuse writes the merged model, and a tiny training set is reported as overfitting."""

import hashlib
import json
import math
import random
import re
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_map

from llm import load
from llm.adapters import load_adapters, quantize_base
from tests.helpers import assert_close
from tests.test_train import RESUME_TOLERANCE, TRAIN, kill_after, losses, run, small_run

# Fusing computes W + scale * B^T A^T in fp32 once, where the adapter layer adds the two
# products at every call: the same sums in another order, within fp32 rounding.
FUSED_TOLERANCE = 1e-5


def reverse_task(path: Path, words: list[str]) -> Path:
    """Prompt/completion pairs: "reverse abc =" -> " cba."."""
    path.write_text("".join(json.dumps({"prompt": f"reverse {w} =", "completion": f" {w[::-1]}."}) + "\n"
                            for w in words))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    """A base (a run directory: ultra-tiny pretrained for 60 steps on byte-level code, so that it
    knows letters and spacing) and train/validation files of one string transformation."""
    directory = tmp_path_factory.mktemp("finetune")
    pretrained = run(small_run(directory, directory / "base", "--batch-size", "16", "--seq-len", "64",
                               "--lr", "1e-2", steps=60))
    assert pretrained.returncode == 0, pretrained.stderr[-3000:]
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))) for _ in range(240)]
    return {"base": directory / "base", "train": reverse_task(directory / "train.jsonl", words[:200]),
            "val": reverse_task(directory / "val.jsonl", words[200:]), "cache": directory / "cache"}


def finetune(task, out, *extra, steps=24):
    return [*TRAIN, "finetune", str(task["base"]), "--data", str(task["train"]), "--val-data",
            str(task["val"]), "--steps", str(steps), "--batch-size", "8", "--seq-len", "48",
            "--warmup", "2", "--eval-every", "8", "--save-every", "4", "--eval-batches", "2",
            "--patience", "0", "--rank", "4", "--out", str(out), "--cache-dir", str(task["cache"]),
            *extra]


def fingerprint(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_adapters_train_alone_and_fuse_into_the_base(task, tmp_path):
    """Loss falls; the base's files are untouched; checkpoints hold the adapters only (mlx-lm's
    adapter directory); `train.py fuse` writes a model equal to base + adapters."""
    before = fingerprint(task["base"])
    out = tmp_path / "run"
    result = run(finetune(task, out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert fingerprint(task["base"]) == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_loss"] < summary["initial_val_loss"] - 0.5
    assert 0 < summary["trainable_parameters"] < summary["parameters"] / 4
    best = out / "checkpoints" / "best"
    assert sorted(p.name for p in best.iterdir()) == [
        "adapters", "checksums.json", "optimizer.safetensors", "trainer_state.json"]
    saved = mx.load(str(best / "adapters" / "adapters.safetensors"))
    assert saved and all(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for name in saved)
    adapter_config = json.loads((best / "adapters" / "adapter_config.json").read_text())
    base_model = task["base"] / "checkpoints" / "best" / "model"  # a run directory's best
    assert adapter_config["model"] == str(base_model.resolve())
    assert adapter_config["lora_parameters"]["rank"] == 4

    fused = run([*TRAIN, "fuse", str(out)])
    assert fused.returncode == 0, fused.stderr[-3000:]
    model, tokenizer = load(out / "fused")
    base, _ = load(base_model)
    load_adapters(base, best / "adapters")
    tokens = mx.array([tokenizer.encode("reverse abcde =")])
    assert_close("fused logits", model(tokens), base(tokens), FUSED_TOLERANCE)


def test_killed_finetune_resumes_exactly(task, tmp_path):
    """SIGKILL mid-run, train.py --resume: every step's loss equals the uninterrupted run's."""
    whole = run(finetune(task, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = losses(tmp_path / "whole")
    killed = tmp_path / "killed"
    kill_after(finetune(task, killed), killed, 13)
    assert 13 <= max(losses(killed)) < 24
    resumed = run([*TRAIN, "--resume", str(killed)])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got = losses(killed)
    assert sorted(got) == sorted(expected)
    worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected)
    assert worst <= RESUME_TOLERANCE, f"resumed losses differ by {worst:.2e}"


def test_qlora_trains_over_a_4bit_base_and_fuses_quantized(task, tmp_path):
    out = tmp_path / "qlora"
    result = run(finetune(task, out, "--quantize-base", "4", "--adapter", "dora", steps=16))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "over a 4-bit base" in result.stdout
    steps = losses(out)
    assert all(map(lambda loss: loss == loss and abs(loss) < 1e9, steps.values())) and len(steps) == 16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_loss"] < summary["initial_val_loss"] - 0.3

    fused = run([*TRAIN, "fuse", str(out), "--checkpoint", "last"])
    assert fused.returncode == 0, fused.stderr[-3000:]
    assert json.loads((out / "fused" / "config.json").read_text())["quantization"]["bits"] == 4
    model, tokenizer = load(out / "fused")
    base, _ = load(task["base"] / "checkpoints" / "best" / "model")
    quantize_base(base, 4)
    load_adapters(base, out / "checkpoints" / "last" / "adapters")
    tokens = mx.array([tokenizer.encode("reverse abcde =")])
    # The fused layers are quantized again: the merged weights differ from base + adapter by up
    # to half a 4-bit step of each group, so only the greedy prediction is compared.
    assert (model(tokens).argmax(-1) == base(tokens).argmax(-1)).mean().item() >= 0.9


def test_plan_knows_adapters(task):
    plain = run([*TRAIN, "plan", "--base", str(task["base"]), "--adapter", "full"])
    qlora = run([*TRAIN, "plan", "--base", str(task["base"]), "--adapter", "lora",
                 "--quantize-base", "4"])
    assert plain.returncode == 0 and qlora.returncode == 0, plain.stderr + qlora.stderr
    assert "4-bit base" in qlora.stdout

    def part(stdout, name):
        value, unit = stdout.split(f" {name} ")[1].split(",")[0].split()[:2]
        return float(value) * (1e9 if unit == "GB" else 1e6)

    # Adapters: optimizer state for a few thousand parameters, not the whole model's.
    assert part(qlora.stdout, "optimizer_state") < part(plain.stdout, "optimizer_state") / 4
    assert part(qlora.stdout, "parameters") < part(plain.stdout, "parameters")


def test_a_tiny_training_set_is_reported_as_overfitting(task, tmp_path):
    """Eight examples and many steps: the training loss falls, validation does not follow; the
    run says so loudly, and the best checkpoint is an earlier step than the last."""
    small = reverse_task(tmp_path / "small.jsonl", ["abc", "bcd", "cde", "def", "efg", "fgh", "gha", "hab"])
    out = tmp_path / "overfit"
    # Validation stops following from about step 24 (flagged at 24, 32, 40 and 48 in 120 steps).
    args = finetune(task, out, "--rank", "16", steps=48)
    args[args.index("--data") + 1] = str(small)
    args[args.index("--save-every") + 1] = "48"  # the best checkpoint is kept at evaluations
    result = run(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "WARNING: OVERFITTING" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("overfitting") in ("flat", "rising") for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] < summary["steps"]


def test_resume_refuses_a_base_changed_since(task, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(task["base"] / "checkpoints" / "best" / "model", base)
    out = tmp_path / "run"
    first = run(finetune({**task, "base": base}, out, steps=4))
    assert first.returncode == 0, first.stderr[-3000:]
    model, tokenizer = load(base)
    model.update(tree_map(lambda p: p * 1.01, model.parameters()))
    model.save_pretrained(base, tokenizer)
    resumed = run([*TRAIN, "--resume", str(out), "--steps", "8"])
    assert resumed.returncode != 0 and "Traceback" not in resumed.stderr
    assert f"--base {base.resolve()} has changed since this run began" in resumed.stderr


def test_epochs_set_the_steps_from_the_data(task, tmp_path):
    out = tmp_path / "epochs"
    args = finetune(task, out, "--epochs", "1.5")
    args[args.index("--steps"):args.index("--steps") + 2] = []
    result = run(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train_tokens = int(re.search(r"validation documents, ([\d,]+) / ", result.stdout).group(1).replace(",", ""))
    windows = (train_tokens - 1) // 48
    steps = json.loads((out / "train_config.json").read_text())["steps"]
    assert steps == math.ceil(1.5 * windows / 8) == json.loads((out / "summary.json").read_text())["steps"]
