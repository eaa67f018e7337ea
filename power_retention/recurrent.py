"""Recurrent form: one token at a time on a constant-size state (what decoding uses).

Inputs are already validated, in the compute dtype, with the scale applied to q.
"""

from __future__ import annotations

import mlx.core as mx

from .normalize import divide_by_weight_sum
from .state import RetentionState
from .sympow import integer_power, sympow


def recurrent_step(q, k, v, log_g, state, *, deg, normalize):
    """q (B, Hq, d), k (B, H, d), v (B, H, e), log_g (B, H) or None -> y (B, Hq, e), state.

    The token's own weight (q . k)^deg is computed directly, not through the features: a dot
    product of D features loses the digits of a weight much smaller than |q|^deg |k|^deg, and
    on the first token y = v must hold exactly however small that weight is.
    """
    B, Hq, d = q.shape
    H, e = k.shape[1], v.shape[-1]
    q = q.reshape(B, H, Hq // H, d)
    phi_q = sympow(q, deg)
    own_weight = integer_power(q @ k[..., None], deg)  # (B, H, G, 1)
    numerator = own_weight * v[:, :, None]
    denominator = own_weight
    if state is not None:
        S, z = state
        if log_g is not None:
            decay = mx.exp(log_g)
            S, z = decay[..., None, None] * S, decay[..., None] * z
        numerator = numerator + phi_q @ S
        denominator = denominator + phi_q @ z[..., None]
    y = numerator
    if normalize:
        y = divide_by_weight_sum(y, denominator)

    phi_k = sympow(k, deg)
    update_S = phi_k[..., :, None] * v[..., None, :]
    new_state = RetentionState(update_S, phi_k) if state is None else \
        RetentionState(S + update_S, z + phi_k)
    return y.reshape(B, Hq, e), new_state


def recurrent_power_retention(q, k, v, log_g, *, deg, normalize, initial_state=None,
                              return_state=False):
    """y (B, T, Hq, e) by T recurrent steps, and the final state (None unless
    ``return_state``)."""
    state = initial_state
    outputs = []
    for t in range(q.shape[1]):
        y, state = recurrent_step(q[:, t], k[:, t], v[:, t],
                                  None if log_g is None else log_g[:, t], state,
                                  deg=deg, normalize=normalize)
        outputs.append(y)
    return mx.stack(outputs, axis=1), (state if return_state else None)
