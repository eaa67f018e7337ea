"""What every benchmark shares: the machine's description, timing, and writing results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm.atomic import write_atomic  # noqa: E402
from power_retention.cpu_tuning import loaded_blas  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = mx.default_device()
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "mlx": mx.__version__, "device": str(device), "blas": loaded_blas()}


def machine_line(machine: dict) -> str:
    """The machine in one line, for the head of a benchmark's table."""
    return (f"{machine['cpu']}, {machine['cores']} cores; MLX {machine['mlx']} on "
            f"{machine['device']}; BLAS: {machine['blas']}")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def seconds(fn) -> float:
    """Wall time of one ``mx.eval(fn())``."""
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``mx.eval(fn())`` over ``repeats`` runs after one warm-up run."""
    mx.eval(fn())  # warm-up (and graph construction caches)
    return statistics.median(seconds(fn) for _ in range(repeats))


def write_report(name: str, started: datetime.datetime, report: dict, out: str | None) -> str:
    """Write ``report`` (with the benchmark's name, date and machine) as JSON, atomically."""
    report = {"benchmark": name, "date": started.isoformat(timespec="seconds"),
              "machine": machine_description(), **report}
    out = out or os.path.join(RESULTS, f"{name.removeprefix('bench_')}-{started:%Y%m%d-%H%M}.json")
    write_atomic(out, json.dumps(report, indent=1))
    return out
