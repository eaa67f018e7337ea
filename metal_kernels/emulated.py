"""The kernels run by the CPU emulator, with the same arguments the Metal dispatch will use:
how the tests and benchmarks check them against the MLX path on a machine without Metal."""

from __future__ import annotations

import numpy as np

from power_retention.sympow import expanded_dim

from .emulator import run_kernel
from .sources import header, kernel_body

DECODE_INPUTS = ["q", "k", "v", "decay", "S", "z"]
DECODE_OUTPUTS = ["y", "S_out", "z_out"]


def decode_step_template(*, d: int, e: int, groups: int, deg: int, normalize: bool) -> list:
    return [("DEG", deg), ("DIM", d), ("E", e), ("G", groups), ("FEATURES", expanded_dim(d, deg)),
            ("NORMALIZE", normalize)]


def decode_step(q, k, v, decay, S, z, *, deg: int, normalize: bool, order: str = "forward"):
    """One fused decode step (numpy float32 in and out): q (B, Hq, d), k (B, H, d),
    v (B, H, e), decay (B, H) = exp(log_g), S (B, H, D, e), z (B, H, D) -> y, S_out, z_out."""
    B, Hq, d = q.shape
    H, e = k.shape[1], v.shape[-1]
    inputs = [np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v, decay, S, z)]
    return run_kernel(
        "decode_step", DECODE_INPUTS, DECODE_OUTPUTS, kernel_body("decode_step"), inputs,
        [(B, Hq, e), S.shape, z.shape], [np.float32] * 3, grid=(B * H * e, 1, 1),
        threadgroup=(e, 1, 1), header=header("sympow"), order=order,
        template=decode_step_template(d=d, e=e, groups=Hq // H, deg=deg, normalize=normalize))
