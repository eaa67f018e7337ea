"""``ShortConvolution``: a causal depthwise convolution over a few tokens, with its cache.

Every channel mixes its own last ``kernel_size`` inputs (the current token included) and goes
through SiLU, as flash-linear-attention's ShortConvolution does for q, k and v. Why a mixer
needs it: a key and the value that follows it sit at different positions, and the op pairs
k_j with v_j of the same position; the convolution lets k_j and v_j see the tokens just before
j, so one layer can bind "the token before" to "this token" (what associative recall asks)
without first spending a layer on it. Zoology's Based, GLA, DeltaNet and Mamba all carry one.

    conv = ShortConvolution(channels=96, kernel_size=4)
    y, tail = conv(x)                  # x (B, T, channels) -> y like x, tail (B, 3, channels)
    y2, tail = conv(x2, tail)          # continues the sequence exactly
"""

from __future__ import annotations

import itertools
import math

import mlx.core as mx
import mlx.nn as nn


class ShortConvolution(nn.Module):
    """y_t = silu(sum_i weight[:, i] * x_(t - kernel_size + 1 + i)), inputs before the sequence
    taken from ``tail`` (the last kernel_size - 1 inputs of what came before) or zero."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        # PyTorch's Conv1d initialisation for a depthwise filter (fan-in = kernel_size).
        bound = 1 / math.sqrt(kernel_size)
        self.weight = mx.random.uniform(-bound, bound, (channels, kernel_size))

    @staticmethod
    def state_floats(channels: int, kernel_size: int) -> int:
        """Floats of the tail a cache keeps per sequence: the last kernel_size - 1 inputs."""
        return max(kernel_size - 1, 0) * channels

    def __call__(self, x: mx.array, tail: mx.array | None = None,
                 reset: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """(y, new tail): y (B, T, channels), the tail (B, kernel_size - 1, channels).

        ``reset`` (B, T) bool marks the tokens that start a new document: no output sees an
        input from before its document's start (those inputs count as zero, as before the
        sequence), and the tail keeps only the last document's inputs.
        """
        B, T, channels = x.shape
        history = self.kernel_size - 1
        if tail is None:
            tail = mx.zeros((B, history, channels), dtype=x.dtype)
        padded = mx.concatenate([tail.astype(x.dtype), x], axis=1)
        taps, tail = [padded[:, i:i + T] for i in range(self.kernel_size)], padded[:, T:]
        if reset is not None:
            # Document number of every padded position (the tail is in the first one); a
            # select, not a multiply, so that a non-finite input elsewhere stays there. The
            # last tap is the token itself, always in its own document.
            document = mx.cumsum(reset.astype(mx.int32), axis=1)
            document = mx.concatenate([mx.zeros((B, history), dtype=mx.int32), document], axis=1)
            for i in range(history):
                taps[i] = mx.where((document[:, i:i + T] == document[:, history:])[..., None],
                                   taps[i], 0)
            tail = mx.where((document[:, T:] == document[:, -1:])[..., None], tail, 0)
        # kernel_size shifted multiply-adds: for kernels of a few taps this is cheaper than
        # a general convolution and has the same gradient.
        y = taps[0] * self.weight[:, 0]
        for i in range(1, self.kernel_size):
            y = y + taps[i] * self.weight[:, i]
        return nn.silu(y), tail

    def split(self, *parts: mx.array, tail: mx.array | None = None,
              reset: mx.array | None = None) -> tuple[list, mx.array]:
        """The convolution over the channels of ``parts`` side by side (q, k and v), split
        back, and the new tail (what a cache keeps to continue the sequence)."""
        y, tail = self(mx.concatenate(parts, axis=-1), tail, reset)
        bounds = list(itertools.accumulate(part.shape[-1] for part in parts[:-1]))
        return mx.split(y, bounds, axis=-1), tail
