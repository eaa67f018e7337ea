"""Fit a training run to a machine: its limits, and the degradation ladder.

``device_limits`` reads what the machine allows (Metal's device info, or physical RAM on the
CPU backend); ``DEVICE_PROFILES`` plans for a named Apple Silicon machine from anywhere.
``plan_training`` estimates the run as asked and, if it does not fit, walks the ladder,
least loss of fidelity first, recording every rung it tried:

    1. gradient checkpointing per block
    2. micro-batches with gradient accumulation (same effective batch)
    3. the retention form and chunk size
    4. narrower heads, more of them, at the same width (smaller D)   } these change the model
    5. power 2 -> 1                                                   } and are taken only when
    6. fewer layers, then a narrower model                            } 1-3 cannot fit

``make_plan`` does this for a training run's options and prints the table; the rung it chose
is stored in the run's train_config.json (``rung_to_plan``) and read back on resume
(``apply_plan``), so a resumed run keeps its plan.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field

import mlx.core as mx

from .config import ModelConfig
from .memory import GB, Adapters, estimate, format_bytes

# Plan to use at most this share of the budget: the estimate's stated accuracy is +-15%.
SAFETY_MARGIN = 0.85
# MLX's fallback for Metal's limit on live buffers ("[metal::malloc] Resource limit (499000)
# exceeded"), the count our users hit (ml-explore/mlx#1718, #3849).
METAL_RESOURCE_LIMIT = 499_000


@dataclass(frozen=True)
class DeviceLimits:
    name: str
    memory_bytes: int                 # what one process may use
    max_buffer_bytes: int | None      # largest single buffer (Metal's max_buffer_length)
    resource_limit: int | None        # live buffers (Metal)
    source: str
    # Whether the op's compiled CPU products run there (llm.memory.estimate's ``compiled``):
    # None for this machine, as it is; False for a Mac's GPU.
    compiled: bool | None = None


def _apple(gb: int) -> DeviceLimits:
    # macOS lets the GPU wire about two thirds of unified memory on machines up to 36 GB and
    # three quarters above (the default of iogpu.wired_limit_mb, which MLX reports as
    # max_recommended_working_set_size); Metal's max_buffer_length is about half of memory
    # (an M2 Ultra 192 GB reports 108 GiB: ml-explore/mlx#1060).
    ram = gb * 2**30
    share = 2 / 3 if gb <= 36 else 3 / 4
    return DeviceLimits(f"{gb}gb", int(ram * share), ram // 2, METAL_RESOURCE_LIMIT,
                        f"Apple Silicon {gb} GB profile (assumed: working set {share:.0%} of "
                        f"RAM, max buffer 50% of RAM, {METAL_RESOURCE_LIMIT:,} live buffers)", compiled=False)


DEVICE_PROFILES = {f"{gb}gb": _apple(gb) for gb in (8, 16, 24, 32, 36, 48, 64, 96, 128, 192)}


def device_limits(profile: str | None = None, budget_gb: float | None = None) -> DeviceLimits:
    """The limits to plan for: a named profile, else this machine; --memory-budget overrides."""
    if profile is not None:
        if profile not in DEVICE_PROFILES:
            raise ValueError(f"unknown device profile {profile!r}; known: {', '.join(DEVICE_PROFILES)}")
        limits = DEVICE_PROFILES[profile]
    elif mx.metal.is_available():
        info = {}
        for getter in (getattr(mx, "device_info", None), getattr(mx.metal, "device_info", None)):
            try:
                info = dict(getter()) if getter else {}
            except Exception:  # keys and entry points differ across MLX versions
                info = {}
            if info:
                break
        memory = info.get("max_recommended_working_set_size") or int(info.get("memory_size", 0) * 2 / 3)
        limits = DeviceLimits("this Mac", int(memory), info.get("max_buffer_length"),
                              info.get("resource_limit", METAL_RESOURCE_LIMIT),
                              "mx.device_info() of this machine")
    else:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limits = DeviceLimits("this machine (CPU)", ram, None, None, "physical RAM (os.sysconf)")
    if budget_gb is not None:
        if not budget_gb > 0:
            raise ValueError(f"--memory-budget must be > 0 GB, got {budget_gb}")
        limits = dataclasses.replace(limits, memory_bytes=int(budget_gb * GB),
                                     source=f"--memory-budget {budget_gb:g} GB ({limits.source})")
    return limits


@dataclass
class RunShape:
    """Everything the ladder may change: how a step runs, and (rungs 4-6) the model."""
    config: ModelConfig
    batch_size: int
    grad_accum: int
    seq_len: int
    checkpointing: bool = False
    method: str = "auto"
    chunk_size: int | None = None
    adapters: Adapters | None = None  # fine-tuning: what is trained of a base that cannot change
    cpu_streams: int = 1  # each micro-batch split across this many CPU streams (llm.cpu_streams)

    def replace(self, **changes) -> "RunShape":
        return dataclasses.replace(self, **changes)

    def with_model(self, **changes) -> "RunShape":
        return self.replace(config=dataclasses.replace(self.config, **changes))


def resize_heads(config: ModelConfig, head_dim: int) -> dict:
    """The head fields of ``config`` with heads ``head_dim`` wide: as many heads as keep their
    total width, and as many query heads per key/value head as before."""
    heads = config.num_attention_heads * config.head_dim // head_dim
    group = config.num_attention_heads // config.num_key_value_heads
    return {"head_dim": head_dim, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // group)}


@dataclass
class Rung:
    name: str
    shape: RunShape
    total: int
    largest_buffer: int
    fits: bool
    why: str
    changes_model: bool = False


@dataclass
class Plan:
    limits: DeviceLimits
    rungs: list = field(default_factory=list)

    @property
    def chosen(self) -> Rung | None:
        return next((rung for rung in self.rungs if rung.fits), None)

    def table(self) -> str:
        budget = self.limits.memory_bytes * SAFETY_MARGIN
        lines = [f"memory plan for {self.limits.name}: budget {format_bytes(self.limits.memory_bytes)} "
                 f"x {SAFETY_MARGIN} margin = {format_bytes(budget)}"
                 + (f", max buffer {format_bytes(self.limits.max_buffer_bytes)}"
                    if self.limits.max_buffer_bytes else "") + f" [{self.limits.source}]",
                 f"  {'rung':<44} {'estimate':>10} {'largest buffer':>15}  fits  why"]
        for rung in self.rungs:
            mark = "yes" if rung.fits else "no "
            lines.append(f"  {rung.name:<44} {format_bytes(rung.total):>10} "
                         f"{format_bytes(rung.largest_buffer):>15}  {mark}   {rung.why}")
        chosen = self.chosen
        if chosen is None:
            lines.append("  NO PLAN FITS: even the smallest rung is over the budget")
        elif chosen.changes_model:
            lines.append(f"  !!! THE MODEL WAS CHANGED TO FIT: {chosen.name} !!!")
        return "\n".join(lines)


def _estimate(shape: RunShape, dtype: str, optimizer: str, compiled: bool | None):
    return estimate(shape.config, shape.batch_size, shape.seq_len, dtype=dtype, optimizer=optimizer,
                    checkpointing=shape.checkpointing, method=shape.method,
                    chunk_size=shape.chunk_size, adapters=shape.adapters,
                    cpu_streams=shape.cpu_streams, compiled=compiled)


def _ladder(shape: RunShape):
    """(name, shape, changes_model) for every rung after the requested run, in order."""
    shape = shape.replace(checkpointing=True)
    yield "1. gradient checkpointing", shape, False
    while shape.batch_size > 1:
        # Split by the batch's smallest prime factor, so the effective batch stays the same.
        factor = next(f for f in range(2, shape.batch_size + 1) if shape.batch_size % f == 0)
        shape = shape.replace(batch_size=shape.batch_size // factor,
                              grad_accum=shape.grad_accum * factor)
        yield f"2. micro-batches {shape.batch_size} x {shape.grad_accum}", shape, False
    if shape.config.mixer == "power":
        for method, chunk in (("chunked", 64), ("chunked", 32), ("chunked", 16), ("attention", None)):
            yield (f"3. {method} form" + (f", chunk {chunk}" if chunk else ""),
                   shape.replace(method=method, chunk_size=chunk), False)
    if shape.adapters is not None:  # a fine-tuned base keeps its shape
        return
    if shape.config.mixer == "power":
        # The model-changing rungs go back to the automatic form: with smaller heads the
        # cheapest form changes, and each rung's estimate uses it.
        while shape.config.head_dim > 16 and shape.config.head_dim % 2 == 0:
            shape = shape.with_model(**resize_heads(shape.config, shape.config.head_dim // 2))
            yield (f"4. heads of {shape.config.head_dim} x {shape.config.num_attention_heads}",
                   shape, True)
        if shape.config.deg > 1:
            shape = shape.with_model(deg=1)
            yield "5. power 1", shape, True
    while shape.config.num_hidden_layers > 1:
        shape = shape.with_model(num_hidden_layers=max(1, shape.config.num_hidden_layers // 2))
        yield f"6. {shape.config.num_hidden_layers} layers", shape, True
    while shape.config.hidden_size >= 2 * max(shape.config.head_dim, 16):
        config = shape.config
        width = config.hidden_size // 2
        heads = max(1, config.num_attention_heads // 2)
        # The most key/value heads (at most as many as before) that divide the query heads.
        kv_heads = max(k for k in range(1, min(config.num_key_value_heads, heads) + 1)
                       if heads % k == 0)
        shape = shape.with_model(hidden_size=width, num_attention_heads=heads,
                                 num_key_value_heads=kv_heads,
                                 intermediate_size=max(1, config.intermediate_size // 2))
        yield f"6. width {width}", shape, True


def plan_training(shape: RunShape, limits: DeviceLimits, *, dtype: str = "float32",
                  optimizer: str = "adamw", degrade: bool = True, start_after: str | None = None) -> Plan:
    """The first rung that fits (the requested run if it does), with every rung tried.

    start_after: the name of a rung that already failed at run time; the plan starts below it.
    """
    plan = Plan(limits)
    budget = limits.memory_bytes * SAFETY_MARGIN
    rungs = itertools.chain([("0. as requested", shape, False)], _ladder(shape) if degrade else [])
    if start_after is not None:  # the rungs below the one that failed (none if it is unknown)
        rungs = itertools.islice(itertools.dropwhile(lambda rung: rung[0] != start_after, rungs), 1, None)
    for name, candidate, changes_model in rungs:  # lazily: rungs past the first fit are not built
        result = _estimate(candidate, dtype, optimizer, limits.compiled)
        reasons = []
        if result.total > budget:
            reasons.append(f"{format_bytes(result.total)} > {format_bytes(budget)}")
        if limits.max_buffer_bytes and result.largest_buffer > limits.max_buffer_bytes:
            reasons.append(f"{result.largest_buffer_name} buffer {format_bytes(result.largest_buffer)} "
                           f"> max buffer {format_bytes(limits.max_buffer_bytes)}")
        if limits.resource_limit and result.live_buffers > limits.resource_limit:
            reasons.append(f"{result.live_buffers:,} live buffers > {limits.resource_limit:,}")
        fits = not reasons
        why = "fits" if fits else "; ".join(reasons)
        plan.rungs.append(Rung(name, candidate, result.total, result.largest_buffer, fits, why,
                               changes_model))
        if fits:
            break
    return plan


class ModelMustChange(Exception):
    """Only rungs that change the model are left: the run restarts with the smaller model."""


class NoPlanFits(ValueError):
    """Not even the last rung the options allow fits the machine."""


def run_limits(options) -> DeviceLimits:
    """The limits a run's options plan for (``device_profile``, ``memory_budget``; empty or 0:
    this machine's)."""
    return device_limits(options.device_profile or None, options.memory_budget or None)


def make_plan(options, requested: RunShape, start_after: str | None = None) -> tuple[Plan, DeviceLimits]:
    """Plan ``requested`` as a run's options say (``device_profile``, ``memory_budget``,
    ``dtype``, ``optimizer``, ``degrade``: the fields of llm.trainer.TrainConfig), and print
    the table of the rungs tried. Raises NoPlanFits when none fits."""
    limits = run_limits(options)
    plan = plan_training(requested, limits, dtype=options.dtype, optimizer=options.optimizer,
                         degrade=options.degrade, start_after=start_after)
    print(plan.table())
    if plan.chosen is None:
        hint = "" if options.degrade else " (and --no-degrade forbids stepping down)"
        raise NoPlanFits(f"the run does not fit in {limits.name}{hint}: see the table above")
    return plan, limits


def rung_to_plan(rung: Rung, requested: RunShape) -> dict:
    """What a chosen rung changes, as stored in train_config.json."""
    model_changes = {name: value for name, value in dataclasses.asdict(rung.shape.config).items()
                     if getattr(requested.config, name) != value}
    return {"rung": rung.name, "batch_size": rung.shape.batch_size,
            "grad_accum": rung.shape.grad_accum, "checkpointing": rung.shape.checkpointing,
            "method": rung.shape.method, "chunk_size": rung.shape.chunk_size,
            "cpu_streams": rung.shape.cpu_streams, "model": model_changes,
            "estimate_bytes": rung.total}


def apply_plan(requested: RunShape, plan: dict) -> RunShape:
    """The run shape a stored plan (``rung_to_plan``) makes of ``requested``."""
    return requested.with_model(**plan["model"]).replace(
        batch_size=plan["batch_size"], grad_accum=plan["grad_accum"],
        checkpointing=plan["checkpointing"], method=plan["method"], chunk_size=plan["chunk_size"],
        cpu_streams=plan["cpu_streams"])
