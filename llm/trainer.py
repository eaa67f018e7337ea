"""The training loop, as a library: ``train(model, optimizer, data, config, callbacks)``.

The loop steps, evaluates, checkpoints, logs and stops; everything that watches or rescues a
run is a callback (``TrainingCallback``) given to it:

    MemoryGuard       re-plans one rung down the memory ladder when a step runs out of memory
    NonFiniteGuard    skips non-finite steps, and rolls back to the last checkpoint when they persist
    SampleMonitor     generates continuations at each evaluation (samples.jsonl)
    CollapseMonitor   warns when those samples are dominated by one token
    OverfitMonitor    warns when validation loss rises while training loss falls
    SpikeMonitor      flags a step whose loss jumps far above the recent ones

A run directory (``config.out``) holds train_config.json (the options), metrics.jsonl (every
step and evaluation), samples.jsonl, summary.json, and checkpoints/{last,best}: each a model
directory plus the optimizer's state and the trainer's position (trainer_state.json), written
whole or not at all.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from power_retention import native

from .adapters import load_adapter_weights, save_adapters
from .atomic import (DamagedFileError, recover_directory, replace_directory, verify_directory,
                     write_atomic, write_failure)
from .config import PRESETS, ModelConfig, param_count
from .cpu_streams import make_streams, single_threaded_blas, split_step
from .data import DEFAULT_DATA, BatchSampler
from .distributed import World
from .generate import generate_tokens
from .memory import Adapters
from .flops import matmul_peak, training_flops_per_token
from .plan import DEVICE_PROFILES, DeviceLimits, ModelMustChange, RunShape, make_plan, rung_to_plan
from .weights import read_weights

OPTIMIZERS = ("adamw", "lion", "muon")
ADAPTER_KINDS = ("lora", "dora", "full")
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# Muon's orthogonalized updates have unit spectral norm, far larger per entry than Adam's:
# its hidden matrices take this multiple of --lr (Keller Jordan's setup: 0.02 against 3e-3).
MUON_LR_MULTIPLIER = 6.0
# Training losses kept for the spike check, the overfitting check and the summary.
RECENT_LOSSES = 50
# Sampled continuations (temperature 0.8) flagged as collapsed: nearly all one token, or
# nearly no distinct bigrams. Byte-level code is legitimately space-heavy (indentation), so
# the thresholds are far from what a healthy model produces there (top share ~0.3).
COLLAPSE_TOP_SHARE = 0.8
COLLAPSE_DISTINCT_2 = 0.05
SAMPLE_PROMPT_TOKENS = 24
SAMPLE_NEW_TOKENS = 48
MEMORY_ERROR_MARKERS = ("resource limit", "max_buffer_length", "out of memory", "bad_alloc",
                        "unable to allocate", "[metal::malloc]", "insufficient memory")


# ----------------------------------------------------------------------------- options

def option(default, help: str, **command_line):
    """A TrainConfig field that train.py also offers as a command-line option, declared once:
    its default, its help, and how the command line spells it (``flags``: the option's names
    when not just --field-name; ``choices``; ``hidden``; ``memory``: it shapes the run's memory,
    so `train.py plan` takes it too)."""
    metadata = {"help": help, **command_line}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class OptionError(ValueError):
    """An option's value cannot be used."""

    def __init__(self, option: str, message: str):
        super().__init__(f"--{option.replace('_', '-')}: {message}")


@dataclass
class TrainConfig:
    model: str = option("ultra-tiny", f"preset: {', '.join(PRESETS)}", memory=True)
    data: str = option(DEFAULT_DATA, "stdlib (this Python's standard library source), a text file, "
                       "a directory or glob, a .jsonl file (text, or prompt/completion), or "
                       "synthetic:mqar / synthetic:copy")
    tokenizer: str = option("auto", "auto (train SentencePiece at the preset's vocab, cached), "
                            "byte, or a directory")
    steps: int = option(2000, "optimizer steps")
    batch_size: int = option(16, "sequences per micro-batch", memory=True)
    grad_accum: int = option(1, "micro-batches per optimizer step", memory=True)
    seq_len: int = option(0, "tokens per sequence (0: the preset's max_position_embeddings)",
                          memory=True)
    lr: float = option(3e-3, "peak learning rate, reached after the warmup")
    warmup: int = option(-1, "warmup steps (-1: min(100, steps / 10))")
    min_lr: float = option(3e-4, "learning rate at the end of the cosine decay")
    weight_decay: float = option(0.1, "weight decay of the matrices (norm gains and biases "
                                 "have none)")
    grad_clip: float = option(1.0, "largest global gradient norm (0: no clipping)")
    optimizer: str = option("adamw", f"the update rule (muon: its hidden matrices at "
                            f"{MUON_LR_MULTIPLIER:g} x --lr)", choices=OPTIMIZERS, memory=True)
    eval_every: int = option(200, "steps between evaluations (validation loss and samples)")
    eval_batches: int = option(20, "validation batches of --batch-size sequences")
    save_every: int = option(200, "steps between checkpoints of checkpoints/last")
    patience: int = option(5, "evaluations without improvement before stopping (0: never)")
    min_delta: float = option(1e-3, "smallest validation improvement that counts")
    max_bad_steps: int = option(5, "non-finite steps in a row before rolling back")
    seed: int = option(0, "seeds the initialization, the data order and the validation split")
    dtype: str = option("float32", "parameter dtype", choices=tuple(DTYPES), memory=True)
    deg: int = option(0, "degree of the power mixer (0: the preset's)", flags=("--deg", "--power"),
                      memory=True)
    mixer: str = option("", "power or softmax (default: the preset's)",
                        choices=("", "power", "softmax"), memory=True)
    head_dim: int = option(0, "per-head width (0: the preset's); the model width stays", memory=True)
    model_fields: dict = option({}, "set a field of the model's config (llm.ModelConfig), e.g. "
                                "--set conv_size=0 --set hidden_size=128; repeatable; applied last",
                                flags=("--set",), memory=True)
    document_resets: bool = option(False, "keep packed documents apart: every mixer starts afresh "
                                   "at each document's first token (bos), in training and in "
                                   "generation (the model's document_start_id)")
    val_fraction: float = option(0.05, "share of the documents held out for validation")
    out: str = option("", "run directory (default runs/MODEL-DATE)")
    cache_dir: str = option("", "tokenizer and token cache (default $POWER_RETENTION_CACHE or "
                            "~/.cache/power-retention-mlx)")
    compile: bool = option(True, "compile the gradient computation (mx.compile)")
    cpu_streams: int = option(0, "CPU backend: split each micro-batch across this many CPU "
                              "streams, side by side, each with one BLAS thread (0: measured "
                              "at the run's start, one per core where that is faster; 1: one "
                              "stream)", memory=True)
    memory_budget: float = option(0.0, "GB the run may use (0: what the machine or "
                                  "--device-profile allows)", memory=True)
    device_profile: str = option("", f"plan for an Apple Silicon machine: {', '.join(DEVICE_PROFILES)}",
                                 memory=True)
    degrade: bool = option(True, "step down the memory ladder instead of failing when the run "
                           "does not fit", memory=True)
    # Fine-tuning (`train.py finetune BASE`): the base model, and what of it is trained.
    base: str = option("", "the model to fine-tune: a model directory, or a run directory (its "
                       "best checkpoint)", finetune=True, memory=True)
    adapter: str = option("", "what fine-tuning trains: lora or dora adapters (mlx-lm's), or "
                          "full (every parameter); default lora", choices=("", *ADAPTER_KINDS),
                          finetune=True, memory=True)
    rank: int = option(8, "rank of the adapters", finetune=True, memory=True)
    adapter_layers: int = option(0, "blocks with adapters, counted from the last (0: all)",
                                 flags=("--layers",), finetune=True, memory=True)
    adapter_scale: float = option(20.0, "the adapters' scale (mlx-lm's: the update is scale x "
                                  "(x A) B)", finetune=True)
    quantize_base: str = option("none", "quantize the frozen base to 4 or 8 bits (QLoRA)",
                                choices=("none", "4", "8"), finetune=True, memory=True)
    val_data: str = option("", "validation data (default: --val-fraction of --data's documents)",
                           finetune=True)
    epochs: float = option(0.0, "passes over the training data; sets --steps (0: use --steps)",
                           finetune=True)
    # The chosen rung of the memory plan (llm.plan.rung_to_plan), fixed for resumes.
    plan: dict = field(default_factory=dict)
    # sha256 of the base's files when fine-tuning began: a resume refuses a base changed since.
    base_fingerprint: str = ""
    # Processes that train the run (data parallel under mlx.launch); a resume needs as many.
    world_size: int = 1
    inject: str = option("", "testing only: faults to inject (train.py's FaultInjection)",
                         hidden=True)

    def validate(self):
        """Check every option (raising OptionError), and resolve --warmup -1."""
        def fail(name, message):
            raise OptionError(name, message)

        if not self.base and self.model not in PRESETS:
            fail("model", f"unknown model {self.model!r}; known presets: {', '.join(PRESETS)}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")
        if self.warmup < -1:
            fail("warmup", f"must be >= 0, or -1 for min(100, steps / 10); got {self.warmup}")
        if not (math.isfinite(self.epochs) and self.epochs >= 0):
            fail("epochs", f"must be a finite number >= 0, got {self.epochs}")
        if self.epochs and not self.base:
            fail("epochs", "applies to fine-tuning (train.py finetune); pretraining counts --steps")
        if not self.epochs:  # with --epochs, --steps and the warmup are known once the data is
            self.resolve_warmup()
        if not 0 <= self.seed < 2**32:
            fail("seed", f"must be in [0, 2^32), got {self.seed}")
        for name in ("lr", "min_lr", "grad_clip", "weight_decay", "val_fraction", "min_delta",
                     "memory_budget"):
            if not math.isfinite(getattr(self, name)):
                fail(name.replace("_", "-"), f"must be a finite number, got {getattr(self, name)}")
        for name in ("seq_len", "patience", "deg", "head_dim"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            fail("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            fail("min-lr", f"must be in [0, --lr={self.lr}], got {self.min_lr}")
        if self.warmup >= self.steps and self.steps > 1 and not self.epochs:
            fail("warmup", f"({self.warmup}) must be shorter than --steps ({self.steps})")
        if self.grad_clip < 0:
            fail("grad-clip", f"must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.weight_decay < 0:
            fail("weight-decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("out", "cache_dir"):
            if getattr(self, name) and Path(getattr(self, name)).is_file():
                fail(name.replace("_", "-"), f"{getattr(self, name)} is a file; expected a "
                                             f"directory (or a path that does not exist yet)")
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
        if self.cpu_streams < 0:
            fail("cpu-streams", f"must be >= 0 (0: measured), got {self.cpu_streams}")
        if self.cpu_streams > 1 and mx.default_device() != mx.cpu:
            fail("cpu-streams", f"splits a step across CPU streams; this run's device is "
                                f"{mx.default_device()}")
        if self.device_profile and self.device_profile not in DEVICE_PROFILES:
            fail("device-profile", f"unknown profile {self.device_profile!r}; known: "
                                   f"{', '.join(DEVICE_PROFILES)}")
        self.validate_finetuning(fail)

    def validate_finetuning(self, fail):
        if self.adapter not in ("", *ADAPTER_KINDS):
            fail("adapter", f"must be one of {', '.join(ADAPTER_KINDS)}, got {self.adapter!r}")
        if self.rank < 1:
            fail("rank", f"must be >= 1, got {self.rank}")
        if self.adapter_layers < 0:
            fail("layers", f"must be >= 0 (0: every block), got {self.adapter_layers}")
        if not (math.isfinite(self.adapter_scale) and self.adapter_scale > 0):
            fail("adapter-scale", f"must be a finite number > 0, got {self.adapter_scale}")
        if self.quantize_base not in ("none", "4", "8"):
            fail("quantize-base", f"must be none, 4 or 8, got {self.quantize_base!r}")
        if self.quantize_base != "none" and self.adapter == "full":
            fail("quantize-base", "a quantized base cannot be trained: with --adapter full leave "
                                  "it out, or train lora/dora adapters over it (QLoRA)")
        for name in ("base", "val_data"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                fail(name.replace("_", "-"), f"{value} does not exist")
        if self.base and self.model_fields:
            fail("set", "a fine-tuned model keeps its base's config; --set applies to pretraining")
        if self.base and (self.mixer or self.deg or self.head_dim):
            fail("mixer" if self.mixer else "deg" if self.deg else "head-dim",
                 "a fine-tuned model keeps its base's config; this applies to pretraining")

    def resolve_warmup(self):
        """--warmup -1 as the steps make it: min(100, steps / 10)."""
        if self.warmup == -1:
            self.warmup = min(100, self.steps // 10)

    def adapters(self) -> Adapters | None:
        """What fine-tuning trains (for the memory plan), or None when pretraining."""
        if not self.adapter:
            return None
        bits = 0 if self.quantize_base == "none" else int(self.quantize_base)
        return Adapters(self.adapter, self.rank, self.adapter_layers, bits)

    def save(self, path: Path):
        write_atomic(path, json.dumps(dataclasses.asdict(self), indent=1) + "\n")


# ----------------------------------------------------------------------------- the step's parts

def loss_terms(model, inputs, targets, mask):
    """(sum of masked token losses, number of counted tokens)."""
    logits = model(inputs).astype(mx.float32)
    losses = native.cross_entropy(logits, targets)
    return (losses * mask).sum(), mask.sum()


def micro_step_function(model, compiled: bool = True):
    """(inputs, targets, mask) -> (sum of masked token losses, its gradients in ``model``'s
    trainable parameters); compiled over the model's state (the optimizer is not touched).
    Traced afresh per form and per default stream (mx.compile keys its cache by stream)."""
    native.available()  # built, if it is to be, before tracing: the build checks itself by evaluating
    step = nn.value_and_grad(model, lambda inputs, targets, mask:
                             loss_terms(model, inputs, targets, mask)[0])
    return mx.compile(step, inputs=[model.state], outputs=[model.state]) if compiled else step


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


def evaluate(model, batches, rows: int, world: World | None = None) -> float:
    """Mean masked loss over fixed batches, ``rows`` sequences at a time (the plan's
    micro-batch): the value does not depend on ``rows``, only the memory does. Over a
    data-parallel ``world``, each rank scores its share and the sums are added."""
    world = world or World()
    total, count = 0.0, 0.0
    for batch in batches:
        inputs, targets, mask = world.shard(batch)
        for start in range(0, len(inputs), rows):
            piece = slice(start, start + rows)
            loss_sum, n = loss_terms(model, mx.array(inputs[piece]), mx.array(targets[piece]),
                                     mx.array(mask[piece]))
            total += loss_sum.item()
            count += n.item()
    if world.size > 1:
        total, count = world.sum(mx.array([total, count], dtype=mx.float32)).tolist()
    return total / max(count, 1.0)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))


# ----------------------------------------------------------------------------- state and files

@dataclass
class TrainerState:
    """Where the run is: saved in every checkpoint (trainer_state.json, with the sampler's
    position beside it) and restored by --resume and by a rollback."""
    step: int = 0                       # optimizer steps done (skipped ones included)
    tokens: int = 0                     # counted tokens trained on
    lr_scale: float = 1.0               # halved by each rollback
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_steps: int = 0
    rollbacks: int = 0
    elapsed_s: float = 0.0              # wall time of the run at the last checkpoint
    initial_val_loss: float | None = None
    train_losses: deque = field(default_factory=lambda: deque(maxlen=RECENT_LOSSES))  # the latest

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dict(values, train_losses=list(self.train_losses))

    def load(self, saved: dict):
        """Take the values of a saved trainer_state.json; a field it lacks keeps its value."""
        for f in dataclasses.fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])
        self.train_losses = deque(self.train_losses, maxlen=RECENT_LOSSES)


def save_checkpoint(directory: Path, model, tokenizer, optimizer, trainer_state: dict,
                    keep_replaced_as: Path | None = None, adapter_config: dict | None = None):
    """Model directory + optimizer state + trainer position, all or nothing (the version it
    replaces moved to ``keep_replaced_as`` when given). With ``adapter_config`` (fine-tuning
    with adapters), the adapters alone (``adapters/``, mlx-lm's adapter directory) stand for
    the model: the base is not copied."""
    def build(tmp: Path):
        if adapter_config is not None:
            save_adapters(model, tmp / "adapters", adapter_config)
        else:
            model.save_pretrained(tmp / "model", tokenizer)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")

    replace_directory(build, directory, keep_replaced_as)


def read_trainer_state(directory: Path) -> dict:
    """A checkpoint's trainer_state.json; DamagedFileError naming it when it is missing or
    unreadable. (Its checksum is checked by ``load_checkpoint``.)"""
    path = directory / "trainer_state.json"
    if not path.is_file():
        raise DamagedFileError(f"{path} is missing: the checkpoint cannot say where the run was")
    try:
        saved = json.loads(path.read_text())
        int(saved["step"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as error:
        raise DamagedFileError(f"{path} is damaged: {error}") from error
    return saved


def load_checkpoint(directory: Path, model, optimizer) -> dict:
    """Load the model and optimizer saved in ``directory`` (checked file by file against the
    checksums, and every tensor finite); returns its trainer_state.json."""
    verify_directory(directory)
    saved = read_trainer_state(directory)
    if (directory / "adapters").is_dir():
        load_adapter_weights(model, directory / "adapters")
    else:
        model.load_weights(read_weights(model, directory / "model"))
    path = directory / "optimizer.safetensors"
    try:
        optimizer.state = tree_unflatten(list(mx.load(str(path)).items()))
    except Exception as error:  # MLX raises RuntimeError or ValueError by what is wrong
        raise DamagedFileError(f"{path} cannot be read: {error}") from error
    mx.eval(model.parameters(), optimizer.state)
    for where, tree in (("model", model.parameters()), (path.name, optimizer.state)):
        for name, array in tree_flatten(tree):
            if isinstance(array, mx.array) and mx.issubdtype(array.dtype, mx.floating) \
                    and not mx.isfinite(array).all().item():
                raise DamagedFileError(f"{directory}: {where} tensor {name!r} holds NaN or inf")
    return saved


def read_jsonl(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class RunDirectory:
    """A training run's directory and the logs written to it (by one process: ``writes`` is
    False on the other ranks of a data-parallel run)."""

    def __init__(self, directory: Path, writes: bool = True):
        self.dir, self.writes = directory, writes
        self.metrics_path = directory / "metrics.jsonl"
        self.samples_path = directory / "samples.jsonl"
        self.last_checkpoint = directory / "checkpoints" / "last"
        self.previous_checkpoint = directory / "checkpoints" / "previous"
        self.best_checkpoint = directory / "checkpoints" / "best"

    def checkpoints(self) -> list:
        """Every checkpoint directory a resume may continue from, newest save first."""
        return [d for d in (self.last_checkpoint, self.previous_checkpoint, self.best_checkpoint)
                if d.exists()]


    def log(self, record: dict, path: Path | None = None):
        if not self.writes:
            return
        path = path or self.metrics_path
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as error:
            raise write_failure(path, error) from error

    def evaluations(self) -> list:
        return [r for r in read_jsonl(self.metrics_path) if "val_loss" in r]

    def truncate_metrics(self, step: int):
        """Drop records after ``step``: a resumed run rewrites them, so the log stays one run."""
        for path in (self.metrics_path, self.samples_path) if self.writes else ():
            if not path.exists():
                continue
            lines = [line for line in path.read_text().splitlines() if line]
            records = []
            for number, line in enumerate(lines, 1):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    if number < len(lines):
                        raise ValueError(f"{path}, line {number}, is not JSON: the log is damaged; "
                                         f"move it away to resume") from None
                    print(f"{path}: dropped its last line, torn by an interrupted write")
            kept = [line for line, record in zip(lines, records) if record.get("step", 0) <= step]
            write_atomic(path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- the trainer

@dataclass
class TrainingData:
    """What the loop reads besides the model: batches, and the tokenizer it saves."""
    tokenizer: object              # saved with each checkpoint's model
    sampler: BatchSampler          # training batches, in a seeded order whose position is saved
    val_batches: list              # the validation set, the same at every evaluation
    unigram_entropy: float         # the loss of a model that knows only token frequencies
    adapter_config: dict | None = None  # fine-tuning with adapters: checkpoints hold them alone


@dataclass
class StepResult:
    """One step's gradients, before the update."""
    loss: mx.array                 # mean loss per counted token
    grads: dict                    # clipped to --grad-clip
    grad_norm: mx.array            # global norm before clipping
    tokens: int                    # counted (unmasked) target tokens


class Verdict(enum.Enum):
    APPLY = "apply"                # update the model with the step's gradients
    SKIP = "skip"                  # drop the batch; the schedule moves on
    RESTORED = "restored"          # the run was put back to an earlier state: go on from there


class TrainingCallback:
    """Hooks into ``train``'s loop, called in the order the callbacks are given; each does
    nothing unless overridden. ``trainer`` is the loop's ``Trainer``."""

    def on_step_begin(self, trainer: "Trainer", step: int):
        """Before the step's gradients, inside its guarded region: what this raises is a
        failure of the step."""

    def on_step_failed(self, trainer: "Trainer", step: int, error: Exception) -> bool:
        """The step raised ``error`` and has been undone. True: this callback dealt with the
        cause, and the step runs again; False: let the error end the run."""
        return False

    def on_gradients(self, trainer: "Trainer", step: int, result: StepResult) -> Verdict | None:
        """The step's gradients before the update; SKIP or RESTORED refuse it (the callbacks
        after this one are then not asked)."""

    def on_step_end(self, trainer: "Trainer", step: int, record: dict):
        """After the update; ``record`` (the step's line in metrics.jsonl) may be added to."""

    def on_evaluation(self, trainer: "Trainer", step: int, record: dict):
        """After the validation loss; ``record`` (the evaluation's line in metrics.jsonl) may be
        added to."""


class Trainer:
    """What the loop works on, as callbacks see it: the model, optimizer, data and options, the
    run directory, the position (``state``), and how a step runs (the memory plan)."""

    def __init__(self, model, optimizer, data: TrainingData, config: TrainConfig, callbacks,
                 world: World | None = None):
        self.model, self.optimizer, self.data, self.config = model, optimizer, data, config
        self.callbacks = list(callbacks)
        self.world = world or World()
        self.run = RunDirectory(Path(config.out), writes=self.world.is_main)
        self.state = TrainerState()
        self.started = time.perf_counter()
        self.peak_memory_gb = 0.0
        self.matmul_peak = None  # FLOP/s, measured at the first report and at the end (llm.flops)
        self.report_rates = []  # tokens/s of each progress report in this process
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.use_plan(config.plan)

    def use_plan(self, plan: dict):
        """Run steps as a memory plan says (llm.plan.rung_to_plan): micro-batches, gradient
        checkpointing, the retention form; the compiled step is rebuilt, as its traced graph
        depends on them."""
        self.model.checkpointing = plan["checkpointing"]
        self.model.set_retention_form(plan["method"], plan["chunk_size"])
        # The plan is per process; the sampler reads the micro-batch of every rank at once.
        self.micro_batch_size = plan["batch_size"]
        self.data.sampler.batch_size = plan["batch_size"] * self.world.size
        self.grad_accum = plan["grad_accum"]
        self.streams = make_streams(plan["cpu_streams"])  # none: the default stream
        self.micro_step = micro_step_function(self.model, self.config.compile)

    def start(self, resume: bool):
        """Continue from the last checkpoint (``resume``, when there is one) or begin the run
        directory; a new run first scores the untrained model."""
        if self.world.is_main:
            for directory in (self.run.last_checkpoint, self.run.previous_checkpoint,
                              self.run.best_checkpoint):
                recover_directory(directory)  # a kill between a save's two renames
        self.world.agree(False)  # the other ranks read the checkpoints once they are whole
        restored = resume and self.restore_newest() is not None
        if self.world.agree(restored) and self.world.agree(not restored):  # some ranks only
            raise ValueError(f"the checkpoints in {self.run.dir} are not visible to every rank: a "
                             f"data-parallel run keeps its directory on storage they share")
        if restored:
            self.run.truncate_metrics(self.state.step)
            print(f"resumed {self.run.dir} at step {self.state.step} (best validation loss "
                  f"{self.state.best_val_loss})")
        else:
            # Only now that the data and model are ready: a run that fails to start leaves nothing.
            if self.world.is_main:
                self.run.dir.mkdir(parents=True, exist_ok=True)
                self.config.save(self.run.dir / "train_config.json")
            self.run.truncate_metrics(0)
            # Rollbacks and resumes read rank 0's checkpoints: every rank must see its files.
            self.world.agree(False)  # rank 0 has written train_config.json
            if self.world.agree(not (self.run.dir / "train_config.json").is_file()):
                raise ValueError(f"the run directory {self.run.dir} is not visible to every rank: a "
                                 f"data-parallel run keeps it on storage they share (the same "
                                 f"local disk, or a network volume mounted at the same path)")
        mx.eval(self.model.parameters())
        self.started = time.perf_counter() - self.state.elapsed_s
        self.window_start = time.perf_counter()
        if self.state.step == 0:
            self.state.initial_val_loss = evaluate(self.model, self.data.val_batches,
                                                   self.micro_batch_size, self.world)
            self.run.log({"step": 0, "val_loss": self.state.initial_val_loss,
                          "val_ppl": perplexity(self.state.initial_val_loss)})
            print(f"eval at step 0: validation loss {self.state.initial_val_loss:.4f}")

    def gradients(self) -> tuple:
        """This process's share of the next batch: (loss sum, counted tokens, gradients of the
        loss sum), accumulated over the plan's micro-batches."""
        loss_sum, count, grads = 0.0, 0.0, None
        with single_threaded_blas(bool(self.streams)):  # each stream is one core's
            for _ in range(self.grad_accum):
                batch = self.world.shard(self.data.sampler.next_batch())
                count += float(batch[2].sum())  # counted tokens, from the host-side mask
                arrays = [mx.array(a) for a in batch]
                part_loss, part_grads = (split_step(self.micro_step, arrays, self.streams)
                                         if self.streams else self.micro_step(*arrays))
                grads = part_grads if grads is None else tree_map(mx.add, grads, part_grads)
                loss_sum = loss_sum + part_loss
                # Evaluated here, micro-batch by micro-batch: MLX is lazy, so this is where a
                # step runs out of memory (inside the loop's guard), and accumulating unevaluated
                # gradients would keep every micro-batch's activations alive at once.
                mx.eval(loss_sum, grads)
        return loss_sum, count, grads

    def step_result(self, local: tuple) -> StepResult:
        """The whole batch's loss per counted token and clipped gradients, from every rank's
        share (``gradients``)."""
        loss_sum, count, grads = local
        if self.world.size > 1:
            loss_sum, count = self.world.sum(mx.stack([loss_sum, mx.array(count)])).tolist()
            grads = self.world.sum_gradients(grads)
        grads, norm = optim.clip_grad_norm(tree_map(lambda g: g / max(count, 1.0), grads),
                                           self.config.grad_clip or float("inf"))
        return StepResult(mx.array(loss_sum) / max(count, 1.0), grads, norm, int(count))

    def position(self) -> tuple:
        """References to the state before a step (arrays are immutable: nothing is copied)."""
        return (self.model.trainable_parameters(), tree_map(lambda x: x, self.optimizer.state),
                self.data.sampler.state_dict())

    def return_to(self, position: tuple):
        parameters, optimizer_state, sampler_state = position
        self.model.update(parameters)
        self.optimizer.state = optimizer_state
        self.data.sampler.load_state_dict(sampler_state)

    def checkpoint(self, directory: Path):
        """Save the run to ``directory``. The last checkpoint's previous version is kept (as
        ``previous``): if the new one is ever damaged, a resume loses one interval, not the run."""
        self.state.elapsed_s = time.perf_counter() - self.started
        if not self.world.is_main:
            return
        save_checkpoint(directory, self.model, self.data.tokenizer, self.optimizer,
                        dict(self.state.to_dict(), sampler=self.data.sampler.state_dict()),
                        self.run.previous_checkpoint if directory == self.run.last_checkpoint
                        else None, self.data.adapter_config)

    def restore(self, directory: Path):
        """Model, optimizer, data position and trainer state as ``directory`` holds them."""
        saved = load_checkpoint(directory, self.model, self.optimizer)
        self.data.sampler.load_state_dict(saved.pop("sampler"))
        self.state.load(saved)

    def restore_newest(self) -> Path | None:
        """Restore the intact checkpoint with the most steps and return it, saying which were
        damaged; None when the run has none. Each is checked file by file as it loads (in
        order of the steps it records), so a flipped byte never reaches training."""
        ordered, damaged = [], []
        for directory in self.run.checkpoints():
            try:
                ordered.append((int(read_trainer_state(directory)["step"]), directory))
            except DamagedFileError as error:
                damaged.append((directory, error))
        for _, directory in sorted(ordered, key=lambda entry: entry[0], reverse=True):
            try:
                self.restore(directory)
            except DamagedFileError as error:
                damaged.append((directory, error))
                continue
            for bad, error in damaged:
                print(f"{bad.relative_to(self.run.dir)} is damaged ({error}): resuming from "
                      f"{directory.relative_to(self.run.dir)} at step {self.state.step}; the "
                      f"steps after it are trained again")
            return directory
        if damaged:
            reasons = "; ".join(str(error) for _, error in damaged)
            raise DamagedFileError(f"no intact checkpoint in {self.run.dir / 'checkpoints'}: "
                                   f"{reasons}")
        return None

    def report_progress(self, step: int, record: dict):
        """Throughput since the last report, and the ETA, on the console and in ``record``."""
        elapsed = time.perf_counter() - self.window_start
        tps = self.window_tokens / max(elapsed, 1e-9)
        tokens_per_step = self.config.batch_size * self.config.grad_accum * self.data.sampler.seq_len
        eta = (self.config.steps - step) * tokens_per_step / max(tps, 1e-9)
        record["tokens_per_s"], record["peak_memory_gb"] = tps, self.peak_memory_gb
        record["mfu"] = self.utilisation(tps)["mfu"]
        self.report_rates.append(tps)
        ranks = f" ({self.world.size} ranks)" if self.world.size > 1 else ""
        print(f"step {step:>6}/{self.config.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
              f"|g| {record['grad_norm']:.2f}  {tps:,.0f} tok/s{ranks}  MFU {100 * record['mfu']:.1f}%  "
              f"peak {self.peak_memory_gb:.2f} GB  ETA {eta / 60:.1f} min", flush=True)
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def utilisation(self, tokens_per_s: float, measure_peak: bool = False) -> dict:
        """Model FLOPs utilisation at ``tokens_per_s`` (llm.flops), against a matmul peak in
        the training dtype measured in this process at the first report (and again with
        ``measure_peak``: the faster measurement counts, since anything else running on the
        machine can only slow one down)."""
        plan = self.config.plan or {}
        per_token = training_flops_per_token(
            self.model.config, self.data.sampler.seq_len, plan.get("method", "auto"),
            plan.get("chunk_size"), frozen=self.data.adapter_config is not None)
        if self.matmul_peak is None or measure_peak:
            self.matmul_peak = max(self.matmul_peak or 0.0, matmul_peak(DTYPES[self.config.dtype]))
        return {"model_flops_per_token": per_token, "matmul_peak_gflops": self.matmul_peak / 1e9,
                "mfu": tokens_per_s / self.world.size * per_token / self.matmul_peak}

    def finish(self, stop_reason: str) -> dict:
        """The run's summary, written to summary.json and printed."""
        state, run = self.state, self.run
        elapsed = time.perf_counter() - self.started
        evals = run.evaluations()
        # Both over the same stretch of the run: the last evaluation, and the training steps
        # before it (the mean of the last 50), so that they differ only by the data they score.
        last_val_loss = evals[-1]["val_loss"] if evals else None
        last_train_loss = float(np.mean(state.train_losses)) if state.train_losses else None
        saved = "model" if self.data.adapter_config is None else "adapters"
        summary = {"stop_reason": stop_reason, "steps": state.step, "tokens": state.tokens,
                   "initial_val_loss": state.initial_val_loss,
                   "last_val_loss": last_val_loss, "last_train_loss": last_train_loss,
                   "best_val_loss": state.best_val_loss, "best_step": state.best_step,
                   "unigram_entropy": self.data.unigram_entropy, "elapsed_s": elapsed,
                   "tokens_per_s": state.tokens / max(elapsed, 1e-9),
                   "peak_memory_gb": self.peak_memory_gb, "ranks": self.world.size,
                   **self.utilisation(state.tokens / max(elapsed, 1e-9), measure_peak=True),
                   # The steady step: the median report after the first (which compiles).
                   "step_mfu": (self.utilisation(float(np.median(self.report_rates[1:])))["mfu"]
                                if len(self.report_rates) > 1 else None),
                   "skipped_steps": state.skipped_steps, "rollbacks": state.rollbacks,
                   "parameters": param_count(self.model.config),
                   "trainable_parameters": sum(v.size for _, v in
                                               tree_flatten(self.model.trainable_parameters())),
                   "run_dir": str(run.dir),
                   "best_checkpoint": str(run.best_checkpoint / saved),
                   "last_checkpoint": str(run.last_checkpoint / saved)}
        if self.world.is_main:
            write_atomic(run.dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        ranks = f" over {self.world.size} ranks" if self.world.size > 1 else ""
        step_mfu = (f", {100 * summary['step_mfu']:.1f}% per step after the first,"
                    if summary["step_mfu"] is not None else "")
        print(f"done ({stop_reason}): {state.step} steps, {state.tokens:,} tokens in "
              f"{elapsed / 60:.1f} min ({summary['tokens_per_s']:,.0f} tok/s{ranks}, MFU "
              f"{100 * summary['mfu']:.1f}%{step_mfu} of a {summary['matmul_peak_gflops']:,.0f} "
              f"GFLOP/s matmul peak{' per rank' if ranks else ''}), peak "
              f"{self.peak_memory_gb:.2f} GB; best validation loss "
              f"{state.best_val_loss or float('nan'):.4f} at step {state.best_step} (unigram "
              f"entropy {self.data.unigram_entropy:.3f}); checkpoints in {run.dir / 'checkpoints'}")
        if last_val_loss is not None and last_train_loss is not None:
            print(f"last validation loss {last_val_loss:.4f}; training loss over the last "
                  f"{len(state.train_losses)} steps {last_train_loss:.4f}")
        return summary


def train(model, optimizer, data: TrainingData, config: TrainConfig, callbacks=(), *,
          resume: bool = False, world: World | None = None) -> dict:
    """Train ``model`` for ``config.steps`` optimizer steps as ``config.plan`` (a memory plan)
    says, in the run directory ``config.out``; with ``resume``, from its last checkpoint.
    Returns the summary (also in summary.json)."""
    trainer = Trainer(model, optimizer, data, config, callbacks, world)
    trainer.start(resume)
    state, run = trainer.state, trainer.run
    log_every = max(1, config.steps // 40)
    stop_reason = None
    while state.step < config.steps:
        step = state.step + 1
        lr = learning_rate(config, step) * state.lr_scale

        # Step: the gradients over the micro-batches. A step that fails is undone; when a
        # callback deals with the failure (a memory guard re-planning), it runs again.
        before = trainer.position()
        try:
            try:
                for callback in trainer.callbacks:
                    callback.on_step_begin(trainer, step)
                local, failure = trainer.gradients(), None
            except (RuntimeError, MemoryError) as error:
                if trainer.world.size == 1 or not is_memory_error(error):
                    raise
                local, failure = None, error
            # Every rank learns whether any ran out of memory before the sums, so that all
            # re-plan together and none waits in a sum that another never joins.
            if trainer.world.agree(failure is not None):
                raise failure or MemoryError("another rank ran out of memory in this step")
            result = trainer.step_result(local)
        except (RuntimeError, MemoryError) as error:
            trainer.return_to(before)
            if any(callback.on_step_failed(trainer, step, error) for callback in trainer.callbacks):
                continue
            raise

        # Guard: callbacks see the gradients before the update and may refuse it: SKIP drops
        # the batch (the schedule moves on), RESTORED means the run was put back (a rollback).
        verdict = Verdict.APPLY
        for callback in trainer.callbacks:
            verdict = callback.on_gradients(trainer, step, result) or Verdict.APPLY
            if verdict is not Verdict.APPLY:
                break
        if verdict is Verdict.RESTORED:
            continue
        state.step = step
        if verdict is Verdict.APPLY:
            # Update, then log: every step to metrics.jsonl, about 40 of them to the console.
            set_learning_rate(optimizer, config, lr)
            optimizer.update(model, result.grads)
            mx.eval(model.parameters(), optimizer.state)
            del before
            state.tokens += result.tokens
            record = {"step": step, "loss": result.loss.item(), "lr": lr,
                      "grad_norm": result.grad_norm.item(), "tokens": state.tokens}
            for callback in trainer.callbacks:
                callback.on_step_end(trainer, step, record)
            state.train_losses.append(record["loss"])
            trainer.window_tokens += result.tokens
            trainer.peak_memory_gb = max(trainer.peak_memory_gb, mx.get_peak_memory() / 1e9)
            if step % log_every == 0 or step == config.steps:
                trainer.report_progress(step, record)
            run.log(record)

        # Evaluate: the validation loss (callbacks add samples and warnings), the best
        # checkpoint, and early stopping.
        if step % config.eval_every == 0 or step == config.steps:
            val_loss = evaluate(model, data.val_batches, trainer.micro_batch_size, trainer.world)
            improved = state.best_val_loss is None or val_loss < state.best_val_loss - config.min_delta
            print(f"eval at step {step}: validation loss {val_loss:.4f} (perplexity "
                  f"{perplexity(val_loss):.1f}; unigram entropy {data.unigram_entropy:.3f})"
                  f"{'  [best]' if improved else ''}")
            record = {"step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss),
                      "train_loss": float(np.mean(list(state.train_losses)[-10:]))}
            for callback in trainer.callbacks:
                callback.on_evaluation(trainer, step, record)
            run.log(record)
            if improved:
                state.best_val_loss, state.best_step = val_loss, step
                state.evals_without_improvement = 0
                trainer.checkpoint(run.best_checkpoint)
            else:
                state.evals_without_improvement += 1
            if config.patience and state.evals_without_improvement >= config.patience:
                stop_reason = f"early stop: no improvement in {config.patience} evaluations"

        # Checkpoint: what a resume or a rollback returns to.
        if step % config.save_every == 0 or step % config.eval_every == 0 or step == config.steps \
                or stop_reason:
            trainer.checkpoint(run.last_checkpoint)

        # Stop early when evaluations stopped improving.
        if stop_reason:
            print(stop_reason)
            break
    return trainer.finish(stop_reason or "steps")


# ----------------------------------------------------------------------------- guards

def is_memory_error(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or any(m in str(error).lower() for m in MEMORY_ERROR_MARKERS)


class MemoryGuard(TrainingCallback):
    """Re-plans one rung down the memory ladder when a step fails for lack of memory (the step
    is then redone, so none is lost), and after the first step when its measured peak is over
    the budget: MLX's CPU backend enforces no limit. Only with --degrade; a rung that changes
    the model raises ModelMustChange (the run must restart)."""

    def __init__(self, requested: RunShape, limits: DeviceLimits):
        self.requested, self.limits = requested, limits
        self.measured = False

    def on_step_failed(self, trainer, step, error) -> bool:
        if not is_memory_error(error) or not trainer.config.degrade:
            return False
        self.step_down(trainer, f"step {step} failed: {error}")
        return True

    def on_step_end(self, trainer, step, record):
        if self.measured:
            return
        self.measured = True
        measured = mx.get_peak_memory()
        # Decided together: every rank of a data-parallel run keeps the same plan.
        if trainer.world.agree(measured > self.limits.memory_bytes) and trainer.config.degrade:
            self.step_down(trainer, f"measured peak {measured / 1e9:.2f} GB over the budget "
                                    f"{self.limits.memory_bytes / 1e9:.2f} GB")

    def step_down(self, trainer, reason: str):
        """Re-plan below the current rung; the model and optimizer are at the last completed step."""
        config = trainer.config
        print(f"MEMORY: {reason}; stepping down the ladder from '{config.plan['rung']}'")
        plan, _ = make_plan(config, self.requested, start_after=config.plan["rung"])
        config.plan = rung_to_plan(plan.chosen, self.requested)
        if plan.chosen.changes_model:
            raise ModelMustChange(plan.chosen.name)
        trainer.use_plan(config.plan)
        if trainer.world.is_main:
            config.save(trainer.run.dir / "train_config.json")
        trainer.run.log({"step": trainer.state.step, "event": "replan", "rung": config.plan["rung"],
                         "reason": reason})


class NonFiniteGuard(TrainingCallback):
    """Skips a step whose loss or gradient is not finite; after ``max_bad_steps`` of them in a
    row, returns to the last checkpoint with the learning rate halved."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row = 0

    def on_gradients(self, trainer, step, result):
        # The global norm, which clipping needs anyway, is non-finite exactly when a gradient
        # entry is (or when finite ones are so large that their squares overflow: skipped too).
        if (mx.isfinite(result.loss) & mx.isfinite(result.grad_norm)).item():
            self.bad_in_a_row = 0
            return Verdict.APPLY
        state, run = trainer.state, trainer.run
        state.skipped_steps += 1
        self.bad_in_a_row += 1
        print(f"step {step}: non-finite loss or gradient, step skipped "
              f"({self.bad_in_a_row} in a row, {state.skipped_steps} in total)")
        run.log({"step": step, "event": "skipped_non_finite"})
        if self.bad_in_a_row < self.max_bad_steps:
            return Verdict.SKIP
        lr_scale, rollbacks, skipped_steps = state.lr_scale, state.rollbacks, state.skipped_steps
        if trainer.restore_newest() is None:
            raise RuntimeError(f"{self.bad_in_a_row} non-finite steps in a row before the first "
                               f"checkpoint: lower --lr (now {trainer.config.lr})")
        state.lr_scale, state.rollbacks, state.skipped_steps = lr_scale / 2, rollbacks + 1, skipped_steps
        run.truncate_metrics(state.step)
        self.bad_in_a_row = 0
        print(f"ROLLBACK: {self.max_bad_steps} non-finite steps in a row; back to the checkpoint "
              f"at step {state.step} with the learning rate halved (x{state.lr_scale:g})")
        run.log({"step": state.step, "event": "rollback", "lr_scale": state.lr_scale})
        return Verdict.RESTORED


# ----------------------------------------------------------------------------- monitors

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


class SampleMonitor(TrainingCallback):
    """At each evaluation, continues the starts of a few validation windows (samples.jsonl)
    and adds the sampled text's diversity to the evaluation's record."""

    def __init__(self, val_tokens, seed: int):
        self.val_tokens, self.seed = val_tokens, seed

    def on_evaluation(self, trainer, step, record):
        if not trainer.world.is_main:  # one rank's samples are the run's
            return
        samples, stats = sample_continuations(trainer.model, trainer.data.tokenizer,
                                              self.val_tokens, step, self.seed)
        for sample in samples:
            trainer.run.log(sample, trainer.run.samples_path)
        record.update(stats)
        print(f"  sample (top-token share {stats['top_token_share']:.2f}, distinct-2 "
              f"{stats['distinct_2']:.2f}): {samples[1]['prompt']!r} -> {samples[1]['continuation']!r}")


class CollapseMonitor(TrainingCallback):
    """Warns when the samples (SampleMonitor's statistics, so after it) are nearly one token."""

    def on_evaluation(self, trainer, step, record):
        if "top_token_share" not in record:
            return
        if record["top_token_share"] >= COLLAPSE_TOP_SHARE or record["distinct_2"] <= COLLAPSE_DISTINCT_2:
            print("WARNING: MODE COLLAPSE: the samples are dominated by one token "
                  f"(top-token share {record['top_token_share']:.2f}, distinct-2 "
                  f"{record['distinct_2']:.2f})")


class OverfitMonitor(TrainingCallback):
    """Warns, on the console and in the evaluation's record (``"overfitting"``), when the
    training loss keeps falling but the validation loss does not: rising twice in a row, or
    no better than two evaluations ago (flat) while the training loss fell by more than 1%
    (what a small fine-tuning set does first; early stopping then keeps the best checkpoint)."""

    def on_evaluation(self, trainer, step, record):
        evals = trainer.run.evaluations()  # the earlier ones: this one is not logged yet
        recent = list(trainer.state.train_losses)[-10:]
        if len(evals) < 2 or not recent or evals[-2].get("train_loss") is None:
            return
        train_now, train_then = float(np.mean(recent)), evals[-2]["train_loss"]
        val_now, val_then = record["val_loss"], evals[-2]["val_loss"]
        if not train_now < train_then * 0.99:
            return
        if val_now > evals[-1]["val_loss"] > val_then:
            record["overfitting"] = "rising"
        elif val_now > val_then - trainer.config.min_delta:
            record["overfitting"] = "flat"
        else:
            return
        print(f"WARNING: OVERFITTING: validation loss {record['overfitting']} ({val_then:.4f} -> "
              f"{val_now:.4f}) over the last two evaluations while the training loss fell "
              f"({train_then:.4f} -> {train_now:.4f}); the best checkpoint is kept")


class SpikeMonitor(TrainingCallback):
    """Flags a step whose loss is far above the recent steps' (``"spike": true`` in its record)."""

    def on_step_end(self, trainer, step, record):
        recent = trainer.state.train_losses  # without this step's loss yet
        if len(recent) < 20:
            return
        mean, std = float(np.mean(recent)), float(np.std(recent))
        if record["loss"] > mean + max(4 * std, 0.5):
            print(f"step {step}: loss spike {record['loss']:.3f} (recent mean {mean:.3f})")
            record["spike"] = True
