"""Train a RetentionLLM on a real corpus, and never lose the run.

    python train.py --model ultra-tiny                   # the Python standard library's source
    python train.py --model tiny --data corpus.txt --steps 5000
    python train.py --resume runs/ultra-tiny-20261122-0930      # continue a stopped run exactly
    python train.py sample RUN_DIR --prompt "def main("
    python train.py report RUN_DIR                       # summary and a loss / learning-rate plot
    python train.py --quick-test                         # a whole run in under a minute

A run directory holds train_config.json (every option), metrics.jsonl (every step and
evaluation), samples.jsonl (generations at each evaluation), and checkpoints/{last,best}/,
each a complete model directory (config.json, model.safetensors, tokenizer) plus the
optimizer's state and the trainer's position (trainer_state.json). Checkpoints are written
to a temporary directory and renamed into place, so a kill at any moment leaves the last
good one loadable, and --resume continues from it with the same losses as an uninterrupted
run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import click
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from llm import ModelConfig, RetentionLLM, create_model_config, load_tokenizer, param_count, train_tokenizer
from llm.config import PRESETS, RENAMED_FIELDS, describe, fields_added_later
from llm.memory import estimate, format_bytes
from llm.data import (DEFAULT_DATA, BatchSampler, cache_key, documents_fingerprint, read_documents,
                      tokenize_corpus, unigram_entropy, validation_batches)
from llm.generate import generate_tokens
from llm.plan import DEVICE_PROFILES, RunShape, device_limits, plan_training
from llm.tokenizer import ByteTokenizer
from llm.weights import read_weights, recover_directory, replace_directory
from power_retention.cpu_tuning import tune_process

OPTIMIZERS = ("adamw", "lion", "muon")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# Options that may differ when resuming (to extend or re-schedule a run); any other option
# given on the command line must match the run's train_config.json.
RESUMABLE_OVERRIDES = ("steps", "eval_every", "eval_batches", "save_every", "patience")
# Muon's orthogonalized updates have unit spectral norm, far larger per entry than Adam's:
# its hidden matrices take this multiple of --lr (Keller Jordan's setup: 0.02 against 3e-3).
MUON_LR_MULTIPLIER = 6.0
# Sampled continuations (temperature 0.8) flagged as collapsed: nearly all one token, or
# nearly no distinct bigrams. Byte-level code is legitimately space-heavy (indentation), so
# the thresholds are far from what a healthy model produces there (top share ~0.3).
COLLAPSE_TOP_SHARE = 0.8
COLLAPSE_DISTINCT_2 = 0.05
SAMPLE_PROMPT_TOKENS = 24
SAMPLE_NEW_TOKENS = 48


def default_cache_dir() -> Path:
    return Path(os.environ.get("POWER_RETENTION_CACHE", Path.home() / ".cache" / "power-retention-mlx"))


@dataclass
class TrainConfig:
    model: str = "ultra-tiny"
    data: str = DEFAULT_DATA
    tokenizer: str = "auto"         # "auto" (SentencePiece at the preset's vocab), "byte", or a dir
    steps: int = 2000
    batch_size: int = 16            # sequences per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step
    seq_len: int = 0                # 0: the preset's max_position_embeddings
    lr: float = 3e-3
    warmup: int = -1                # -1: min(100, steps // 10)
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 200
    patience: int = 5               # evaluations without improvement before stopping (0: never)
    min_delta: float = 1e-3         # smallest validation improvement that counts
    max_bad_steps: int = 5          # non-finite steps in a row before rolling back
    seed: int = 0
    dtype: str = "float32"
    deg: int = 0                    # 0: the preset's degree
    head_dim: int = 0               # 0: the preset's; else heads of this width at the same width
    mixer: str = ""                 # "": the preset's mixer
    model_fields: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields (--set)
    val_fraction: float = 0.05
    out: str = ""
    cache_dir: str = ""
    compile: bool = True
    memory_budget: float = 0.0      # GB; 0: what the machine or --device-profile allows
    device_profile: str = ""        # plan for a named Apple Silicon machine (llm.plan.DEVICE_PROFILES)
    degrade: bool = True            # step down the memory ladder instead of failing
    plan: dict = dataclasses.field(default_factory=dict)  # the chosen rung, fixed for resumes
    # Testing only: "nan:STEP,STEP" poisons those steps' loss, "oom:STEP" raises a memory
    # error inside that step; entries separated by ";". Each fires once.
    inject: str = ""

    def validate(self):
        def fail(option, message):
            raise click.UsageError(f"--{option.replace('_', '-')}: {message}")

        if self.model not in PRESETS:
            fail("model", f"unknown model {self.model!r}; known presets: {', '.join(PRESETS)}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            self.warmup = min(100, self.steps // 10)
        for name in ("seq_len", "patience", "deg", "head_dim"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            fail("min-lr", f"need 0 < --lr and 0 <= --min-lr <= --lr, got lr={self.lr}, "
                           f"min_lr={self.min_lr}")
        if self.warmup >= self.steps and self.steps > 1:
            fail("warmup", f"({self.warmup}) must be shorter than --steps ({self.steps})")
        if self.grad_clip < 0 or self.weight_decay < 0:
            fail("grad-clip", "--grad-clip and --weight-decay must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            fail("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            fail("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.mixer not in ("", "power", "softmax"):
            fail("mixer", f"must be power or softmax, got {self.mixer!r}")
        settable = sorted(set(ModelConfig.__dataclass_fields__) - {"vocab_size"})
        wrong = [name for name in self.model_fields if name not in settable]
        if wrong:
            fail("set", f"{wrong[0]!r} is not a model field that can be set (the tokenizer sets "
                        f"vocab_size); fields: {', '.join(settable)}")
        if self.deg and self.mixer == "softmax":
            fail("deg", "applies to the power mixer only, not --mixer softmax")
        if not 0 < self.val_fraction < 0.5:
            fail("val-fraction", f"must be in (0, 0.5), got {self.val_fraction}")
        if self.memory_budget < 0:
            fail("memory-budget", f"must be >= 0 GB, got {self.memory_budget}")
        if self.device_profile and self.device_profile not in DEVICE_PROFILES:
            fail("device-profile", f"unknown profile {self.device_profile!r}; known: "
                                   f"{', '.join(DEVICE_PROFILES)}")


# ----------------------------------------------------------------------------- model & data

def build_tokenizer(cfg: TrainConfig, documents, vocab_size: int, cache_root: Path):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer != "auto":
        return load_tokenizer(cfg.tokenizer)
    key = hashlib.sha256(f"{cfg.data}|{vocab_size}|{documents_fingerprint(documents)}".encode())
    directory = cache_root / "tokenizers" / key.hexdigest()[:16]
    if (directory / "tokenizer_config.json").is_file():
        return load_tokenizer(directory)
    print(f"training a SentencePiece tokenizer (vocab {vocab_size}) on {cfg.data}; cached in {directory}")
    start = time.perf_counter()
    # The vocabulary is fit on the whole corpus (unsupervised, as GPT-2's BPE was); the model
    # never trains on the validation documents.
    tokenizer = train_tokenizer([d.text for d in documents], vocab_size)
    replace_directory(tokenizer.save, directory)
    print(f"  done in {time.perf_counter() - start:.0f} s")
    return tokenizer


def model_config(cfg: TrainConfig, vocab_size: int):
    overrides = {"vocab_size": vocab_size}
    if cfg.mixer:
        overrides["mixer"] = cfg.mixer
    if cfg.deg:
        overrides["deg"] = cfg.deg
    if cfg.head_dim:
        preset = create_model_config(cfg.model)
        if preset.hidden_size % cfg.head_dim:
            raise click.UsageError(f"--head-dim {cfg.head_dim} does not divide the model width "
                                   f"{preset.hidden_size}")
        heads = preset.hidden_size // cfg.head_dim
        group = preset.num_attention_heads // preset.num_key_value_heads
        overrides.update(head_dim=cfg.head_dim, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // group))
    overrides.update(cfg.model_fields)
    return create_model_config(cfg.model, **overrides)


def loss_terms(model, inputs, targets, mask):
    """(sum of masked token losses, number of counted tokens)."""
    logits = model(inputs).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (losses * mask).sum(), mask.sum()


def make_optimizer(cfg: TrainConfig):
    is_matrix = lambda path, p: p.ndim == 2  # noqa: E731 (norm gains and biases get no decay)
    if cfg.optimizer == "muon":
        hidden = lambda path, p: p.ndim == 2 and "embed_tokens" not in path and "lm_head" not in path  # noqa: E731
        return optim.MultiOptimizer(
            [optim.Muon(cfg.lr * MUON_LR_MULTIPLIER, weight_decay=cfg.weight_decay),
             optim.AdamW(cfg.lr, weight_decay=0.0)], [hidden])
    kind = optim.AdamW if cfg.optimizer == "adamw" else optim.Lion
    return optim.MultiOptimizer([kind(cfg.lr, weight_decay=cfg.weight_decay),
                                 kind(cfg.lr, weight_decay=0.0)], [is_matrix])


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to --lr, then cosine decay to --min-lr at --steps (step counts from 1)."""
    if step <= cfg.warmup:
        return cfg.lr * step / max(cfg.warmup, 1)
    progress = min(1.0, (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer, cfg: TrainConfig, lr: float):
    for i, sub in enumerate(optimizer.optimizers):
        muon = cfg.optimizer == "muon" and i == 0
        sub.learning_rate = lr * (MUON_LR_MULTIPLIER if muon else 1.0)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(directory: Path, model, tokenizer, optimizer, trainer_state: dict):
    """Model directory + optimizer state + trainer position, all or nothing."""
    def build(tmp: Path):
        model.save_pretrained(tmp / "model", tokenizer)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")

    replace_directory(build, directory)


def load_checkpoint(directory: Path, model, optimizer) -> dict:
    model.load_weights(read_weights(model, directory / "model"))
    optimizer.state = tree_unflatten(list(mx.load(str(directory / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((directory / "trainer_state.json").read_text())


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, batches, rows: int) -> float:
    """Mean masked loss over fixed batches, ``rows`` sequences at a time (the plan's
    micro-batch): the value does not depend on ``rows``, only the memory does."""
    total, count = 0.0, 0.0
    for inputs, targets, mask in batches:
        for start in range(0, len(inputs), rows):
            piece = slice(start, start + rows)
            loss_sum, n = loss_terms(model, mx.array(inputs[piece]), mx.array(targets[piece]),
                                     mx.array(mask[piece]))
            total += loss_sum.item()
            count += n.item()
    return total / max(count, 1.0)


def diversity(tokens: list[int]) -> dict:
    """Share of the most frequent token and distinct-2 (unique bigrams / bigrams)."""
    if not tokens:
        return {"top_token_share": 0.0, "distinct_2": 0.0}
    top = Counter(tokens).most_common(1)[0][1] / len(tokens)
    bigrams = list(zip(tokens, tokens[1:]))
    return {"top_token_share": top, "distinct_2": len(set(bigrams)) / max(len(bigrams), 1)}


def sample_continuations(model, tokenizer, val_tokens, step: int, seed: int) -> tuple[list, dict]:
    """Greedy and sampled continuations of the starts of a few validation windows, and the
    diversity of the sampled ones (greedy decoding repeats itself even in a good model)."""
    samples, generated = [], []
    stride = max(len(val_tokens) // 3, 1)
    for i in range(3):
        prompt = [int(t) for t in val_tokens[i * stride:i * stride + SAMPLE_PROMPT_TOKENS]]
        if not prompt:
            continue
        for mode, temperature in (("greedy", 0.0), ("sampled", 0.8)):
            new = [int(t.item()) for t in generate_tokens(
                model, mx.array([prompt]), model.make_cache(), SAMPLE_NEW_TOKENS,
                temperature=temperature, top_p=0.95, seed=seed + step + i)]
            if mode == "sampled":
                generated += new
            samples.append({"step": step, "mode": mode, "prompt": tokenizer.decode(prompt),
                            "continuation": tokenizer.decode(new)})
    return samples, diversity(generated)


# ----------------------------------------------------------------------------- the run

class Run:
    """A training run's directory and the logs written to it."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.metrics_path = directory / "metrics.jsonl"
        self.samples_path = directory / "samples.jsonl"

    def log(self, record: dict, path: Path | None = None):
        with open(path or self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int):
        """Drop records after ``step``: a resumed run rewrites them, so the log stays one run."""
        for path in (self.metrics_path, self.samples_path):
            if not path.exists():
                continue
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)


def prepare(cfg: TrainConfig):
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    documents = read_documents(cfg.data)
    preset_vocab = create_model_config(cfg.model).vocab_size
    tokenizer = build_tokenizer(cfg, documents, preset_vocab, cache_root)
    key = cache_key(cfg.data, tokenizer, cfg.val_fraction, cfg.seed, documents_fingerprint(documents))
    data = tokenize_corpus(documents, tokenizer, cache_root / "tokens", key,
                           val_fraction=cfg.val_fraction, seed=cfg.seed)
    return tokenizer, data


MEMORY_ERROR_MARKERS = ("resource limit", "max_buffer_length", "out of memory", "bad_alloc",
                        "unable to allocate", "[metal::malloc]", "insufficient memory")


def is_memory_error(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or any(m in str(error).lower() for m in MEMORY_ERROR_MARKERS)


def injected(cfg: TrainConfig, kind: str) -> Counter:
    """How many times each step fails in the test injection (a step may be listed repeatedly)."""
    steps = Counter()
    for entry in filter(None, cfg.inject.split(";")):
        name, _, values = entry.partition(":")
        if name == kind:
            steps.update(int(v) for v in values.split(",") if v)
    return steps


class ModelMustChange(Exception):
    """Only rungs that change the model are left: the run restarts with the smaller model."""


def rung_to_plan(rung, requested: RunShape) -> dict:
    """What a chosen rung changes, as stored in train_config.json."""
    model_changes = {name: value for name, value in dataclasses.asdict(rung.shape.config).items()
                     if getattr(requested.config, name) != value}
    return {"rung": rung.name, "batch_size": rung.shape.batch_size,
            "grad_accum": rung.shape.grad_accum, "checkpointing": rung.shape.checkpointing,
            "method": rung.shape.method, "chunk_size": rung.shape.chunk_size,
            "model": model_changes, "estimate_bytes": rung.total}


def apply_plan(requested: RunShape, plan: dict) -> RunShape:
    return requested.with_model(**plan["model"]).replace(
        batch_size=plan["batch_size"], grad_accum=plan["grad_accum"],
        checkpointing=plan["checkpointing"], method=plan["method"], chunk_size=plan["chunk_size"])


def make_plan(cfg: TrainConfig, requested: RunShape, start_after: str | None = None):
    limits = device_limits(cfg.device_profile or None, cfg.memory_budget or None)
    plan = plan_training(requested, limits, dtype=cfg.dtype, optimizer=cfg.optimizer,
                         degrade=cfg.degrade, start_after=start_after)
    print(plan.table())
    if plan.chosen is None:
        hint = "" if cfg.degrade else " (and --no-degrade forbids stepping down)"
        raise click.ClickException(f"the run does not fit in {limits.name}{hint}: see the table above")
    return plan, limits


def train(cfg: TrainConfig, resume_dir: Path | None = None) -> dict:
    mx.random.seed(cfg.seed)
    tokenizer, data = prepare(cfg)
    requested_config = model_config(cfg, tokenizer.vocab_size)
    seq_len = cfg.seq_len or requested_config.max_position_embeddings
    requested = RunShape(requested_config, cfg.batch_size, cfg.grad_accum, seq_len)
    if not cfg.plan:  # a fresh run plans; a resumed one keeps the plan it started with
        plan, limits = make_plan(cfg, requested)
        cfg.plan = rung_to_plan(plan.chosen, requested)
    else:
        limits = device_limits(cfg.device_profile or None, cfg.memory_budget or None)
    shape = apply_plan(requested, cfg.plan)
    config = shape.config
    model = RetentionLLM(config)
    if cfg.dtype != "float32":
        model.set_dtype(DTYPES[cfg.dtype])
    optimizer = make_optimizer(cfg)
    sampler = BatchSampler(data.train_tokens, data.train_mask, seq_len, shape.batch_size, cfg.seed)
    # From the requested batch size, so the validation set is the same whatever the plan.
    val_batches = validation_batches(data.val_tokens, data.val_mask, seq_len, cfg.batch_size,
                                     cfg.eval_batches)

    def use_shape(new_shape: RunShape):
        model.checkpointing = new_shape.checkpointing
        model.set_retention_form(new_shape.method, new_shape.chunk_size)
        sampler.batch_size = new_shape.batch_size

    use_shape(shape)
    baseline = unigram_entropy(data.train_tokens, tokenizer.vocab_size)

    run = Run(resume_dir or Path(cfg.out))
    state = {"step": 0, "tokens": 0, "lr_scale": 1.0, "best_val_loss": None, "best_step": None,
             "evals_without_improvement": 0, "skipped_steps": 0, "rollbacks": 0,
             "elapsed_s": 0.0, "train_losses": []}
    last_dir, best_dir = run.dir / "checkpoints" / "last", run.dir / "checkpoints" / "best"
    for directory in (last_dir, best_dir):
        recover_directory(directory)  # a kill between a save's two renames
    if resume_dir is not None and (last_dir / "trainer_state.json").is_file():
        state.update(load_checkpoint(last_dir, model, optimizer))
        sampler.load_state_dict(state.pop("sampler"))
        run.truncate_metrics(state["step"])
        print(f"resumed {run.dir} at step {state['step']} (best validation loss "
              f"{state['best_val_loss']})")
    else:
        # Only now that the data and model are ready: a run that fails to start leaves nothing.
        run.dir.mkdir(parents=True, exist_ok=True)
        (run.dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
        run.truncate_metrics(0)
    mx.eval(model.parameters())

    print(f"model: {cfg.model}, {describe(config)}")
    print(f"data: {cfg.data}: {data.n_train_documents} train / {data.n_val_documents} validation "
          f"documents, {len(data.train_tokens):,} / {len(data.val_tokens):,} tokens; tokenizer "
          f"vocab {tokenizer.vocab_size}; unigram entropy {baseline:.3f} nats")
    effective = shape.batch_size * shape.grad_accum
    print(f"training: {cfg.steps} steps of {effective} x {seq_len} tokens ({shape.batch_size} x "
          f"{shape.grad_accum} micro-batches{', checkpointing' if shape.checkpointing else ''}), "
          f"{cfg.optimizer}, lr {cfg.lr} -> {cfg.min_lr}, {cfg.dtype}; plan: {cfg.plan['rung']}; "
          f"run directory {run.dir}")

    loss_and_grad = nn.value_and_grad(model, lambda m, x, y, w: loss_terms(m, x, y, w)[0])
    model_state = [model.state]  # the micro-step never touches the optimizer

    def build_micro_step():
        """(sum of the micro-batch's token losses, its gradients); compiled for the current
        plan (the traced graph depends on the shapes and the retention form)."""
        def micro_step(inputs, targets, mask):
            return loss_and_grad(model, inputs, targets, mask)

        return mx.compile(micro_step, inputs=model_state, outputs=model_state) if cfg.compile \
            else micro_step

    micro_step = build_micro_step()

    poisoned, out_of_memory = injected(cfg, "nan"), injected(cfg, "oom")
    measured_once = False
    recent = deque(state.pop("train_losses"), maxlen=50)
    bad_in_a_row = 0
    run_start = time.perf_counter() - state["elapsed_s"]
    window_start, window_tokens = time.perf_counter(), 0
    log_every = max(1, cfg.steps // 40)
    stop_reason = "steps"
    peak = 0.0

    def checkpoint(directory):
        saved = dict(state, sampler=sampler.state_dict(), train_losses=list(recent),
                     elapsed_s=time.perf_counter() - run_start)
        save_checkpoint(directory, model, tokenizer, optimizer, saved)

    if state["step"] == 0:
        state["initial_val_loss"] = evaluate(model, val_batches, shape.batch_size)
        run.log({"step": 0, "val_loss": state["initial_val_loss"],
                 "val_ppl": math.exp(min(state["initial_val_loss"], 50))})
        print(f"eval at step 0: validation loss {state['initial_val_loss']:.4f}")

    def step_down(reason: str):
        """Re-plan below the current rung after a memory failure; the model and optimizer
        must already be back at the last completed step."""
        nonlocal shape, micro_step
        print(f"MEMORY: {reason}; stepping down the ladder from '{cfg.plan['rung']}'")
        plan, _ = make_plan(cfg, requested, start_after=cfg.plan["rung"])
        cfg.plan = rung_to_plan(plan.chosen, requested)
        if plan.chosen.changes_model:
            raise ModelMustChange(plan.chosen.name)
        shape = apply_plan(requested, cfg.plan)
        use_shape(shape)
        micro_step = build_micro_step()
        tmp = run.dir / "train_config.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
        os.replace(tmp, run.dir / "train_config.json")
        run.log({"step": state["step"], "event": "replan", "rung": cfg.plan["rung"], "reason": reason})

    def end_of_step(step) -> bool:
        """Evaluate and checkpoint when due; True when the run should stop."""
        nonlocal stop_reason
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss = evaluate(model, val_batches, shape.batch_size)
            samples, stats = sample_continuations(model, tokenizer, data.val_tokens, step, cfg.seed)
            for sample in samples:
                run.log(sample, run.samples_path)
            improved = state["best_val_loss"] is None or val_loss < state["best_val_loss"] - cfg.min_delta
            print(f"eval at step {step}: validation loss {val_loss:.4f} (perplexity "
                  f"{math.exp(min(val_loss, 50)):.1f}; unigram entropy {baseline:.3f}), "
                  f"top-token share {stats['top_token_share']:.2f}, distinct-2 "
                  f"{stats['distinct_2']:.2f}{'  [best]' if improved else ''}")
            print(f"  sample: {samples[1]['prompt']!r} -> {samples[1]['continuation']!r}")
            if stats["top_token_share"] >= COLLAPSE_TOP_SHARE or stats["distinct_2"] <= COLLAPSE_DISTINCT_2:
                print("WARNING: MODE COLLAPSE: the samples are dominated by one token "
                      f"(top-token share {stats['top_token_share']:.2f}, distinct-2 "
                      f"{stats['distinct_2']:.2f})")
            evals = [r for r in _read_jsonl(run.metrics_path) if "val_loss" in r]
            if len(evals) >= 2 and val_loss > evals[-1]["val_loss"] > evals[-2]["val_loss"] \
                    and len(recent) > 1 and np.mean(list(recent)[-10:]) < evals[-1]["train_loss"]:
                print("WARNING: validation loss rising while training loss falls (overfitting)")
            run.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                     "train_loss": float(np.mean(list(recent)[-10:])), **stats})
            if improved:
                state["best_val_loss"], state["best_step"] = val_loss, step
                state["evals_without_improvement"] = 0
                checkpoint(best_dir)
            else:
                state["evals_without_improvement"] += 1
            if cfg.patience and state["evals_without_improvement"] >= cfg.patience:
                stop_reason = f"early stop: no improvement in {cfg.patience} evaluations"
        if step % cfg.save_every == 0 or step % cfg.eval_every == 0 or step == cfg.steps \
                or stop_reason != "steps":
            checkpoint(last_dir)
        if stop_reason != "steps":
            print(stop_reason)
            return True
        return False

    while state["step"] < cfg.steps:
        step = state["step"] + 1
        lr = learning_rate(cfg, step) * state["lr_scale"]
        # References to the state before the step (arrays are immutable: no copy is made),
        # to return to if the step runs out of memory.
        before = (model.trainable_parameters(), tree_map(lambda x: x, optimizer.state),
                  sampler.state_dict())
        try:
            loss_sum, count, grads = 0.0, 0.0, None
            for micro in range(shape.grad_accum):
                batch = sampler.next_batch()
                count += float(batch[2].sum())  # counted tokens, from the host-side mask
                part_loss, part_grads = micro_step(*(mx.array(a) for a in batch))
                if out_of_memory[step]:
                    out_of_memory[step] -= 1
                    raise RuntimeError("[metal::malloc] Resource limit (499000) exceeded. (injected)")
                grads = part_grads if grads is None else tree_map(mx.add, grads, part_grads)
                loss_sum = loss_sum + part_loss
                # Evaluated here, micro-batch by micro-batch: MLX is lazy, so this is where a
                # step runs out of memory (inside the try), and accumulating unevaluated
                # gradients would keep every micro-batch's activations alive at once.
                mx.eval(loss_sum, grads)
        except (RuntimeError, MemoryError) as error:
            if not is_memory_error(error) or not cfg.degrade:
                raise
            model.update(before[0])
            optimizer.state = before[1]
            sampler.load_state_dict(before[2])
            step_down(f"step {step} failed: {error}")
            continue
        if poisoned[step]:
            poisoned[step] -= 1  # the step redone after a rollback is clean
            loss_sum = loss_sum * float("nan")
        loss = loss_sum / max(count, 1.0)
        # The global norm, which clipping needs anyway, is non-finite exactly when a gradient
        # entry is (or when finite ones are so large that their squares overflow: skipped too).
        grads, norm = optim.clip_grad_norm(tree_map(lambda g: g / max(count, 1.0), grads),
                                           cfg.grad_clip or float("inf"))
        if not (mx.isfinite(loss) & mx.isfinite(norm)).item():
            state["skipped_steps"] += 1
            bad_in_a_row += 1
            print(f"step {step}: non-finite loss or gradient, step skipped "
                  f"({bad_in_a_row} in a row, {state['skipped_steps']} in total)")
            run.log({"step": step, "event": "skipped_non_finite"})
            if bad_in_a_row >= cfg.max_bad_steps:
                if not (last_dir / "trainer_state.json").is_file():
                    raise RuntimeError(f"{bad_in_a_row} non-finite steps in a row before the first "
                                       f"checkpoint: lower --lr (now {cfg.lr})")
                restored = load_checkpoint(last_dir, model, optimizer)
                sampler.load_state_dict(restored.pop("sampler"))
                recent = deque(restored.pop("train_losses"), maxlen=50)
                restored["lr_scale"] = state["lr_scale"] / 2
                restored["rollbacks"] = state["rollbacks"] + 1
                restored["skipped_steps"] = state["skipped_steps"]
                state.update(restored)
                run.truncate_metrics(state["step"])
                bad_in_a_row = 0
                print(f"ROLLBACK: {cfg.max_bad_steps} non-finite steps in a row; back to the "
                      f"checkpoint at step {state['step']} with the learning rate halved "
                      f"(x{state['lr_scale']:g})")
                run.log({"step": state["step"], "event": "rollback", "lr_scale": state["lr_scale"]})
            else:
                state["step"] = step  # the batch is dropped and the schedule moves on
                if end_of_step(step):  # a skipped step still gets its evaluation and checkpoint
                    break
            continue
        bad_in_a_row = 0
        set_learning_rate(optimizer, cfg, lr)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        del before
        loss_value = loss.item()
        state["step"] = step
        state["tokens"] += int(count)
        if not measured_once:
            # MLX's CPU backend does not enforce memory limits: measure the first step instead.
            measured_once = True
            measured = mx.get_peak_memory()
            if measured > limits.memory_bytes and cfg.degrade:
                step_down(f"measured peak {measured / 1e9:.2f} GB over the budget "
                          f"{limits.memory_bytes / 1e9:.2f} GB")
        window_tokens += int(count)
        peak = max(peak, mx.get_peak_memory() / 1e9)

        record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm.item(),
                  "tokens": state["tokens"]}
        if len(recent) >= 20:
            mean, std = float(np.mean(recent)), float(np.std(recent))
            if loss_value > mean + max(4 * std, 0.5):
                print(f"step {step}: loss spike {loss_value:.3f} (recent mean {mean:.3f})")
                record["spike"] = True
        recent.append(loss_value)
        if step % log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / max(elapsed, 1e-9)
            eta = (cfg.steps - step) * cfg.batch_size * cfg.grad_accum * seq_len / max(tps, 1e-9)
            record["tokens_per_s"], record["peak_memory_gb"] = tps, peak
            print(f"step {step:>6}/{cfg.steps}  loss {loss_value:.4f}  lr {lr:.2e}  "
                  f"|g| {norm.item():.2f}  {tps:,.0f} tok/s  peak {peak:.2f} GB  "
                  f"ETA {eta / 60:.1f} min", flush=True)
            window_start, window_tokens = time.perf_counter(), 0
        run.log(record)

        if end_of_step(step):
            break

    elapsed = time.perf_counter() - run_start
    evals = [r for r in _read_jsonl(run.metrics_path) if "val_loss" in r]
    # Both over the same stretch of the run: the last evaluation, and the training steps
    # before it (the mean of the last 50), so that they differ only by the data they score.
    last_val_loss = evals[-1]["val_loss"] if evals else None
    last_train_loss = float(np.mean(recent)) if recent else None
    summary = {"stop_reason": stop_reason, "steps": state["step"], "tokens": state["tokens"],
               "initial_val_loss": state["initial_val_loss"],
               "last_val_loss": last_val_loss, "last_train_loss": last_train_loss,
               "best_val_loss": state["best_val_loss"], "best_step": state["best_step"],
               "unigram_entropy": baseline, "elapsed_s": elapsed,
               "tokens_per_s": state["tokens"] / max(elapsed, 1e-9), "peak_memory_gb": peak,
               "skipped_steps": state["skipped_steps"], "rollbacks": state["rollbacks"],
               "parameters": param_count(config), "run_dir": str(run.dir),
               "best_checkpoint": str(best_dir / "model"), "last_checkpoint": str(last_dir / "model")}
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"done ({stop_reason}): {state['step']} steps, {state['tokens']:,} tokens in "
          f"{elapsed / 60:.1f} min ({summary['tokens_per_s']:,.0f} tok/s), peak {peak:.2f} GB; "
          f"best validation loss {state['best_val_loss'] or float('nan'):.4f} at step {state['best_step']} "
          f"(unigram entropy {baseline:.3f}); checkpoints in {run.dir / 'checkpoints'}")
    if last_val_loss is not None and last_train_loss is not None:
        print(f"last validation loss {last_val_loss:.4f}; training loss over the last "
              f"{len(recent)} steps {last_train_loss:.4f}")
    return summary


def _read_jsonl(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# ----------------------------------------------------------------------------- command line

def _option_names():
    return [f.name for f in dataclasses.fields(TrainConfig)]


QUICK_TEST = dict(model="ultra-tiny", tokenizer="byte", steps=150, batch_size=16, seq_len=64,
                  warmup=15, eval_every=50, save_every=50, eval_batches=8, patience=0)


# The options that shape a run's memory: shared by training and `train.py plan`.
RUN_SHAPE_OPTIONS = [
    click.option("--model", default=TrainConfig.model, show_default=True,
                 help=f"preset: {', '.join(PRESETS)}"),
    click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True,
                 help="sequences per micro-batch"),
    click.option("--grad-accum", type=int, default=TrainConfig.grad_accum, show_default=True,
                 help="micro-batches per optimizer step"),
    click.option("--seq-len", type=int, default=TrainConfig.seq_len, show_default=True,
                 help="tokens per sequence (0: the preset's max_position_embeddings)"),
    click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=TrainConfig.optimizer,
                 show_default=True),
    click.option("--dtype", type=click.Choice(list(DTYPES)), default=TrainConfig.dtype, show_default=True),
    click.option("--deg", "--power", "deg", type=int, default=TrainConfig.deg, show_default=True,
                 help="degree of the power mixer (0: the preset's)"),
    click.option("--mixer", type=click.Choice(["", "power", "softmax"]), default=TrainConfig.mixer,
                 help="power or softmax (default: the preset's)"),
    click.option("--head-dim", type=int, default=TrainConfig.head_dim, show_default=True,
                 help="per-head width (0: the preset's); the model width stays"),
    click.option("--set", "model_fields", multiple=True, metavar="FIELD=VALUE",
                 callback=lambda ctx, param, value: parse_model_fields(value),
                 help="set a field of the model's config (llm.ModelConfig), e.g. --set "
                      "conv_size=0 --set hidden_size=128; repeatable; applied last"),
    click.option("--memory-budget", type=float, default=TrainConfig.memory_budget, show_default=True,
                 help="GB the run may use (0: what the machine or --device-profile allows)"),
    click.option("--device-profile", default=TrainConfig.device_profile,
                 help=f"plan for an Apple Silicon machine: {', '.join(DEVICE_PROFILES)}"),
    click.option("--degrade/--no-degrade", default=True, show_default=True,
                 help="step down the memory ladder instead of failing when the run does not fit"),
]


def parse_model_fields(assignments) -> dict:
    """{"conv_size": 0, ...} from ("conv_size=0", ...): values read as JSON (numbers, true,
    false), anything else as a string."""
    fields = {}
    for assignment in assignments:
        name, equals, text = assignment.partition("=")
        if not equals or not name.strip():
            raise click.BadParameter(f"expected FIELD=VALUE, got {assignment!r}", param_hint="--set")
        try:
            fields[name.strip()] = json.loads(text)
        except json.JSONDecodeError:
            fields[name.strip()] = text
    return fields


def run_shape_options(command):
    for option in reversed(RUN_SHAPE_OPTIONS):
        command = option(command)
    return command


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@run_shape_options
@click.option("--mode", type=click.Choice(["llm"]), default="llm", help="what to train (only llm)")
@click.option("--data", default=TrainConfig.data, show_default=True,
              help="stdlib (this Python's standard library source), a text file, a directory or "
                   "glob, a .jsonl file (text, or prompt/completion), or synthetic:mqar / synthetic:copy")
@click.option("--tokenizer", default=TrainConfig.tokenizer, show_default=True,
              help="auto (train SentencePiece at the preset's vocab, cached), byte, or a directory")
@click.option("--steps", type=int, default=TrainConfig.steps, show_default=True)
@click.option("--lr", type=float, default=TrainConfig.lr, show_default=True)
@click.option("--warmup", type=int, default=TrainConfig.warmup, show_default=True,
              help="warmup steps (-1: min(100, steps / 10))")
@click.option("--min-lr", type=float, default=TrainConfig.min_lr, show_default=True)
@click.option("--weight-decay", type=float, default=TrainConfig.weight_decay, show_default=True)
@click.option("--grad-clip", type=float, default=TrainConfig.grad_clip, show_default=True)
@click.option("--eval-every", type=int, default=TrainConfig.eval_every, show_default=True)
@click.option("--eval-batches", type=int, default=TrainConfig.eval_batches, show_default=True)
@click.option("--save-every", type=int, default=TrainConfig.save_every, show_default=True)
@click.option("--patience", type=int, default=TrainConfig.patience, show_default=True,
              help="evaluations without improvement before stopping (0: never)")
@click.option("--min-delta", type=float, default=TrainConfig.min_delta, show_default=True)
@click.option("--max-bad-steps", type=int, default=TrainConfig.max_bad_steps, show_default=True,
              help="non-finite steps in a row before rolling back")
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--val-fraction", type=float, default=TrainConfig.val_fraction, show_default=True)
@click.option("--out", default="", help="run directory (default runs/MODEL-DATE)")
@click.option("--cache-dir", default="", help="tokenizer and token cache (default "
              "$POWER_RETENTION_CACHE or ~/.cache/power-retention-mlx)")
@click.option("--compile/--no-compile", default=True, show_default=True)
@click.option("--resume", "resume", default=None, type=click.Path(file_okay=False),
              help="continue the run in this directory from its last checkpoint")
@click.option("--quick-test", is_flag=True, help="a whole run in under a minute; fails unless the loss fell")
@click.option("--inject", default="", hidden=True)
@click.pass_context
def cli(ctx, mode, resume, quick_test, **options):
    """Train a RetentionLLM (subcommands: sample, report)."""
    if ctx.invoked_subcommand is not None:
        return
    tune_process()
    given = {name for name in options
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if resume is not None:
        cfg, resume_dir = _resumed_config(Path(resume), options, given)
    else:
        if quick_test:
            options.update({k: v for k, v in QUICK_TEST.items() if k not in given})
        cfg = TrainConfig(**options)
        cfg.validate()
        if not cfg.out:
            cfg.out = str(Path("runs") / f"{'quick-test' if quick_test else cfg.model}-"
                                          f"{time.strftime('%Y%m%d-%H%M%S')}")
        out = Path(cfg.out)
        if out.exists() and any(out.iterdir()):
            raise click.UsageError(f"--out {out} already holds a run: continue it with "
                                   f"--resume {out}, or choose another --out (nothing was written)")
        resume_dir = None
    while True:
        try:
            summary = train(cfg, resume_dir)
            break
        except ModelMustChange as change:
            run_dir = Path(cfg.out)
            kept = run_dir / f"checkpoints-before-{time.strftime('%Y%m%d-%H%M%S')}"
            kept.mkdir()
            for name in ("checkpoints", "metrics.jsonl", "samples.jsonl"):
                if (run_dir / name).exists():
                    os.replace(run_dir / name, kept / name)
            print(f"!!! MEMORY: only rungs that change the model are left; RESTARTING FROM STEP 0 "
                  f"with '{change}' (the old checkpoints and logs are in {kept}) !!!")
            resume_dir = run_dir  # no checkpoint there now: a fresh start that keeps the new plan
            cfg.inject = ""  # test injections have been delivered
        except (ValueError, FileNotFoundError) as error:
            raise click.ClickException(str(error)) from error
    if quick_test:
        fell = summary["initial_val_loss"] - summary["best_val_loss"]
        if not fell >= 0.5:
            raise click.ClickException(
                f"QUICK TEST FAILED: validation loss fell by {fell:.3f} nats "
                f"({summary['initial_val_loss']:.3f} -> {summary['best_val_loss']:.3f}); expected >= 0.5")
        print(f"quick test passed: validation loss {summary['initial_val_loss']:.3f} -> "
              f"{summary['best_val_loss']:.3f} in {summary['elapsed_s']:.0f} s")


def _resumed_config(directory: Path, options: dict, given: set) -> tuple:
    path = directory / "train_config.json"
    if not path.is_file():
        raise click.UsageError(f"--resume {directory}: no train_config.json there, not a run directory")
    saved = upgrade_saved_options(json.loads(path.read_text()))
    unknown = sorted(set(saved) - set(_option_names()))
    if unknown:
        raise click.UsageError(f"--resume {directory}: train_config.json has unknown options {unknown}")
    if "out" in given and Path(options["out"]).resolve() != directory.resolve():
        raise click.UsageError(f"--out {options['out']} with --resume {directory}: a resumed run "
                               f"stays in its directory (leave out --out)")
    for name in sorted(given):
        if name in RESUMABLE_OVERRIDES or name == "out":
            continue
        if options[name] != saved.get(name):
            raise click.UsageError(
                f"--resume {directory}: --{name.replace('_', '-')} {options[name]!r} differs from the "
                f"run's {saved.get(name)!r} (train_config.json); a resumed run keeps its config "
                f"(only --{', --'.join(n.replace('_', '-') for n in RESUMABLE_OVERRIDES)} may change)")
    saved.update({name: options[name] for name in given if name in RESUMABLE_OVERRIDES})
    saved["out"] = str(directory)
    cfg = TrainConfig(**saved)
    cfg.validate()
    if any(name in given for name in RESUMABLE_OVERRIDES):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
        os.replace(tmp, path)
    return cfg, directory


def upgrade_saved_options(saved: dict) -> dict:
    """An older run's train_config.json in today's option names, its model fixed as it was:
    a run from before --set pins the model fields added since at the values it trained with."""
    saved = {RENAMED_FIELDS.get(name, name): value for name, value in saved.items()}  # --power
    if "model_fields" not in saved:
        mixer = saved.get("mixer") or create_model_config(saved.get("model", "ultra-tiny")).mixer
        saved["model_fields"] = fields_added_later(mixer)
    if saved.get("plan"):
        saved["plan"]["model"] = {RENAMED_FIELDS.get(name, name): value
                                  for name, value in saved["plan"]["model"].items()}
    return saved


def _checkpoint_model_dir(run_dir: Path) -> Path:
    for name in ("best", "last"):
        directory = run_dir / "checkpoints" / name / "model"
        if (directory / "config.json").is_file():
            return directory
    raise click.UsageError(f"{run_dir}: no checkpoint found (expected checkpoints/best or last)")


@cli.command("plan")
@run_shape_options
def plan_command(**options):
    """Print the memory estimate and the plan of a run, without training."""
    cfg = TrainConfig(**options)
    cfg.validate()
    config = model_config(cfg, create_model_config(cfg.model).vocab_size)
    requested = RunShape(config, cfg.batch_size, cfg.grad_accum,
                         cfg.seq_len or config.max_position_embeddings)
    estimate_ = estimate(config, requested.batch_size, requested.seq_len, dtype=cfg.dtype,
                         optimizer=cfg.optimizer)
    print(f"{cfg.model}: {describe(config)}; batch {requested.batch_size} x {requested.grad_accum} "
          f"micro-batches, {requested.seq_len} tokens, {cfg.dtype}, {cfg.optimizer}")
    print(f"estimate as requested ({estimate_.method} form): " + ", ".join(
        f"{name} {format_bytes(getattr(estimate_, name))}" for name in
        ("parameters", "gradients", "optimizer_state", "activations", "logits_and_loss", "transient"))
        + f"; total {format_bytes(estimate_.total)}; largest buffer {estimate_.largest_buffer_name} "
          f"{format_bytes(estimate_.largest_buffer)}; about {estimate_.live_buffers:,} live buffers")
    plan, _ = make_plan(cfg, requested)
    chosen = plan.chosen
    print(f"plan: {chosen.name}: batch {chosen.shape.batch_size} x {chosen.shape.grad_accum}, "
          f"checkpointing {'on' if chosen.shape.checkpointing else 'off'}, form {chosen.shape.method}"
          + (f" (chunk {chosen.shape.chunk_size})" if chosen.shape.chunk_size else "")
          + (f"; model: {describe(chosen.shape.config)}" if chosen.changes_model else ""))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", default="", help="text to continue (default: nothing, just the beginning-of-sequence token)")
@click.option("--max-new-tokens", type=int, default=200, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
def sample(run_dir, prompt, max_new_tokens, temperature, top_p, top_k, seed, checkpoint):
    """Generate text from a run's checkpoint."""
    from llm import load, stream_generate

    tune_process()
    directory = Path(run_dir) / "checkpoints" / checkpoint / "model"
    if not (directory / "config.json").is_file():
        directory = _checkpoint_model_dir(Path(run_dir))
    model, tokenizer = load(directory)
    print(prompt, end="", flush=True)
    last = None
    for last in stream_generate(model, tokenizer, prompt or "", max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed):
        print(last.text, end="", flush=True)
    if last is not None:
        print(f"\n[{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s, "
              f"peak {last.peak_memory:.2f} GB; {directory}]")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--plot/--no-plot", default=True, show_default=True, help="write loss.png (needs matplotlib)")
def report(run_dir, plot):
    """Summarise a run and plot its train/validation loss and learning rate."""
    run_dir = Path(run_dir)
    records = _read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise click.UsageError(f"{run_dir}: no metrics.jsonl, not a run directory")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    config = json.loads((run_dir / "train_config.json").read_text())
    print(f"run {run_dir}: model {config['model']}, data {config['data']}, {len(steps)} steps logged")
    if steps:
        print(f"  training loss: first {steps[0]['loss']:.4f}, last {steps[-1]['loss']:.4f}")
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        print(f"  validation loss: first {evals[0]['val_loss']:.4f}, last {evals[-1]['val_loss']:.4f}, "
              f"best {best['val_loss']:.4f} at step {best['step']}")
    events = Counter(r["event"] for r in records if "event" in r)
    if events:
        print(f"  events: {dict(events)}")
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        print(f"  finished: {summary['stop_reason']}; {summary['tokens']:,} tokens in "
              f"{summary['elapsed_s'] / 60:.1f} min ({summary['tokens_per_s']:,.0f} tok/s), "
              f"peak memory {summary['peak_memory_gb']:.2f} GB")
    else:
        print("  not finished (no summary.json): resume with --resume")
    if not plot:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  no plot: matplotlib is not installed (pip install 'power-retention-mlx[plot]')")
        return
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train", lw=0.8)
    loss_axis.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    loss_axis.set_ylabel("loss (nats)")
    loss_axis.legend()
    lr_axis.plot([r["step"] for r in steps], [r["lr"] for r in steps])
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("step")
    figure.suptitle(f"{config['model']} on {config['data']}")
    figure.tight_layout()
    figure.savefig(run_dir / "loss.png", dpi=100)
    print(f"  plot: {run_dir / 'loss.png'}")


if __name__ == "__main__":
    cli()
