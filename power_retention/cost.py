"""The cost model that ``method="auto"`` picks a form by: estimated seconds of one forward pass."""

from __future__ import annotations

from .sympow import expanded_dim
from .validation import METHODS

# Cost model for method="auto", in seconds: dense matmul flops, elementwise passes over
# intermediate arrays, and the fixed cost of one small op (which dominates the recurrent
# form's T sequential steps and the chunked form's scan). Fitted to the MLX CPU backend with
# OpenBLAS (benchmarks/bench_retention.py); only their ratios matter.
_MATMUL_FLOPS_PER_S = 1.0e11
_ELEMENTS_PER_S = 1.0e9
_SECONDS_PER_OP = 2.0e-5
# Elementwise passes per entry of an attention weight matrix (product, power, decay, mask)
# and per expanded feature (one strided product). Fitted to the forward times of
# bench_retention.py at T = 256 .. 4096 (B=1, H=4, d=64, deg 2): the model is within a factor
# 1.6 of each measurement and switches to the chunked form near T = 2000, between the measured 2048
# (attention faster) and 4096 (chunked faster).
_PASSES_PER_WEIGHT = 5
_PASSES_PER_FEATURE = 1
def estimated_seconds(method, *, B, T, Hq, H, d, e, deg, chunk_size, gated=True):
    """Cost-model estimate of one forward pass; ``method="auto"`` takes the smallest."""
    D = expanded_dim(d, deg)

    def seconds(flops, elements, ops):
        return flops / _MATMUL_FLOPS_PER_S + elements / _ELEMENTS_PER_S + ops * _SECONDS_PER_OP

    def attention_cost(c):
        weights = B * Hq * T * c
        return 2 * weights * (d + e), _PASSES_PER_WEIGHT * weights

    if method == "attention":
        flops, elements = attention_cost(T)
        return seconds(flops, elements, 10)
    if method == "chunked":
        c = min(chunk_size, T)
        n = -(-T // c)
        flops, elements = attention_cost(c)
        flops += 2 * B * (H + Hq) * n * c * D * e
        elements += _PASSES_PER_FEATURE * B * (H + Hq) * n * c * D + 3 * B * H * n * D * e
        return seconds(flops, elements, 20 + (4 if gated else 2) * n)
    if method == "recurrent":
        per_step = B * (H + Hq) * D * e
        return seconds(2 * T * per_step, 3 * T * per_step, 15 * T)
    raise ValueError(f"method must be one of {METHODS[1:]}, got {method!r}")


def choose_method(**shape) -> str:
    """The form with the smallest estimated cost (ties go to the attention form)."""
    return min(METHODS[1:], key=lambda method: estimated_seconds(method, **shape))
