"""The recurrent state that carries a sequence from one call to the next."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx


class RetentionState(NamedTuple):
    """Decayed sums over every key seen so far, per key/value head.

    S: (B, H, D, e) = sum_j decay_j * phi(k_j) v_j^T
    z: (B, H, D)    = sum_j decay_j * phi(k_j)      (the normalizer's state)

    Both are float32 (float64 when the inputs are float64), whatever the input dtype, so a
    long sequence does not accumulate half-precision rounding.
    """

    S: mx.array
    z: mx.array
