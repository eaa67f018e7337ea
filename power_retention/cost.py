"""The cost model that ``method="auto"`` picks a form by: estimated seconds of one forward pass,
among the forms whose largest arrays fit in memory."""

from __future__ import annotations

import os

import mlx.core as mx

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


def estimated_bytes(method, *, B, T, Hq, H, d, e, deg, chunk_size, gated=True,
                    with_state=True) -> int:
    """Bytes of the largest float32 arrays the form holds at once (a lower bound on its peak):
    the weights, and where the form uses the symmetric power features, those of every key and
    query and the states. ``with_state``: the call passes or returns a state (the attention
    form needs features only then)."""
    D = expanded_dim(d, deg)
    c = T if method == "attention" else min(chunk_size, T)
    n = -(-T // c)
    weights = B * Hq * n * c * c if method != "recurrent" else 0
    if method == "recurrent":
        features = B * (Hq + H) * D
        states = B * H * D * (e + 1)
    elif method == "attention" and not with_state:
        features = states = 0
    else:
        features = B * (Hq + H) * n * c * D
        states = B * H * (n + 1) * D * (e + 1)
    return 4 * (weights + features + states)


def memory_limit() -> int:
    """Bytes a computation can use here: the GPU's working set on Metal, else physical RAM."""
    if mx.default_device() == mx.gpu and mx.metal.is_available():
        info = mx.device_info()
        return int(info.get("max_recommended_working_set_size") or info["memory_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_method(*, with_state=True, **shape) -> str:
    """The form with the smallest estimated cost among those that fit in memory (ties go to the
    attention form); the smallest in memory when none fits (``check_fits`` then says so)."""
    limit = memory_limit()
    fitting = [m for m in METHODS[1:] if estimated_bytes(m, with_state=with_state, **shape) <= limit]
    if not fitting:
        return min(METHODS[1:], key=lambda m: estimated_bytes(m, with_state=with_state, **shape))
    return min(fitting, key=lambda method: estimated_seconds(method, **shape))


def check_fits(method, *, with_state, **shape) -> None:
    """ValueError naming the degree, the features and the bytes when ``method`` cannot fit in
    memory, and what would."""
    needed = estimated_bytes(method, with_state=with_state, **shape)
    limit = memory_limit()
    if needed <= limit:
        return
    D = expanded_dim(shape["d"], shape["deg"])
    state = 4 * D * (shape["e"] + 1)
    others = [m for m in METHODS[1:] if m != method
              and estimated_bytes(m, with_state=with_state, **shape) <= limit]
    if others:
        advice = f"method={others[0]!r} fits"
    elif with_state and estimated_bytes("attention", with_state=False, **shape) <= limit:
        advice = "the attention form fits without a state (no initial_state, return_state=False)"
    else:
        advice = "use a lower deg, narrower heads or a shorter sequence"
    raise ValueError(f"deg={shape['deg']} with heads of d={shape['d']} has D={D:,} features "
                     f"(a state of {state:,} bytes per sequence and key/value head): the "
                     f"{method} form needs about {needed / 2**30:,.1f} GiB, more than the "
                     f"{limit / 2**30:,.1f} GiB here; {advice}")
