"""Model FLOPs utilisation (MFU): the useful matmul FLOPs of a training step per second, over
the matmul peak of the device measured in the same process.

Useful FLOPs per token, as PaLM's appendix counts them: 6 per weight that multiplies an
activation (forward 2, backward 4; the input embedding is a lookup, not a product), plus the
mixer's token-to-token products, 3x their forward count. Only the causal half of any weight
matrix counts (what the implementation computes above the diagonal and masks is waste, not
model FLOPs): for softmax and the attention form, T/2 keys per query on average; for the
chunked form, c/2 within the chunk and the state's update and read.
"""

from __future__ import annotations

import time

import mlx.core as mx

from power_retention import expanded_dim, tuning

from .config import ModelConfig, param_count, retention_shape


def mixer_forward_flops_per_token(config: ModelConfig, seq_len: int, method: str = "auto",
                                  chunk_size: int | None = None) -> float:
    """Forward matmul FLOPs of one layer's token-to-token products, per token."""
    Hq, H, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    e, T = d, seq_len
    if config.mixer == "softmax":
        return 2 * Hq * (T / 2) * (d + e)
    method, chunk = tuning.resolve(method, chunk_size or config.chunk_size, mode="training",
                                   measure=False, **retention_shape(config, 1, T))
    if method == "attention":
        return 2 * Hq * (T / 2) * (d + e + 1)
    D = expanded_dim(d, config.deg)
    state = 2 * (H + Hq) * D * (e + 1)  # each key into the state, each query reading it
    if method == "recurrent":
        return state
    return 2 * Hq * (min(chunk, T) / 2) * (d + e + 1) + state


def training_flops_per_token(config: ModelConfig, seq_len: int, method: str = "auto",
                             chunk_size: int | None = None, frozen: bool = False) -> float:
    """Useful FLOPs of a training step (forward and backward) per token. ``frozen``: the
    weights are not trained (adapters are): 4 per weight, the gradients of the weights
    themselves not being computed (the adapters' own few FLOPs are left out)."""
    lookup = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    weights = param_count(config) - lookup
    mixer = mixer_forward_flops_per_token(config, seq_len, method, chunk_size)
    return (4 if frozen else 6) * weights + 3 * config.num_hidden_layers * mixer


def matmul_peak(dtype=mx.float32, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` n x n x n products on the default device (after a
    warm-up): what 100% means for MFU here."""
    a, b = mx.random.normal((n, n)).astype(dtype), mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best
