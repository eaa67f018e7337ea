"""The kernels' first run on a Mac, in one command (from a checkout, after ``make test``'s setup):

    python -m metal_kernels.check

1. Compiles every kernel instantiation through ``mx.fast.metal_kernel`` and runs it on the
   GPU against the MLX path: the decode step at degrees 1 to 4 in fp32, fp16 and bf16 (odd
   degrees unnormalized), and the two prefill kernels through a chunked call (fp32) that
   crosses chunk boundaries from a non-empty state, with grouped queries. Prints one line
   per instantiation with its relative error.
2. Runs the kernel tests (``tests/test_kernels.py``), which use Metal where it exists.
3. Runs ``benchmarks/bench_kernels.py``, which on a Mac also times the kernels.

Exits non-zero if any part fails. On a machine without Metal it says so and exits with 2:
there, ``make test`` checks the kernels in the CPU emulator.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from metal_kernels import launch

ROOT = Path(__file__).resolve().parent.parent
# fp32 results of the kernels and the MLX path differ by rounding only; fp16/bf16 outputs are
# rounded once more (one ulp of the output's top binade: 2^-10, 2^-7).
TOLERANCE = {mx.float32: 1e-4, mx.float16: 2.0**-9, mx.bfloat16: 2.0**-6}


def relative_error(actual, expected) -> float:
    actual = np.asarray(actual.astype(mx.float32), np.float64)
    expected = np.asarray(expected.astype(mx.float32), np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def instantiations():
    """(description, kernel result, MLX path result, tolerance) of every instantiation."""
    from power_retention import power_retention, power_retention_step

    rng = np.random.default_rng(0)
    normal = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    for deg in (1, 2, 3, 4):
        normalize = deg % 2 == 0
        # A state of 32 tokens: the normalized output divides by a sum of that many weights,
        # so it is well conditioned (after one token a near-zero sum would amplify rounding).
        history = (normal(2, 32, 4, 16), normal(2, 32, 2, 16), normal(2, 32, 2, 16),
                   -0.05 * mx.abs(normal(2, 32, 2)))
        _, state = power_retention(*history, deg=deg, normalize=normalize, return_state=True)
        for dtype in (mx.float32, mx.float16, mx.bfloat16):
            q, k, v = normal(2, 4, 16).astype(dtype), normal(2, 2, 16).astype(dtype), normal(2, 2, 16).astype(dtype)
            log_g = -0.05 * mx.abs(normal(2, 2))
            step = lambda use_metal: power_retention_step(  # noqa: E731
                q, k, v, log_g, state, deg=deg, normalize=normalize, use_metal=use_metal)[0]
            yield f"decode_step deg={deg} {dtype}", step(True), step(False), TOLERANCE[dtype]
        # 70 tokens in chunks of 32 (two whole, one partial) after the first sequence's state.
        prefix = type(state)(state.S[:1], state.z[:1])
        q, k, v = normal(1, 70, 4, 16), normal(1, 70, 2, 16), normal(1, 70, 2, 16)
        log_g = -0.05 * mx.abs(normal(1, 70, 2))
        prefill = lambda use_metal: power_retention(  # noqa: E731
            q, k, v, log_g, deg=deg, normalize=normalize, method="chunked", chunk_size=32,
            initial_state=prefix, use_metal=use_metal)
        yield f"chunk_states + query_states deg={deg} float32", prefill(True), prefill(False), \
            TOLERANCE[mx.float32]


def main() -> int:
    if not mx.metal.is_available():
        print("metal_kernels.check needs a Mac with Metal (mx.metal.is_available() is False "
              "here); on this machine `make test` checks the kernels in the CPU emulator.")
        return 2
    launch.set_backend("metal")
    mx.set_default_device(mx.gpu)
    failed = 0
    for description, kernel, mlx_path, tolerance in instantiations():
        error = relative_error(kernel, mlx_path)
        ok = np.isfinite(error) and error <= tolerance
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {description}: relative error {error:.2e} (bound {tolerance:.0e})")
    steps = [[sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_kernels.py")],
             [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py")]]
    for command in steps:
        print("$", " ".join(command[1:]), flush=True)
        failed += subprocess.run(command, cwd=ROOT).returncode != 0
    print("all kernel checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
