"""Chunked form: attention inside chunks of c positions, a recurrent state across chunks.

The attention form is this with one chunk spanning the sequence (c = T): the T x T weight
matrix and no scan. Inputs here are already validated, in the compute dtype (float32 or
float64), with the scale applied to q (see ``ops.power_retention``).

Shapes inside: q (B, H, G, n, c, d) where query head h * G + g reads key/value head h;
k (B, H, 1, n, c, d); v (B, H, 1, n, c, e); cumulative in-chunk log decay l (B, H, 1, n, c).
"""

from __future__ import annotations

import mlx.core as mx

from .state import RetentionState
from .sympow import integer_power, sympow


def _causal_mask(c: int) -> mx.array:
    return mx.tril(mx.ones((c, c), dtype=mx.bool_))


def _intra_chunk(q, k, v, l, deg, normalize):
    """Attention-form numerator (.., c, e) and denominator (.., c) within each chunk."""
    causal = _causal_mask(q.shape[-2])
    weights = integer_power(q @ k.swapaxes(-1, -2), deg)
    if l is None:
        weights = mx.where(causal, weights, 0.0)
    else:
        # Mask before exp: above the diagonal l_i - l_j > 0 could overflow, and inf * 0 is NaN
        # in the backward pass.
        log_decay = mx.where(causal, l[..., :, None] - l[..., None, :], -mx.inf)
        weights = weights * mx.exp(log_decay)
    numerator = weights @ v
    denominator = weights.sum(axis=-1) if normalize else None
    return numerator, denominator


def _scan_states(chunk_S, chunk_z, chunk_log_decay, initial_state, need_entering):
    """Carry the state across chunks.

    chunk_S (B, H, n, D, e) and chunk_z (B, H, n, D) are each chunk's own contribution, decayed
    to the chunk's end; chunk_log_decay (B, H, n) is each chunk's total log decay or None.
    Returns the states entering every chunk, stacked on axis 2 (or None), and the final state.
    """
    B, H, n, D, e = chunk_S.shape
    if initial_state is None:
        S = mx.zeros((B, H, D, e), dtype=chunk_S.dtype)
        z = mx.zeros((B, H, D), dtype=chunk_S.dtype)
    else:
        S, z = initial_state
    entering_S, entering_z = [], []
    for i in range(n):
        if need_entering:
            entering_S.append(S)
            entering_z.append(z)
        if chunk_log_decay is None:
            S = S + chunk_S[:, :, i]
            z = z + chunk_z[:, :, i]
        else:
            decay = mx.exp(chunk_log_decay[:, :, i])
            S = decay[..., None, None] * S + chunk_S[:, :, i]
            z = decay[..., None] * z + chunk_z[:, :, i]
    entering = None
    if need_entering:
        entering = (mx.stack(entering_S, axis=2), mx.stack(entering_z, axis=2))
    return entering, RetentionState(S, z)


def chunk_power_retention(q, k, v, log_g, *, deg, chunk_size, initial_state, return_state,
                          normalize):
    """y (B, T, Hq, e) and the final RetentionState (None unless return_state)."""
    B, T, Hq, d = q.shape
    H, e = k.shape[2], v.shape[-1]
    G = Hq // H
    c = min(chunk_size, T)
    n = -(-T // c)
    pad = n * c - T
    if pad:
        # Zero keys have zero features and a zero log gate keeps the decay: padding adds nothing.
        widths = [(0, 0), (0, pad), (0, 0), (0, 0)]
        q, k, v = mx.pad(q, widths), mx.pad(k, widths), mx.pad(v, widths)
        if log_g is not None:
            log_g = mx.pad(log_g, widths[:3])

    q = q.reshape(B, n, c, H, G, d).transpose(0, 3, 4, 1, 2, 5)
    k = k.reshape(B, n, c, H, d).transpose(0, 3, 1, 2, 4)[:, :, None]
    v = v.reshape(B, n, c, H, e).transpose(0, 3, 1, 2, 4)[:, :, None]
    l = None
    if log_g is not None:
        l = mx.cumsum(log_g.reshape(B, n, c, H).transpose(0, 3, 1, 2), axis=-1)[:, :, None]

    numerator, denominator = _intra_chunk(q, k, v, l, deg, normalize)

    # Keys reach later chunks only through the state; queries read the state entering their
    # chunk. The decays are split as exp(x / deg) on the inputs because phi is homogeneous
    # of degree deg; every such factor is <= 1 for log_g <= 0, so nothing overflows.
    reads_state = initial_state is not None or n > 1
    final_state = None
    if reads_state or return_state:
        chunk_log_decay = None
        if l is not None:
            chunk_log_decay = l[:, :, 0, :, -1]
            k = k * mx.exp((l[..., -1:] - l) / deg)[..., None]
            q = q * mx.exp(l / deg)[..., None]
        phi_k = sympow(k[:, :, 0], deg)
        chunk_S = phi_k.swapaxes(-1, -2) @ v[:, :, 0]
        chunk_z = phi_k.sum(axis=-2)
        entering, final_state = _scan_states(chunk_S, chunk_z, chunk_log_decay, initial_state,
                                             need_entering=reads_state)
        if reads_state:
            entering_S, entering_z = entering
            phi_q = sympow(q, deg)
            numerator = numerator + phi_q @ entering_S[:, :, None]
            if normalize:
                denominator = denominator + (phi_q @ entering_z[:, :, None, ..., None])[..., 0]

    y = numerator
    if normalize:
        # No epsilon: a zero denominator means every weight is zero, and then so is the
        # numerator; any positive denominator, however small, is divided exactly.
        y = y / mx.where(denominator == 0, 1.0, denominator)[..., None]
    y = y.transpose(0, 3, 4, 1, 2, 5).reshape(B, n * c, Hq, e)
    if pad:
        y = y[:, :T]
    return y, (final_state if return_state else None)
