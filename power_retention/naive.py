"""Power retention as plainly as MLX can say it: the reader's definition of what the fast forms
(``chunk.py``, ``recurrent.py``) compute, and what the tests hold them to.

For one query head i reading key/value head h, log gates log_g <= 0 and L_t = log_g_1 + ... +
log_g_t, the weight of token j for the query at i is

    w_ij = (s q_i . k_j)^p exp(L_i - L_j)     for j <= i, and 0 for j > i

where exp(L_i - L_j) = g_(j+1) ... g_i is the product of the gates g = exp(log_g) after j (1
for j = i); a gate of zero (log_g = -inf) is a reset that nothing before it crosses.

and the output is y_i = sum_j w_ij v_j, divided by sum_j w_ij when ``normalize`` (which needs
an even p, so that no weight is negative). The same numbers come from a state carried token
by token, because (q . k)^p = phi(q) . phi(k) for the symmetric power features phi
(``sympow``):

    S_t = g_t S_(t-1) + phi(k_t) v_t^T,   z_t = g_t z_(t-1) + phi(k_t),
    y_t = phi(q_t) S_t / phi(q_t) z_t

These functions take the op's arguments as given (``scale`` included, no validation) and, like
every form, return ``(y, final_state)``; the final state is None unless ``return_state``.
They favour clarity over speed and numerics: the fast forms also rescale queries, compute each
token's own weight exactly and stay finite in the backward pass (power_retention/README.md).
"""

from __future__ import annotations

import math

import mlx.core as mx

from .state import RetentionState
from .sympow import sympow


def _by_query_head(x, groups: int):
    """Key/value-head arrays (B, T, H, ...) repeated for the query heads that read them."""
    return None if x is None else mx.repeat(x, groups, axis=2)


def naive_power_retention(q, k, v, log_g=None, *, deg=2, scale=None, normalize=True,
                          initial_state=None, return_state=False):
    """The T x T weights at once. q (B, T, Hq, d), k (B, T, H, d), v (B, T, H, e), log_g
    (B, T, H) or None -> y (B, T, Hq, e)."""
    B, T, Hq, d = q.shape
    H = k.shape[2]
    q = q * (1 / math.sqrt(d) if scale is None else scale)
    if log_g is None:
        log_g = mx.zeros((B, T, H), dtype=q.dtype)
    L = mx.cumsum(log_g, axis=1)
    Lq = _by_query_head(L, Hq // H).transpose(0, 2, 1)                    # (B, Hq, T)
    # decay[i, j] = g_(j+1) ... g_i: running products down each column j of the gates after j.
    gates = _by_query_head(mx.exp(log_g), Hq // H).transpose(0, 2, 1)     # (B, Hq, T)
    after_j = mx.arange(T)[:, None] > mx.arange(T)[None, :]
    decay = mx.tril(mx.cumprod(mx.where(after_j, gates[..., :, None], 1.0), axis=-2))
    scores = q.transpose(0, 2, 1, 3) @ _by_query_head(k, Hq // H).transpose(0, 2, 3, 1)
    weights = scores**deg * decay                                        # (B, Hq, T, T)
    values = _by_query_head(v, Hq // H).transpose(0, 2, 1, 3)           # (B, Hq, T, e)
    numerator = weights @ values
    denominator = weights.sum(axis=-1, keepdims=True)
    if initial_state is not None:  # what came before, decayed to each query
        phi_q = sympow(q, deg).transpose(0, 2, 1, 3) * mx.exp(Lq)[..., None]
        S, z = (_by_query_head(x[:, None], Hq // H)[:, 0] for x in initial_state)
        numerator = numerator + phi_q @ S
        denominator = denominator + phi_q @ z[..., None]
    y = numerator / mx.where(denominator == 0, 1, denominator) if normalize else numerator
    final_state = None
    if return_state:
        decay_to_end = mx.exp(mx.cumsum(log_g, axis=1, reverse=True, inclusive=False))[..., None]
        phi_k = sympow(k, deg) * decay_to_end
        S = mx.einsum("bthf,bthe->bhfe", phi_k, v)
        z = phi_k.sum(axis=1)
        if initial_state is not None:
            total = mx.exp(L[:, -1])                                     # (B, H)
            S = S + total[..., None, None] * initial_state.S
            z = z + total[..., None] * initial_state.z
        final_state = RetentionState(S, z)
    return y.transpose(0, 2, 1, 3), final_state


def naive_recurrent_power_retention(q, k, v, log_g=None, *, deg=2, scale=None, normalize=True,
                                    initial_state=None, return_state=False):
    """One token at a time on the state (S, z); same arguments and results."""
    B, T, Hq, d = q.shape
    H, e = k.shape[2], v.shape[-1]
    q = q * (1 / math.sqrt(d) if scale is None else scale)
    D = sympow(k[:, :1], deg).shape[-1]
    S, z = initial_state if initial_state is not None else \
        (mx.zeros((B, H, D, e), dtype=q.dtype), mx.zeros((B, H, D), dtype=q.dtype))
    outputs = []
    for t in range(T):
        if log_g is not None:
            gate = mx.exp(log_g[:, t])                                   # (B, H)
            S, z = gate[..., None, None] * S, gate[..., None] * z
        phi_k = sympow(k[:, t], deg)                                     # (B, H, D)
        S = S + phi_k[..., :, None] * v[:, t, :, None, :]
        z = z + phi_k
        phi_q = sympow(q[:, t].reshape(B, H, Hq // H, d), deg)           # (B, H, G, D)
        numerator = phi_q @ S
        if normalize:
            denominator = phi_q @ z[..., None]
            numerator = numerator / mx.where(denominator == 0, 1, denominator)
        outputs.append(numerator.reshape(B, Hq, e))
    return mx.stack(outputs, axis=1), (RetentionState(S, z) if return_state else None)
