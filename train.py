"""Train a RetentionLLM on a real corpus, and never lose the run.

    python train.py --model ultra-tiny                   # the Python standard library's source
    python train.py --model tiny --data corpus.txt --steps 5000
    python train.py --resume runs/ultra-tiny-20261122-0930      # continue a stopped run exactly
    python train.py sample RUN_DIR --prompt "def main("
    python train.py report RUN_DIR                       # summary and a loss / learning-rate plot
    python train.py --quick-test                         # a whole run in under a minute
    python train.py finetune BASE --data train.jsonl --adapter lora --quantize-base 4   # QLoRA
    python train.py fuse RUN_DIR                         # a fine-tuned run's adapters merged
    mlx.launch -n 2 --backend ring --python "$(which python)" train.py --model tiny  # data parallel

A run directory holds train_config.json (every option), metrics.jsonl (every step and
evaluation), samples.jsonl (generations at each evaluation), and checkpoints/{last,best}/,
each a complete model directory (config.json, model.safetensors, tokenizer) plus the
optimizer's state and the trainer's position (trainer_state.json); a fine-tuning run's
checkpoints hold its adapters (mlx-lm's adapter directory) instead of the model.
Checkpoints are written to a temporary directory and renamed into place, so a kill at any
moment leaves the last good one loadable, and --resume continues from it with the same
losses as an uninterrupted run.

The loop itself, its guards and its monitors are a library (llm/trainer.py); this file reads
the options, prepares the data and the model, and calls it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten

from llm import RetentionLLM, cpu_streams, create_model_config, load, load_tokenizer, train_tokenizer
from llm.adapters import add_adapters, files_fingerprint, fuse_adapters, load_adapters, quantize_base
from llm.atomic import replace_directory
from llm.config import RENAMED_FIELDS, describe, fields_added_later, saved_config, training_form
from llm.data import (BatchSampler, cache_key, documents_fingerprint, read_documents,
                      tokenize_corpus, unigram_entropy, validation_batches)
from llm.distributed import World, is_lost_peer
from llm.memory import estimate, format_bytes
from llm.plan import (ModelMustChange, NoPlanFits, RunShape, apply_plan, make_plan, resize_heads,
                      run_limits, rung_to_plan)
from llm.tokenizer import ByteTokenizer
from llm.trainer import (DTYPES, CollapseMonitor, MemoryGuard, NonFiniteGuard, OptionError,
                         OverfitMonitor, SampleMonitor, SpikeMonitor, TrainConfig, TrainingCallback,
                         TrainingData, make_optimizer, read_jsonl, train)
from llm.weights import quantization_of, read_config_file
from power_retention.cpu_tuning import tune_process

# Options that may differ when resuming (to extend or re-schedule a run); any other option
# given on the command line must match the run's train_config.json.
RESUMABLE_OVERRIDES = ("steps", "eval_every", "eval_batches", "save_every", "patience")
# Options of pretraining that a fine-tuned model (its base's config and tokenizer) does not take.
PRETRAINING_ONLY = ("base", "model", "tokenizer", "mixer", "deg", "head_dim", "model_fields",
                    "document_resets")
QUICK_TEST = dict(model="ultra-tiny", tokenizer="byte", steps=150, batch_size=16, seq_len=64,
                  warmup=15, eval_every=50, save_every=50, eval_batches=8, patience=0)


def default_cache_dir() -> Path:
    value = os.environ.get("POWER_RETENTION_CACHE", "")
    if value and Path(value).is_file():
        raise ValueError(f"POWER_RETENTION_CACHE={value} is a file; expected a directory (or a "
                         f"path that does not exist yet)")
    return Path(value) if value else Path.home() / ".cache" / "power-retention-mlx"


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


def model_config(cfg: TrainConfig, vocab_size: int, bos_id: int | None = None):
    overrides = {"vocab_size": vocab_size}
    if cfg.document_resets:
        overrides["document_start_id"] = bos_id
    if cfg.mixer:
        overrides["mixer"] = cfg.mixer
    if cfg.deg:
        overrides["deg"] = cfg.deg
    if cfg.head_dim:
        preset = create_model_config(cfg.model)
        if preset.hidden_size % cfg.head_dim:
            raise click.UsageError(f"--head-dim {cfg.head_dim} does not divide the model width "
                                   f"{preset.hidden_size}")
        overrides.update(resize_heads(preset, cfg.head_dim))
    overrides.update(cfg.model_fields)
    return create_model_config(cfg.model, **overrides)


def prepare(cfg: TrainConfig, tokenizer=None):
    """The tokenizer (``tokenizer``: a fine-tuned base's own) and the tokenized corpus."""
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    documents = read_documents(cfg.data)
    if tokenizer is None:
        preset_vocab = create_model_config(cfg.model).vocab_size
        tokenizer = build_tokenizer(cfg, documents, preset_vocab, cache_root)
    spec, fingerprint, val_documents = cfg.data, documents_fingerprint(documents), None
    if cfg.val_data:
        val_documents = read_documents(cfg.val_data)
        spec += f"|validation:{cfg.val_data}"
        fingerprint += documents_fingerprint(val_documents)
    key = cache_key(spec, tokenizer, cfg.val_fraction, cfg.seed, fingerprint)
    data = tokenize_corpus(documents, tokenizer, cache_root / "tokens", key,
                           val_fraction=cfg.val_fraction, seed=cfg.seed, val_documents=val_documents)
    return tokenizer, data


# ----------------------------------------------------------------------------- fine-tuning

def base_model_dir(base: str) -> Path:
    """The model directory that --base names: itself, or a run directory's best checkpoint."""
    path = Path(base)
    if (path / "config.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        return _checkpoint_model_dir(path)
    raise click.UsageError(f"--base {base}: not a model directory (no config.json) nor a run "
                           f"directory (no checkpoints/)")


def finetuned_model(base, base_dir: Path, cfg: TrainConfig) -> tuple:
    """(the model to train, its adapter config) from the loaded ``base``: the base frozen and
    quantized as asked, with adapters (None for --adapter full, which trains every weight)."""
    if cfg.dtype != "float32":
        base.set_dtype(DTYPES[cfg.dtype])
    if cfg.adapter == "full":
        return base, None
    if cfg.quantize_base != "none":
        quantize_base(base, int(cfg.quantize_base))
    config = add_adapters(base, cfg.adapter, cfg.rank, cfg.adapter_layers or None,
                          scale=cfg.adapter_scale)
    config["model"] = str(base_dir.resolve())  # how mlx-lm's adapter_config.json names its base
    config["base_fingerprint"] = cfg.base_fingerprint
    config["quantize_base"] = cfg.quantize_base
    return base, config


def steps_for_epochs(cfg: TrainConfig, train_tokens: int, seq_len: int) -> int:
    windows = max((train_tokens - 1) // seq_len, 1)
    return max(1, math.ceil(cfg.epochs * windows / (cfg.batch_size * cfg.grad_accum)))


# ----------------------------------------------------------------------------- a run

class FaultInjection(TrainingCallback):
    """Faults on chosen steps, for the tests of the guards (the hidden --inject option):
    "nan:STEP,STEP" makes those steps' loss non-finite, "oom:STEP" fails that step with Metal's
    out-of-memory error, "oom@RANK:STEP" on one rank of a data-parallel run only; entries
    separated by ";". A step listed n times fails n times (the step redone after a rollback or
    a re-plan fails again until then)."""

    def __init__(self, spec: str, rank: int = 0):
        self.remaining = {"nan": Counter(), "oom": Counter()}
        for entry in filter(None, spec.split(";")):
            kind, _, steps = entry.partition(":")
            kind, _, only_rank = kind.partition("@")
            if kind in self.remaining and only_rank in ("", str(rank)):
                self.remaining[kind].update(int(s) for s in steps.split(",") if s)

    def on_step_begin(self, trainer, step):
        if self.remaining["oom"][step]:
            self.remaining["oom"][step] -= 1
            raise RuntimeError("[metal::malloc] Resource limit (499000) exceeded. (injected)")

    def on_gradients(self, trainer, step, result):
        if self.remaining["nan"][step]:
            self.remaining["nan"][step] -= 1
            result.loss = result.loss * float("nan")


def run_training(cfg: TrainConfig, resume: bool, world: World) -> dict:
    """Prepare the data, plan the memory, build the model, and train it, guarded and monitored;
    ``resume``: continue the run in ``cfg.out`` from its last checkpoint, if it has one;
    ``world``: this process's place among the run's (data parallel under mlx.launch)."""
    mx.random.seed(cfg.seed)
    check_world(cfg, world)
    base = adapter_config = None
    if cfg.base:  # fine-tuning: the base's model and tokenizer
        base_dir = base_model_dir(cfg.base)
        fingerprint = files_fingerprint(base_dir)
        if cfg.base_fingerprint and cfg.base_fingerprint != fingerprint:
            raise click.UsageError(f"--base {cfg.base} has changed since this run began (its "
                                   f"files differ): resuming over another base would mix two "
                                   f"models; fine-tune it in a new run")
        cfg.base_fingerprint = fingerprint
        base, tokenizer = load(base_dir)
        if cfg.adapter == "full" and quantization_of(base):
            raise click.UsageError(f"--base {cfg.base} is quantized: its weights cannot be trained "
                                   f"(--adapter full); train lora or dora adapters over it")
        tokenizer, corpus = main_first(world, lambda: prepare(cfg, tokenizer))
        requested_config = base.config
    else:
        tokenizer, corpus = main_first(world, lambda: prepare(cfg))
        requested_config = model_config(cfg, tokenizer.vocab_size, tokenizer.bos_id)
    seq_len = cfg.seq_len or requested_config.max_position_embeddings
    if not cfg.plan and cfg.epochs:
        cfg.steps = steps_for_epochs(cfg, len(corpus.train_tokens), seq_len)
        cfg.resolve_warmup()
        cfg.warmup = min(cfg.warmup, cfg.steps - 1)
    # The memory plan is per process: each holds a world-size share of every batch.
    requested = RunShape(requested_config, cfg.batch_size // world.size, cfg.grad_accum, seq_len,
                         adapters=cfg.adapters())
    if not cfg.plan:  # a fresh run plans; a resumed one keeps the plan it started with
        # Rank 0 measures; the other ranks of a data-parallel run then read its choice.
        requested = main_first(world, lambda: tuned_form(requested))
        requested = requested.replace(cpu_streams=step_streams(cfg, requested, world))
        plan, limits = make_plan(cfg, requested)
        cfg.plan = rung_to_plan(plan.chosen, requested)
    else:
        limits = run_limits(cfg)
    shape = apply_plan(requested, cfg.plan)
    # Again: measuring a step above initialised models, and the weights must not depend on it.
    mx.random.seed(cfg.seed)
    if base is not None:
        model, adapter_config = finetuned_model(base, base_dir, cfg)
    else:
        model = RetentionLLM(shape.config)
        if cfg.dtype != "float32":
            model.set_dtype(DTYPES[cfg.dtype])
    data = TrainingData(
        tokenizer=tokenizer,
        sampler=BatchSampler(corpus.train_tokens, corpus.train_mask, seq_len, shape.batch_size,
                             cfg.seed),
        # From the requested batch size, so the validation set is the same whatever the plan.
        val_batches=validation_batches(corpus.val_tokens, corpus.val_mask, seq_len, cfg.batch_size,
                                       cfg.eval_batches),
        unigram_entropy=unigram_entropy(corpus.train_tokens, tokenizer.vocab_size),
        adapter_config=adapter_config)

    if base is not None:
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        print(f"fine-tuning {cfg.base} ({describe(shape.config)}): {cfg.adapter}"
              + (f" rank {cfg.rank} on {cfg.adapter_layers or 'all'} blocks" if adapter_config else "")
              + (f" over a {cfg.quantize_base}-bit base" if cfg.quantize_base != "none" else "")
              + f"; {trainable:,} trainable parameters")
    else:
        print(f"model: {cfg.model}, {describe(shape.config)}")
    print(f"data: {cfg.data}: {corpus.n_train_documents} train / {corpus.n_val_documents} validation "
          f"documents, {len(corpus.train_tokens):,} / {len(corpus.val_tokens):,} tokens; tokenizer "
          f"vocab {tokenizer.vocab_size}; unigram entropy {data.unigram_entropy:.3f} nats")
    effective = shape.batch_size * shape.grad_accum
    split = f", each split across {shape.cpu_streams} CPU streams" if shape.cpu_streams > 1 else ""
    print(f"training: {cfg.steps} steps of {effective} x {seq_len} tokens ({shape.batch_size} x "
          f"{shape.grad_accum} micro-batches{', checkpointing' if shape.checkpointing else ''}"
          f"{split}), "
          f"{cfg.optimizer}, lr {cfg.lr} -> {cfg.min_lr}, {cfg.dtype}; plan: {cfg.plan['rung']}; "
          f"run directory {cfg.out}")

    # The fault injection comes first: its failures are the guards' to catch.
    callbacks = [FaultInjection(cfg.inject, world.rank)] if cfg.inject else []
    callbacks += [MemoryGuard(requested, limits), NonFiniteGuard(cfg.max_bad_steps),
                  SampleMonitor(corpus.val_tokens, cfg.seed), CollapseMonitor(), OverfitMonitor(),
                  SpikeMonitor()]
    return train(model, make_optimizer(cfg), data, cfg, callbacks, resume=resume, world=world)


def tuned_form(requested: RunShape) -> RunShape:
    """``requested`` with the retention form and chunk size measured fastest for its training
    step on this device (measured once per machine, then kept: power_retention.tuning), unless
    the model names a chunk size."""
    choice = training_form(requested.config, requested.batch_size, requested.seq_len)
    if choice is None:
        return requested
    print(f"retention form for this step on this device: {choice.describe()}")
    return requested.replace(method=choice.method, chunk_size=choice.chunk_size)


def step_streams(cfg: TrainConfig, requested: RunShape, world: World) -> int:
    """CPU streams each micro-batch is split across: --cpu-streams, else measured (or kept from
    an earlier measurement: llm.cpu_streams), else 1 for the ranks of a data-parallel run (they
    share the cores already)."""
    if cfg.cpu_streams:
        return cfg.cpu_streams
    if world.size > 1:
        return 1
    choice = cpu_streams.choose(requested, cfg.dtype)
    print(f"CPU streams for this step on this device: {choice.describe()}")
    return choice.count


def main_first(world: World, make):
    """``make()`` on rank 0, then on the other ranks, which then find the caches it filled
    (the tokenizer and the tokenized corpus) instead of writing them at the same time."""
    if not world.is_main:
        world.agree(False)
    result = make()
    if world.is_main:
        world.agree(False)
    return result


def check_world(cfg: TrainConfig, world: World):
    """A data-parallel run's checks (see llm/distributed.py); only rank 0 prints."""
    if world.size == 1 and cfg.world_size == 1:
        return
    if not world.is_main:
        sys.stdout = open(os.devnull, "w")

    def stopped(signum, frame):
        # mlx.launch ends every rank this way once one has stopped; checkpoints are atomic.
        print(f"rank {world.rank}: stopped by SIGTERM (under mlx.launch: another process of this "
              f"data-parallel run stopped); resume from the last checkpoint with the same "
              f"mlx.launch command and train.py --resume {cfg.out}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    if cfg.plan and cfg.world_size != world.size:  # a resume
        raise click.UsageError(
            f"{cfg.out} was trained by {cfg.world_size} process(es), and this is {world.size}: the "
            f"memory plan and the batch split are per process, so resume it with as many: "
            + ("python train.py --resume RUN" if cfg.world_size == 1 else
               f"mlx.launch -n {cfg.world_size} ... train.py --resume {cfg.out}"))
    if cfg.batch_size % world.size:
        raise click.UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the "
                               f"{world.size} processes: each takes an equal share of every batch")
    cfg.world_size = world.size


# ----------------------------------------------------------------------------- command line

def validated(cfg: TrainConfig) -> TrainConfig:
    try:
        cfg.validate()
    except OptionError as error:
        raise click.UsageError(str(error)) from error
    return cfg


def click_option(spec: dataclasses.Field):
    """The command-line option of a TrainConfig field, from its declaration (llm.trainer.option):
    --field-name unless it names its flags, typed by its default; a boolean is a --x/--no-x
    pair, a dict a repeatable FIELD=VALUE."""
    names = spec.metadata.get("flags", (f"--{spec.name.replace('_', '-')}",))
    settings = {"help": spec.metadata["help"], "hidden": spec.metadata.get("hidden", False)}
    if spec.default_factory is not dataclasses.MISSING:
        return click.option(*names, spec.name, multiple=True, metavar="FIELD=VALUE",
                            callback=lambda ctx, param, value: parse_model_fields(value), **settings)
    if isinstance(spec.default, bool):
        names = (f"{names[0]}/--no-{names[0][2:]}",)
    elif "choices" in spec.metadata:
        settings["type"] = click.Choice(list(spec.metadata["choices"]))
    else:
        settings["type"] = type(spec.default)
    return click.option(*names, spec.name, default=spec.default, show_default=spec.default != "",
                        **settings)


def config_options(memory: bool, finetune: bool = False, without=()):
    """A decorator adding TrainConfig's options: those that shape a run's memory (shared by
    training and `train.py plan`), or the others; the fine-tuning ones with ``finetune``;
    none named in ``without``."""
    options = [click_option(spec) for spec in dataclasses.fields(TrainConfig)
               if "help" in spec.metadata and spec.metadata.get("memory", False) == memory
               and (finetune or not spec.metadata.get("finetune")) and spec.name not in without]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


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


class Commands(click.Group):
    """A user's error (a bad value, an unreadable or damaged file, a failed write) ends the
    command with one line naming it, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ValueError, OSError) as error:
            raise click.ClickException(str(error)) from error


@click.group(cls=Commands, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@config_options(memory=True)
@click.option("--mode", type=click.Choice(["llm"]), default="llm", help="what to train (only llm)")
@config_options(memory=False)
@click.option("--resume", "resume", default=None, type=click.Path(file_okay=False),
              help="continue the run in this directory from its last checkpoint")
@click.option("--quick-test", is_flag=True, help="a whole run in under a minute; fails unless the loss fell")
@click.pass_context
def cli(ctx, mode, resume, quick_test, **options):
    """Train a RetentionLLM (subcommands: sample, report)."""
    if ctx.invoked_subcommand is not None:
        return
    tune_process()
    world = World.join()
    given = {name for name in options
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if resume is not None:
        cfg = _resumed_config(Path(resume), options, given, world)
    else:
        if quick_test:
            options.update({k: v for k, v in QUICK_TEST.items() if k not in given})
        cfg = new_run(options, "quick-test" if quick_test else options["model"], world)
    summary = execute(cfg, resume is not None, world)
    if quick_test:
        fell = summary["initial_val_loss"] - summary["best_val_loss"]
        if not fell >= 0.5:
            raise click.ClickException(
                f"QUICK TEST FAILED: validation loss fell by {fell:.3f} nats "
                f"({summary['initial_val_loss']:.3f} -> {summary['best_val_loss']:.3f}); expected >= 0.5")
        print(f"quick test passed: validation loss {summary['initial_val_loss']:.3f} -> "
              f"{summary['best_val_loss']:.3f} in {summary['elapsed_s']:.0f} s")


def new_run(options: dict, name: str, world: World) -> TrainConfig:
    """The config of a new run (its directory runs/NAME-DATE unless --out names one, which
    must not hold a run already)."""
    cfg = validated(TrainConfig(**options))
    if not cfg.out and world.size > 1:  # each process would stamp its own date
        raise click.UsageError("a data-parallel run needs --out: every process must name the same "
                               "run directory")
    if not cfg.out:
        cfg.out = str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise click.UsageError(f"--out {out} already holds a run: continue it with "
                               f"--resume {out}, or choose another --out (nothing was written)")
    return cfg


def execute(cfg: TrainConfig, resuming: bool, world: World) -> dict:
    """Train (``resuming``: from the run's last checkpoint); a memory plan that must change the
    model restarts the run loudly from step 0, keeping the old checkpoints."""
    while True:
        try:
            return run_training(cfg, resuming, world)
        except ModelMustChange as change:
            run_dir = Path(cfg.out)
            kept = run_dir / f"checkpoints-before-{time.strftime('%Y%m%d-%H%M%S')}"
            if world.is_main:
                kept.mkdir()
                for name in ("checkpoints", "metrics.jsonl", "samples.jsonl"):
                    if (run_dir / name).exists():
                        os.replace(run_dir / name, kept / name)
            world.agree(False)  # the others restart once the old run is set aside
            print(f"!!! MEMORY: only rungs that change the model are left; RESTARTING FROM STEP 0 "
                  f"with '{change}' (the old checkpoints and logs are in {kept}) !!!")
            resuming = True  # no checkpoint there now: a fresh start that keeps the new plan
            cfg.inject = ""  # test injections have been delivered
        except (ValueError, OSError) as error:  # bad data or files, a failed write: one line
            raise click.ClickException(str(error)) from error
        except RuntimeError as error:
            if not is_lost_peer(error):
                raise
            raise click.ClickException(
                f"another process of this data-parallel run stopped ({error}); the run ends here. "
                f"Resume it from its last checkpoint with the same mlx.launch command and "
                f"train.py --resume {cfg.out}") from error


def _resumed_config(directory: Path, options: dict, given: set, world: World) -> TrainConfig:
    path = directory / "train_config.json"
    if not path.is_file():
        raise click.UsageError(f"--resume {directory}: no train_config.json there, not a run directory")
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise click.UsageError(f"--resume {directory}: {path.name} cannot be read ({error})") from None
    if not isinstance(saved, dict):
        raise click.UsageError(f"--resume {directory}: {path.name} must hold a JSON object of options")
    saved = upgrade_saved_options(saved)
    unknown = sorted(set(saved) - {spec.name for spec in dataclasses.fields(TrainConfig)})
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
    cfg = validated(TrainConfig(**saved))
    if any(name in given for name in RESUMABLE_OVERRIDES) and world.is_main:
        cfg.save(path)
    return cfg


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
        saved["plan"].setdefault("cpu_streams", 1)  # planned before steps were split: one stream
    return saved


def _read_json(path: Path):
    """A run file's JSON, or ValueError naming the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the run is incomplete (or not a run directory)") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} cannot be read: {error}") from None


def _checkpoint_model_dir(run_dir: Path) -> Path:
    for name in ("best", "last"):
        directory = run_dir / "checkpoints" / name / "model"
        if (directory / "config.json").is_file():
            return directory
    if any((run_dir / "checkpoints" / name / "adapters").is_dir() for name in ("best", "last")):
        raise click.UsageError(f"{run_dir} holds adapters, not a model: merge them into its base "
                               f"with `train.py fuse {run_dir}` and use {run_dir / 'fused'}")
    raise click.UsageError(f"{run_dir}: no checkpoint found (expected checkpoints/best or last)")


@cli.command("finetune")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@config_options(memory=True, finetune=True, without=PRETRAINING_ONLY)
@config_options(memory=False, finetune=True, without=PRETRAINING_ONLY)
def finetune(base, **options):
    """Fine-tune BASE (a model directory, or a run directory's best checkpoint) on --data:
    lora or dora adapters (over a 4- or 8-bit base with --quantize-base: QLoRA), or every
    weight (--adapter full), with the trainer's guards; resume with train.py --resume RUN_DIR."""
    tune_process()
    world = World.join()
    options.update(base=str(Path(base).resolve()), model="", adapter=options["adapter"] or "lora")
    execute(new_run(options, f"finetune-{Path(base).resolve().name}", world), False, world)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="", help="model directory to write (default RUN_DIR/fused)")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default="best", show_default=True)
def fuse(run_dir, out, checkpoint):
    """Write a fine-tuning run's model, its adapters merged into the base, as a plain model
    directory (what `train.py sample`, `llm.load` and mlx-lm load)."""
    run_dir = Path(run_dir)
    cfg = TrainConfig(**upgrade_saved_options(_read_json(run_dir / "train_config.json")))
    if not cfg.base:
        raise click.UsageError(f"{run_dir} is a pretraining run: there is nothing to fuse "
                               f"(its checkpoints are model directories already)")
    checkpoint_dir = run_dir / "checkpoints" / checkpoint
    if cfg.adapter == "full":
        model, tokenizer = load(checkpoint_dir / "model")
    else:
        base_dir = base_model_dir(cfg.base)
        if files_fingerprint(base_dir) != cfg.base_fingerprint:
            raise click.UsageError(f"the base {cfg.base} has changed since {run_dir} fine-tuned it "
                                   f"(its files differ): its adapters would not fit it")
        model, tokenizer = load(base_dir)
        if cfg.dtype != "float32":
            model.set_dtype(DTYPES[cfg.dtype])
        if cfg.quantize_base != "none":
            quantize_base(model, int(cfg.quantize_base))
        load_adapters(model, checkpoint_dir / "adapters")
        fuse_adapters(model)
    out = Path(out) if out else run_dir / "fused"
    model.save_pretrained(out, tokenizer)
    print(f"wrote {out}: {describe(model.config)}"
          + (f" ({cfg.quantize_base}-bit)" if cfg.quantize_base != "none" else ""))


@cli.command("plan")
@config_options(memory=True, finetune=True)
def plan_command(**options):
    """Print the memory estimate and the plan of a run, without training (of fine-tuning with
    --base or --adapter)."""
    if options["base"] and not options["adapter"]:
        options["adapter"] = "lora"
    cfg = validated(TrainConfig(**options))
    if cfg.base:
        base_dir = base_model_dir(cfg.base)
        config = saved_config(read_config_file(base_dir), source=f"{base_dir}/config.json")
        name = str(base_dir)
    else:
        config = model_config(cfg, create_model_config(cfg.model).vocab_size)
        name = cfg.model
    # A run measures whether to split its steps across CPU streams (--cpu-streams 0); the plan
    # assumes one unless told, a split adding only a copy of the gradients.
    requested = RunShape(config, cfg.batch_size, cfg.grad_accum,
                         cfg.seq_len or config.max_position_embeddings, adapters=cfg.adapters(),
                         cpu_streams=cfg.cpu_streams or 1)
    estimate_ = estimate(config, requested.batch_size, requested.seq_len, dtype=cfg.dtype,
                         optimizer=cfg.optimizer, adapters=requested.adapters,
                         cpu_streams=requested.cpu_streams, compiled=run_limits(cfg).compiled)
    print(f"{name}: {describe(config)}; batch {requested.batch_size} x {requested.grad_accum} "
          f"micro-batches, {requested.seq_len} tokens, {cfg.dtype}, {cfg.optimizer}"
          + (f"; fine-tuning: {cfg.adapter}" if cfg.adapter else "")
          + (f" rank {cfg.rank}, {cfg.adapter_layers or 'all'} blocks" if cfg.adapter in ("lora", "dora") else "")
          + (f", {cfg.quantize_base}-bit base" if cfg.quantize_base != "none" else ""))
    print(f"estimate as requested ({estimate_.method} form): " + ", ".join(
        f"{name} {format_bytes(getattr(estimate_, name))}" for name in
        ("parameters", "gradients", "optimizer_state", "activations", "logits_and_loss", "transient"))
        + f"; total {format_bytes(estimate_.total)}; largest buffer {estimate_.largest_buffer_name} "
          f"{format_bytes(estimate_.largest_buffer)}; about {estimate_.live_buffers:,} live buffers")
    try:
        plan, _ = make_plan(cfg, requested)
    except NoPlanFits as error:
        raise click.ClickException(str(error)) from error
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
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise click.UsageError(f"{run_dir}: no metrics.jsonl, not a run directory")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    config = _read_json(run_dir / "train_config.json")
    print(f"run {run_dir}: model {config.get('base') or config['model']}, data {config['data']}, "
          f"{len(steps)} steps logged")
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
        summary = _read_json(summary_path)
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
    figure.suptitle(f"{config.get('base') or config['model']} on {config['data']}")
    figure.tight_layout()
    figure.savefig(run_dir / "loss.png", dpi=100)
    print(f"  plot: {run_dir / 'loss.png'}")


if __name__ == "__main__":
    cli()
