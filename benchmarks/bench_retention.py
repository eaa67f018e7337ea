"""Time and memory of every power retention form against causal softmax attention (MLX's
SDPA, and PyTorch's where it is installed).

    python benchmarks/bench_retention.py                 # T = 256 .. 32768, about 20 minutes here
    python benchmarks/bench_retention.py --max-T 4096    # a quick look

Prints a table (forward and forward+backward: median seconds after a warm-up, and peak
memory) and writes it as JSON with the machine, the BLAS in use, the measured fp32 matmul
peak and the date. A cell predicted to take over --time-limit seconds or --memory-limit GB
is skipped, and the table says so.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys
import time

import click
import mlx.core as mx
from common import machine_description, machine_line, median_seconds, now, seconds, write_report

from power_retention import expanded_dim, native, power_retention, tuning
from power_retention.cpu_tuning import (blas_threads, loaded_blas, openblas_library,
                                        parallel_cpu_streams, release_freed_memory, set_blas_threads,
                                        split_across_cpu_streams, stream_parts, tune_process)

METHODS = ("attention", "chunked", "recurrent", "auto", "softmax", "torch")


def torch_installed() -> bool:
    """Whether PyTorch is installed (the `torch` rows are left out otherwise). Not imported
    here: its rows run in a process of their own (``TorchSDPA``)."""
    return importlib.util.find_spec("torch") is not None


class TorchSDPA:
    """PyTorch's causal SDPA (the MPS GPU on a Mac, else the CPU) in a child process with the
    environment a PyTorch user has: this process's OpenBLAS preload left out (torch_sdpa.py
    says why). Started once, at the first torch row."""

    def __init__(self):
        env = dict(os.environ)
        library = openblas_library()
        preload = [path for path in env.pop("LD_PRELOAD", "").split(":") if path and path != library]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_sdpa.py")
        self.process = subprocess.Popen([sys.executable, script], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.shape = None
        self.device = None

    def ask(self, line: str) -> str:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"the PyTorch process (torch_sdpa.py) stopped at {line!r}")
        return answer

    def case(self, B, T, H, d):
        """Forward, and forward+backward, on (B, H, T, d), each returning nothing for mx.eval
        once PyTorch has finished (the first call makes the inputs, outside any timing: every
        measurement here runs a warm-up first)."""
        def command(name):
            def run():
                if self.shape != (B, T, H, d):
                    self.device = self.ask(f"case {B} {T} {H} {d}")
                    self.shape = (B, T, H, d)
                self.ask(name)
                return []
            return run

        return command("forward"), command("forward_backward")


@functools.lru_cache(maxsize=1)
def torch_sdpa() -> TorchSDPA:
    return TorchSDPA()


def _best_gflops(products, flops, repeats) -> float:
    mx.eval(products())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(products())
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Peak fp32 matmul rate, the best of ``repeats`` runs (a peak, so not the median) of the
    better way to use this machine's cores: one product with a threaded BLAS, or (with OpenBLAS)
    one product per core on as many streams with a single-threaded BLAS."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    with blas_configuration("blas"):
        peak = _best_gflops(lambda: a @ b, 2 * n**3, repeats)
    with blas_configuration("streams"):
        streams = parallel_cpu_streams()
        if len(streams) > 1:
            def one_per_stream():
                products = []
                for stream in streams:
                    with mx.stream(stream):
                        products.append(a @ b)
                return products
            peak = max(peak, _best_gflops(one_per_stream, len(streams) * 2 * n**3, repeats))
    return peak


@contextlib.contextmanager
def blas_configuration(mode):
    """How the run uses the cores: "blas" = a threaded BLAS on one stream; "streams" = a
    single-threaded BLAS, heads split across one stream per core (see power_retention.cpu_tuning).
    Needs OpenBLAS loaded to switch; otherwise the run takes the machine as it is."""
    if mode == "default" or not loaded_blas().startswith("OpenBLAS"):
        yield
        return
    before = blas_threads()
    set_blas_threads(1 if mode == "streams" else os.cpu_count() or 1)
    try:
        yield
    finally:
        set_blas_threads(before)


def in_configuration(mode, fn):
    """``fn`` with its graph built and evaluated in BLAS configuration ``mode``."""
    def run():
        with blas_configuration(mode):
            out = fn()
            mx.eval(out)
        return out
    return run


def matmul_flops(method, B, T, H, d, deg, chunk_size) -> dict:
    """Matmul flops of one pass of a form (not "auto"), for GFLOP/s and the fraction of peak.
    Power retention: the products its form computes (chunked: intra-chunk scores and values,
    state update and read; attention: the T x T weights, half of them causal), the backward
    doing two for each forward one. Softmax: the causal half of QK^T and PV, the backward 2.5x
    the forward (FlashAttention's count)."""
    D, e = expanded_dim(d, deg), d
    if method in ("softmax", "torch"):
        forward = 2 * B * H * T * T * (d + e) / 2
        return {"forward": forward, "forward_backward": 3.5 * forward}
    if method == "recurrent":
        forward = 2 * 2 * B * H * T * D * (e + 1)
    elif method == "attention":
        forward = 2 * B * H * T * T * (d + e + 1) / 2
    else:
        c = min(chunk_size, T)
        forward = 2 * B * H * T * c * (d + e + 1) + 2 * 2 * B * H * T * D * (e + 1)
    return {"forward": forward, "forward_backward": 3 * forward}


def make_case(method, B, T, H, d, deg, chunk_size):
    q, k, v = (mx.random.normal((B, T, H, d)) for _ in range(3))
    log_g = -0.05 * mx.random.uniform(shape=(B, T, H))
    mx.eval(q, k, v, log_g)
    if method == "torch":
        return torch_sdpa().case(B, T, H, d)
    if method == "softmax":
        def attend(q, k, v):
            out = mx.fast.scaled_dot_product_attention(
                q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                scale=d**-0.5, mask="causal")
            return out.transpose(0, 2, 1, 3)

        def forward(q, k, v, log_g):
            # Split across the same streams as the op's heads, so both get the machine alike.
            streams = parallel_cpu_streams()
            if len(streams) < 2:
                return attend(q, k, v)
            outs = []
            for stream, start, stop in stream_parts(H, streams):
                with mx.stream(stream):
                    outs.append(attend(*(x[:, :, start:stop] for x in (q, k, v))))
            return mx.concatenate(outs, axis=2)
    else:
        split_power_retention = split_across_cpu_streams(power_retention)

        def forward(q, k, v, log_g):
            return split_power_retention(q, k, v, log_g, deg=deg, method=method,
                                         chunk_size=chunk_size)
    gradient = mx.grad(lambda *args: forward(*args).sum(), argnums=(0, 1, 2, 3))
    inputs = (q, k, v, log_g)
    return (lambda: forward(*inputs)), (lambda: gradient(*inputs))


def predicted_bytes(method, B, T, H, d, deg, chunk_size) -> float:
    """Rough peak memory of the forward+backward pass of a form (not "auto"), to skip what
    cannot fit."""
    D = expanded_dim(d, deg)
    if method == "recurrent":  # autodiff keeps every step's D x e state (measured: 8.9 GB at T=1024)
        return 4 * 4 * B * H * T * D * d
    # Floats per T x T weight per head at the fwd+bwd peak, measured by this script on the MLX
    # CPU backend (3.4 for softmax at T=8192, 7.3 for the attention form at T=8192).
    if method in ("softmax", "torch"):  # PyTorch's flash kernel needs far less; kept on the safe side
        return 3.5 * 4 * B * H * T * T
    if method == "attention":
        return 8 * 4 * B * H * T * T
    return 8 * 4 * B * H * T * D


def measure(method, B, T, H, d, deg, chunk_size, repeats):
    cell = {}
    for name, fn in zip(("forward", "forward_backward"), make_case(method, B, T, H, d, deg, chunk_size)):
        release_freed_memory()
        mx.reset_peak_memory()
        cell[f"{name}_s"] = median_seconds(fn, repeats)
        cell[f"{name}_peak_gb"] = mx.get_peak_memory() / 1e9
    return cell


def _median_of_rounds(one_round, repeats, min_seconds=2.0, max_rounds=50) -> float:
    """Median of ``one_round()`` over at least ``repeats`` (and 5) rounds, more while they take
    under ``min_seconds`` in all: a ratio of two 30 ms runs needs dozens of rounds to be
    steady here."""
    values = []
    started = time.perf_counter()
    while len(values) < max(repeats, 5) or (time.perf_counter() - started < min_seconds
                                             and len(values) < max_rounds):
        values.append(one_round())
    return sorted(values)[len(values) // 2]


def interleaved_ratio(first, second, repeats, paired=True) -> float:
    """Median over rounds of time(first) / time(second), the two timed alternately in one loop
    so that this machine's drift cancels (separate cells differ by tens of percent here).
    ``paired``: each timed run follows an untimed run of the same case, so that neither
    inherits what the other left running: PyTorch's OpenMP threads keep spinning for a while
    after each call (libgomp's default wait policy), and the op's forward right after one of
    PyTorch's took 7-13% longer than after its own, PyTorch's no longer after the op's
    (bench_order.py). Without it, strict alternation."""
    mx.eval(first(), second())

    def one_round():
        if paired:
            mx.eval(first())
        first_seconds = seconds(first)
        if paired:
            mx.eval(second())
        return first_seconds / seconds(second)

    return _median_of_rounds(one_round, repeats)


def interleaved_ratios(row, over, first, second, repeats, paired=True) -> None:
    """``row["forward_over_<over>"]`` and ``row["forward_backward_over_<over>"]``: the
    interleaved ratios of two cases (each the (forward, forward+backward) pair of
    ``make_case``)."""
    for name, mine, theirs in zip(("forward", "forward_backward"), first, second):
        row[f"{name}_over_{over}"] = interleaved_ratio(mine, theirs, repeats, paired)


def with_mlx_ops(fn):
    """``fn`` with the op built from MLX ops instead of the compiled products (``native``)."""
    def run():
        os.environ[native.SWITCH] = "0"
        try:
            return fn()  # the op chooses while it builds the graph; evaluating it needs no switch
        finally:
            os.environ[native.SWITCH] = "1"

    return run


def interleaved_fraction_of_peak(run, flops, repeats) -> float:
    """Median over rounds of the GFLOP/s of one ``run`` (``flops`` of work) over the fp32
    matmul peak measured just before it (best of 3): the peak and the run see the same state
    of this machine, whose speed drifts by tens of percent over minutes."""
    def one_round():
        peak = matmul_gflops(repeats=3)
        return flops / seconds(run) / 1e9 / peak

    mx.eval(run())
    return _median_of_rounds(one_round, repeats)


@click.command()
@click.option("--min-T", "min_T", default=256, show_default=True)
@click.option("--max-T", "max_T", default=32768, show_default=True)
@click.option("--batch", "B", default=1, show_default=True)
@click.option("--heads", "H", default=4, show_default=True)
@click.option("--head-dim", "d", default=64, show_default=True)
@click.option("--deg", default=2, show_default=True)
@click.option("--chunk-size", default=None, type=int,
              help="chunk of the chunked and auto rows (default: the op's, measured per device)")
@click.option("--repeats", default=3, show_default=True, help="timed runs per cell (median)")
@click.option("--time-limit", default=60.0, show_default=True, help="skip cells whose fwd+bwd run is predicted slower (s)")
@click.option("--memory-limit", default=16.0, show_default=True, help="skip cells predicted larger (GB)")
@click.option("--methods", default=",".join(METHODS), show_default=True,
              help="torch: PyTorch's SDPA, when PyTorch is installed (MPS on a Mac)")
@click.option("--cpu-parallel", type=click.Choice(["default", "streams", "blas"]), default="default",
              show_default=True,
              help="how every method uses the CPU cores: as a user's process does (default), heads "
                   "split across one stream per core with a single-threaded BLAS and "
                   "MLX_BFS_MAX_WIDTH=16384 (streams), or one stream with a threaded BLAS")
@click.option("--interleave", type=click.Choice(["paired", "alternate"]), default="paired", show_default=True,
              help="how interleaved ratios time two cases: each timed run after an untimed one of the "
                   "same case (paired), or strictly alternating")
@click.option("--out", default=None, help="JSON path (default benchmarks/results/retention-DATE.json)")
def main(min_T, max_T, B, H, d, deg, chunk_size, repeats, time_limit, memory_limit, methods, cpu_parallel,
         interleave, out):
    tune_process()
    if cpu_parallel == "streams":
        # Read by MLX at its first evaluation (none has run yet). The streams overlap only when
        # the breadth-first order spans both parts of a graph, whose width grows with the
        # number of chunks: at T=8192, chunk 64, fwd+bwd took 1.79 s with 256, 1.45 s with 4096.
        os.environ.setdefault("MLX_BFS_MAX_WIDTH", "16384")
    methods = [m.strip() for m in methods.split(",")]
    if "torch" in methods and not torch_installed():
        print("# PyTorch is not installed: no torch rows (pip install torch to add them)")
        methods.remove("torch")
    with blas_configuration(cpu_parallel):
        run_benchmark(min_T, max_T, B, H, d, deg, chunk_size, repeats, time_limit, memory_limit,
                      methods, cpu_parallel, interleave == "paired", out)


def run_benchmark(min_T, max_T, B, H, d, deg, chunk_size, repeats, time_limit, memory_limit, methods,
                  cpu_parallel, paired, out):
    machine = machine_description()
    peak = matmul_gflops()
    started = now()
    streams = len(parallel_cpu_streams()) if cpu_parallel == "streams" else 0
    width = os.environ.get("MLX_BFS_MAX_WIDTH", "MLX's default")
    print(f"# power retention benchmark, {started:%Y-%m-%d %H:%M %Z}")
    print(f"# machine: {machine_line(machine)}")
    print(f"# cores used: {f'{streams} streams, single-threaded BLAS' if streams else f'{blas_threads()} BLAS threads, one stream'}"
          f" (--cpu-parallel {cpu_parallel}; MLX_BFS_MAX_WIDTH={width})")
    print(f"# fp32 matmul peak (2048^3, the better of one threaded product and one per core): {peak:.1f} GFLOP/s")
    print(f"# B={B} H={H} d={d} deg={deg} D={expanded_dim(d, deg)} chunk_size={chunk_size or 'the op default'}; "
          f"median of {repeats} after a warm-up; interleaved ratios {'paired' if paired else 'alternating'}; "
          f"peak memory in GB (MLX's; none for torch); GFLOP/s of "
          f"the matmul flops (matmul_flops) and % of the peak")

    Ts = []
    T = min_T
    while T <= max_T:
        Ts.append(T)
        T *= 2
    results = []
    last_time = {}
    header = (f"{'T':>6} {'method':>10} {'fwd s':>9} {'fwd+bwd s':>10} {'fwd GB':>7} {'f+b GB':>7} "
              f"{'fwd GF/s':>9} {'f+b GF/s':>9} {'f+b %pk':>8}  note")
    print(header)
    print("-" * len(header))
    for T in Ts:
        for method in methods:
            row = {"T": T, "method": method}
            # The form and chunk size the row runs with (the op's own choice when none is given).
            form, chunk = tuning.resolve(method, chunk_size, B=B, T=T, Hq=H, H=H, d=d, e=d, deg=deg,
                                         gated=True)
            if method in ("auto", "chunked"):
                row.update(form=form, chunk_size=chunk)
            growth = 4 if method in ("attention", "softmax", "torch") else 2
            predicted_time = last_time.get(method, 0) * growth
            if predicted_bytes(form, B, T, H, d, deg, chunk) > memory_limit * 1e9:
                row["skipped"] = f"needs > {memory_limit:g} GB"
            elif predicted_time > time_limit:
                row["skipped"] = f"predicted > {time_limit:g} s"
            else:
                row.update(measure(method, B, T, H, d, deg, chunk_size, repeats))
                if method == "torch":
                    row["forward_peak_gb"] = row["forward_backward_peak_gb"] = None
                    row["torch"] = torch_sdpa().device
                flops = matmul_flops(form, B, T, H, d, deg, chunk)
                for name in ("forward", "forward_backward"):
                    row[f"{name}_gflops"] = flops[name] / row[f"{name}_s"] / 1e9
                    row[f"{name}_fraction_of_peak"] = row[f"{name}_gflops"] / peak
                if method == "auto":
                    row["auto_over_choice"] = interleaved_ratio(
                        make_case("auto", B, T, H, d, deg, chunk_size)[0],
                        make_case(form, B, T, H, d, deg, chunk)[0], repeats, paired)
                if method in ("auto", "chunked") and T >= 4096 and "torch" in methods:
                    # The auto row is what a user gets by default: the op's own choice.
                    mine = make_case(method, B, T, H, d, deg, chunk if method == "chunked" else chunk_size)
                    interleaved_ratios(row, "torch", mine, torch_sdpa().case(B, T, H, d), repeats, paired)
                if method == "chunked" and T >= 4096:
                    # Linearity: forward at T over forward at T / 2, interleaved.
                    row["forward_over_half_T"] = interleaved_ratio(
                        make_case(method, B, T, H, d, deg, chunk)[0],
                        make_case(method, B, T // 2, H, d, deg, chunk)[0], repeats, paired)
                    forward_backward = make_case(method, B, T, H, d, deg, chunk)[1]
                    row["forward_backward_fraction_of_peak_interleaved"] = interleaved_fraction_of_peak(
                        forward_backward, flops["forward_backward"], repeats)
                    if native.available():
                        case = make_case(method, B, T, H, d, deg, chunk)
                        interleaved_ratios(row, "mlx_ops", case, [with_mlx_ops(fn) for fn in case], repeats,
                                           paired)
                    if streams:
                        row["forward_backward_streams_over_threaded_blas"] = interleaved_ratio(
                            in_configuration("streams", forward_backward),
                            in_configuration("blas", forward_backward), repeats, paired)
                last_time[method] = row["forward_backward_s"]
            results.append(row)
            print_row(row)

    out = write_report("bench_retention", started,
                       {"matmul_fp32_gflops": peak, "matmul_fp32_gflops_at_end": matmul_gflops(),
                        "config": {"B": B, "H": H, "d": d, "deg": deg, "chunk_size": chunk_size,
                                   "repeats": repeats, "interleave": "paired" if paired else "alternate",
                                   "cpu_parallel": cpu_parallel, "streams": streams,
                                   "blas_threads": blas_threads(), "mlx_bfs_max_width": width},
                        "results": results}, out)
    print(f"# wrote {out}")


def print_row(row):
    T, method = row["T"], row["method"]
    if "skipped" in row:
        print(f"{T:>6} {method:>10} {'-':>9} {'-':>10} {'-':>7} {'-':>7} {'-':>9} {'-':>9} {'-':>8}  "
              f"skipped: {row['skipped']}")
        return
    notes = []
    if "torch" in row:
        notes.append(f"{row['torch']} in a process of its own")
    if method in ("auto", "chunked"):
        notes.append(row["form"] + (f" {row['chunk_size']}" if row["form"] == "chunked" else ""))
    if "auto_over_choice" in row:
        notes.append(f"x{row['auto_over_choice']:.2f} of it, interleaved")
    if "forward_backward_fraction_of_peak_interleaved" in row:
        notes.append(f"{100 * row['forward_backward_fraction_of_peak_interleaved']:.0f}% of a peak timed alongside")
    if "forward_over_torch" in row:
        notes.append(f"x{row['forward_over_torch']:.2f} / x{row['forward_backward_over_torch']:.2f} "
                     "of torch's time fwd / fwd+bwd, interleaved")
    if "forward_over_mlx_ops" in row:
        notes.append(f"x{row['forward_over_mlx_ops']:.2f} / x{row['forward_backward_over_mlx_ops']:.2f} "
                     "of the MLX ops' time (no compiled products) fwd / fwd+bwd, interleaved")
    if "forward_backward_streams_over_threaded_blas" in row:
        notes.append(f"fwd+bwd x{row['forward_backward_streams_over_threaded_blas']:.2f} of one stream "
                     "with threaded BLAS, interleaved")
    if "forward_over_half_T" in row:
        notes.append(f"fwd x{row['forward_over_half_T']:.2f} of T/2, interleaved")
    memory = "".join(f" {row[name]:>7.2f}" if row[name] is not None else f" {'-':>7}"
                     for name in ("forward_peak_gb", "forward_backward_peak_gb"))
    print(f"{T:>6} {method:>10} {row['forward_s']:>9.4f} {row['forward_backward_s']:>10.4f}{memory} "
          f"{row['forward_gflops']:>9.1f} {row['forward_backward_gflops']:>9.1f} "
          f"{100 * row['forward_backward_fraction_of_peak']:>7.0f}%  {'; '.join(notes)}", flush=True)


if __name__ == "__main__":
    main()
