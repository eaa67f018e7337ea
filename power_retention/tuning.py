"""The form and chunk size of ``power_retention``, measured on this device.

The fastest chunk size depends on the device, the BLAS, the shape and on whether a backward
pass follows: on a 2-core x86 server with OpenBLAS, fwd+bwd at T = 4096-32768 (4 heads of 64,
degree 2) ran 1.1-1.5x faster with chunks of 256 than of 64 (benchmarks/README.md), while
short sequences want the attention form. So when a call leaves ``chunk_size`` unset, the
first call of each shape on a device measures the candidates (each in turn for a few rounds,
on random inputs of that shape, as Triton's autotune does), keeps the fastest on disk, per device and
MLX version, and every later call (in any process) reads it. Where measuring is off, the cost
model (``cost.choose_method``, chunks of ``DEFAULT_CHUNK``) chooses.

    python -m power_retention.tuning                          # what is kept for this device
    python -m power_retention.tuning --tune B=1,T=8192,H=4,d=64 --mode training

Choices are overridable: pass ``method`` and ``chunk_size`` to the op (``ModelConfig.chunk_size``
or ``PowerRetention(chunk_size=...)``, ``train.py --set chunk_size=N``). The cache lives in
``$POWER_RETENTION_CACHE`` (a directory), else ``$XDG_CACHE_HOME/power_retention`` or
``~/.cache/power_retention``; ``POWER_RETENTION_TUNE=0`` turns measuring off.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import mlx.core as mx

from .cost import choose_method, estimated_bytes, memory_limit

CHUNK_SIZES = (32, 64, 128, 256)
DEFAULT_CHUNK = 64  # the cost model's chunk, where nothing was measured
# The attention form is a candidate up to this length; beyond it its T x T weights lose to
# every chunk size (the cost model's crossover is near T = 2000).
ATTENTION_MAX_T = 4096
MODES = ("forward", "training")
CACHE_VARIABLE = "POWER_RETENTION_CACHE"
TUNE_VARIABLE = "POWER_RETENTION_TUNE"
FORMAT = 1


@dataclass(frozen=True)
class Choice:
    method: str
    chunk_size: int
    source: str  # "measured", "cached", "cost model", "one chunk"
    seconds: dict | None = None  # candidate -> median seconds, when measured

    def describe(self) -> str:
        form = f"{self.method}" + (f", chunk {self.chunk_size}" if self.method == "chunked" else "")
        return f"{form} ({self.source})"


def cache_path() -> str:
    directory = os.environ.get(CACHE_VARIABLE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "power_retention")
    return os.path.join(directory, "tuning.json")


def measuring_enabled() -> bool:
    value = os.environ.get(TUNE_VARIABLE, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{TUNE_VARIABLE} must be 1 (measure) or 0 (cost model only), got {value!r}")
    return value == "1"


def device_name() -> str:
    """The device the op runs on here, as precisely as the choice depends on it."""
    if mx.default_device() == mx.gpu:
        return _gpu_name()
    from . import native
    from .cpu_tuning import blas_threads  # Linux only matters there

    compiled = native.build()
    return f"{_cpu_name()}, {blas_threads() or 'default'} BLAS threads{f', {compiled}' if compiled else ''}"


@functools.lru_cache(maxsize=1)
def _gpu_name() -> str:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return f"gpu {info.get('device_name', 'unknown')}"


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    """The CPU model, its cores, the BLAS loaded and its kernels: none changes while a process
    runs (only the BLAS's threads can, which ``device_name`` asks each time)."""
    from .cpu_tuning import loaded_blas, openblas_core

    model = platform.processor() or platform.machine()
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                              if line.startswith("model name")), model)
        except OSError:
            pass
    core = openblas_core()
    return f"cpu {model} x{os.cpu_count()}, {loaded_blas().split(' (')[0]}{f' {core}' if core else ''}"


def shape_key(*, B, T, Hq, H, d, e, deg, gated, dtype, with_state, mode) -> str:
    """Shapes within a factor of two in T share a choice (the bucket is the next power of two)."""
    bucket = 1 << max(0, T - 1).bit_length()
    return (f"B={B} T<={bucket} Hq={Hq} H={H} d={d} e={e} deg={deg} "
            f"{'gated' if gated else 'ungated'} {dtype}{' state' if with_state else ''} {mode}")


def _read_cache() -> dict:
    try:
        with open(cache_path()) as file:
            data = json.load(file)
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: measuring again rewrites it
    return data if isinstance(data, dict) and data.get("format") == FORMAT else {}


def _kept() -> dict:
    """The cache file's contents, read once per process and path (the op asks on every call)."""
    path = cache_path()
    if path not in _files:
        _files[path] = _read_cache()
    return _files[path]


def _entries(data: dict) -> dict:
    return data.get("devices", {}).get(f"mlx {mx.__version__}", {}).get(device_name(), {})


def kept(key: str) -> dict | None:
    """What was kept for ``key`` on this device under this MLX version (any process's)."""
    return _entries(_kept()).get(key)


def remember(key: str, record: dict) -> None:
    """Keep ``record`` (JSON) for ``key`` on this device under this MLX version, for every later
    process: the form choices here, and others measured the same way (llm.cpu_streams)."""
    data = _read_cache() or {"format": FORMAT}  # what other processes kept meanwhile, too
    devices = data.setdefault("devices", {}).setdefault(f"mlx {mx.__version__}", {})
    devices.setdefault(device_name(), {})[key] = {**record, "date": time.strftime("%Y-%m-%d")}
    path = cache_path()
    _files[path] = data
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as file:
            json.dump(data, file, indent=1)
        os.replace(temporary, path)  # readers see the old file or the new one, never half
    except OSError as error:
        print(f"power_retention.tuning: could not keep the choice in {path} ({error}); "
              f"it will be measured again", file=sys.stderr)


_files: dict = {}  # cache path -> its contents, as this process last read or wrote them
_chosen: dict = {}  # (cache path, device, shape key) -> this process's Choice


def candidates(T: int) -> list:
    forms = [("chunked", c) for c in CHUNK_SIZES if c < T]
    if T <= ATTENTION_MAX_T:
        forms.append(("attention", T))
    return forms or [("attention", T)]


def _measure(shape: dict, mode: str, dtype, repeats: int = 3) -> dict:
    """Median seconds of each candidate that fits in memory, on random inputs of ``shape``:
    after a warm-up run of each, ``repeats`` rounds that run every candidate once in turn, so
    that a machine whose speed drifts between seconds slows them alike (candidates within a
    few percent were ranked by that drift when timed one after another). A candidate over 3x
    the best of the first round is not run again."""
    from .ops import power_retention  # the op imports this module

    B, T, Hq, H, d, e = (shape[name] for name in ("B", "T", "Hq", "H", "d", "e"))
    # Keys of their own: measuring must not move the global random state (a seeded run draws
    # the same weights whether or not its shape was measured before).
    keys = mx.random.split(mx.random.key(0), 4)
    q = mx.random.normal((B, T, Hq, d), key=keys[0]).astype(dtype)
    k = mx.random.normal((B, T, H, d), key=keys[1]).astype(dtype)
    v = mx.random.normal((B, T, H, e), key=keys[2]).astype(dtype)
    log_g = -0.05 * mx.random.uniform(shape=(B, T, H), key=keys[3]) if shape["gated"] else None
    state = shape["with_state"]
    mx.eval(q, k, v, *([log_g] if log_g is not None else []))
    limit = memory_limit() / (4 if mode == "training" else 2)
    inputs = (q, k, v) if log_g is None else (q, k, v, log_g)
    every_input = tuple(range(len(inputs)))  # a training step's inputs all depend on weights
    steps = {}
    for method, chunk in candidates(T):
        size = dict(B=B, T=T, Hq=Hq, H=H, d=d, e=e, deg=shape["deg"], chunk_size=chunk,
                    gated=shape["gated"])
        if estimated_bytes(method, with_state=state, **size) > limit:
            continue

        def run(*inputs, method=method, chunk=chunk):
            out = power_retention(*inputs, deg=shape["deg"], method=method, chunk_size=chunk,
                                  return_state=state, check_gates=False)
            return out[0] if state else out

        label = "attention" if method == "attention" else f"chunked {chunk}"
        steps[label] = (lambda run=run: mx.grad(lambda *x: run(*x).sum(), argnums=every_input)(*inputs)) \
            if mode == "training" else (lambda run=run: run(*inputs))

    def seconds_of(step):
        started = time.perf_counter()
        mx.eval(step())
        return time.perf_counter() - started

    for step in steps.values():
        seconds_of(step)  # one-off work: building, compiling, the first allocations
    times = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            times[label].append(seconds_of(step))
        best = min(min(spent) for spent in times.values())
        steps = {label: step for label, step in steps.items() if times[label][0] <= 3 * best}
    return {label: statistics.median(spent) for label, spent in times.items()}


def choose(*, B, T, Hq, H, d, e, deg, gated, dtype=mx.float32, with_state=False, method="auto",
           mode="forward", measure=None) -> Choice:
    """The form and chunk size for this shape on this device: kept from an earlier
    measurement, measured now (``measure``: default ``POWER_RETENTION_TUNE``, on), or the cost
    model's. ``method="chunked"`` chooses among chunk sizes only."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dtype_name = str(dtype).split(".")[-1]
    key = shape_key(B=B, T=T, Hq=Hq, H=H, d=d, e=e, deg=deg, gated=gated, dtype=dtype_name,
                    with_state=with_state, mode=mode) + ("" if method == "auto" else f" {method}")
    if method == "auto" and T <= min(CHUNK_SIZES):  # one chunk: nothing to choose between
        return Choice("attention", T, "one chunk")
    memo = (cache_path(), device_name(), key)
    if memo not in _chosen:
        entry = kept(key)
        if entry:
            _chosen[memo] = Choice(entry["method"], entry["chunk_size"], "cached", entry.get("seconds"))
    if memo in _chosen:
        return _chosen[memo]
    shape = dict(B=B, T=T, Hq=Hq, H=H, d=d, e=e, deg=deg, gated=gated)
    if measuring_enabled() if measure is None else measure:
        try:
            seconds = _measure({**shape, "with_state": with_state}, mode, dtype)
        except Exception as error:  # noqa: BLE001 (a failed measurement must not fail the op)
            print(f"power_retention.tuning: measuring {key} failed ({error}); the cost model "
                  f"chooses", file=sys.stderr)
            seconds = {}
        if method == "chunked":
            seconds = {label: s for label, s in seconds.items() if label != "attention"}
        if seconds:
            fastest = min(seconds, key=seconds.get)
            form, _, chunk = fastest.partition(" ")
            choice = Choice(form, int(chunk) if chunk else T, "measured", seconds)
            remember(key, {**asdict(choice), "source": "cached"})
            _chosen[memo] = dataclasses.replace(choice, source="cached")
            return choice
    if method == "auto":
        method = choose_method(with_state=with_state, chunk_size=DEFAULT_CHUNK, **shape)
    return Choice(method, DEFAULT_CHUNK, "cost model")


def resolve(method: str, chunk_size: int | None, *, with_state: bool = False, dtype=mx.float32,
            mode: str = "forward", measure: bool | None = None, **shape) -> tuple:
    """(form, chunk size) a call with ``method`` and ``chunk_size`` runs with: with no chunk
    size, the one measured fastest (``choose``); with one, it, and for "auto" the cost
    model's form. ``shape``: B, T, Hq, H, d, e, deg, gated."""
    if chunk_size is None and method in ("auto", "chunked"):
        choice = choose(**shape, dtype=dtype, with_state=with_state, method=method, mode=mode,
                        measure=measure)
        return choice.method, choice.chunk_size
    chunk_size = chunk_size or DEFAULT_CHUNK
    if method == "auto":
        method = choose_method(with_state=with_state, chunk_size=chunk_size, **shape)
    return method, chunk_size


def report() -> str:
    """What is kept, one line per shape, for each device and BLAS this machine has measured
    under this MLX version (this process's first)."""
    here = device_name()
    devices = _read_cache().get("devices", {}).get(f"mlx {mx.__version__}", {})
    lines = [f"power retention tuning, MLX {mx.__version__}; this process: {here}",
             f"cache: {cache_path()}; measuring {'on' if measuring_enabled() else 'off'} "
             f"({TUNE_VARIABLE})"]
    if not devices:
        lines.append("nothing measured yet")
    for device in sorted(devices, key=lambda name: name != here):
        lines.append(f"{device}{' (this process)' if device == here else ''}:")
        for key, entry in sorted(devices[device].items()):
            measured = "measured " + entry.get("date", "")
            if "cpu_streams" in entry:  # a whole training step's split (llm.cpu_streams)
                decision = f"{entry['cpu_streams']} CPU stream(s) ({measured})"
            else:
                decision = Choice(entry["method"], entry["chunk_size"], measured).describe()
            times = ", ".join(f"{label} {s * 1e3:.1f} ms"
                              for label, s in (entry.get("seconds") or {}).items())
            lines.append(f"  {key}: {decision}" + (f"; {times}" if times else ""))
    return "\n".join(lines)


def _parse_shape(text: str) -> dict:
    values = dict(B=1, H=4, d=64, deg=2)
    for part in filter(None, text.split(",")):
        name, equals, value = part.partition("=")
        if not equals or name not in ("B", "T", "H", "Hq", "d", "e", "deg") or not value.isdigit():
            raise SystemExit(f"--tune: expected NAME=INT for B, T, H, Hq, d, e, deg; got {part!r}")
        values[name] = int(value)
    if "T" not in values:
        raise SystemExit("--tune needs T=... (the sequence length)")
    values.setdefault("Hq", values["H"])
    values.setdefault("e", values["d"])
    return values


def main(argv: list) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m power_retention.tuning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tune", action="append", default=[], metavar="B=1,T=8192,H=4,d=64",
                        help="measure this shape now (gated; Hq=H, e=d unless given)")
    parser.add_argument("--mode", choices=MODES, default="training")
    args = parser.parse_args(argv)
    for text in args.tune:
        shape = _parse_shape(text)
        choice = choose(**shape, gated=True, mode=args.mode, measure=True)
        times = ", ".join(f"{label} {s * 1e3:.1f} ms" for label, s in (choice.seconds or {}).items())
        print(f"{text} ({args.mode}): {choice.describe()}" + (f"; {times}" if times else ""))
    print(report())
    return 0


if __name__ == "__main__":
    from .cpu_tuning import tune_process

    tune_process()
    sys.exit(main(sys.argv[1:]))
