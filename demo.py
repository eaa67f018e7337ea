"""A short tour of the op: three forms that agree, linear cost, constant-memory decoding.

    make run        (or: python demo.py)
"""

import time

import mlx.core as mx

from power_retention import RetentionState, expanded_dim, power_retention, power_retention_step
from power_retention.cpu_tuning import loaded_blas, tune_process


def timed(fn):
    mx.eval(fn())  # warm-up
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def main():
    tune_process()
    mx.random.seed(0)
    B, H, d, deg = 1, 4, 64, 2
    print(f"BLAS: {loaded_blas()}")
    print(f"one head of d={d} at deg={deg}: D={expanded_dim(d, deg)} features, "
          f"state {expanded_dim(d, deg) * (d + 1)} floats\n")

    T = 300
    q, k, v = (mx.random.normal((B, T, H, d)) for _ in range(3))
    log_g = -0.05 * mx.random.uniform(shape=(B, T, H))
    reference = power_retention(q, k, v, log_g, deg=deg, method="attention")
    for method in ("chunked", "recurrent"):
        y = power_retention(q, k, v, log_g, deg=deg, method=method)
        error = (mx.abs(y - reference).max() / mx.abs(reference).max()).item()
        print(f"{method:>9} vs attention form, T={T}: max relative difference {error:.1e}")

    print("\n    T   attention (s)   chunked (s)")
    for T in (512, 2048, 8192):
        q, k, v = (mx.random.normal((B, T, H, d)) for _ in range(3))
        log_g = -0.05 * mx.random.uniform(shape=(B, T, H))
        chunked = timed(lambda: power_retention(q, k, v, log_g, method="chunked"))
        attention = (timed(lambda: power_retention(q, k, v, log_g, method="attention"))
                     if T <= 4096 else float("nan"))
        print(f"{T:>5}   {attention:13.3f}   {chunked:11.3f}")

    state = None
    for t in range(4):
        y, state = power_retention_step(q[:, t], k[:, t], v[:, t], log_g[:, t], state)
    assert isinstance(state, RetentionState)
    print(f"\ndecoding: state S {tuple(state.S.shape)} and z {tuple(state.z.shape)}, "
          f"the same size at every step")


if __name__ == "__main__":
    main()
