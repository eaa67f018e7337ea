"""An independent float64 NumPy implementation of the definition in power_retention/README.md
("Definition"), used as the ground truth.

It builds every weight w_ij = (s q_i . k_j)^p exp(L_i - L_j) explicitly, with no features,
chunks or states: nothing here shares code with the package.
"""

import numpy as np


def reference_power_retention(q, k, v, log_g=None, *, deg=2, scale=None, normalize=True):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, T, Hq, d = q.shape
    H, e = k.shape[2], v.shape[-1]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    log_g = np.zeros((B, T, H)) if log_g is None else np.asarray(log_g, dtype=np.float64)
    causal = np.tril(np.ones((T, T), dtype=bool))
    # log_decay[b, i, j, h] = log_g_(j+1) + ... + log_g_i, summed directly rather than as a
    # difference of running sums, which a -inf gate (a reset) would turn into NaN.
    after = np.arange(T)[:, None] > np.arange(T)[None, :]
    log_decays = np.cumsum(np.where(after[None, :, :, None], log_g[:, :, None, :], 0.0), axis=1)
    y = np.zeros((B, T, Hq, e))
    for head in range(Hq):
        kv_head = head // (Hq // H)
        scores = scale * np.einsum("bid,bjd->bij", q[:, :, head], k[:, :, kv_head])
        log_decay = log_decays[..., kv_head]
        weights = np.where(causal, scores**deg * np.exp(np.where(causal, log_decay, 0.0)), 0.0)
        numerator = weights @ v[:, :, kv_head]
        if normalize:
            denominator = weights.sum(axis=-1, keepdims=True)
            numerator = np.divide(numerator, denominator, out=np.zeros_like(numerator),
                                  where=denominator != 0)
        y[:, :, head] = numerator
    return y


def reference_state(phi_k, v, log_g=None):
    """S = sum_j exp(L_T - L_j) phi(k_j) v_j^T and z likewise, from given features phi_k."""
    phi_k, v = np.asarray(phi_k, dtype=np.float64), np.asarray(v, dtype=np.float64)
    B, T, H, D = phi_k.shape
    if log_g is None:
        decay = np.ones((B, T, H))
    else:  # the sum of the gates after each position (0 after the last)
        log_g = np.asarray(log_g, dtype=np.float64)
        from_end = np.cumsum(log_g[:, ::-1], axis=1)[:, ::-1]
        decay = np.exp(np.concatenate([from_end[:, 1:], np.zeros((B, 1, H))], axis=1))
    S = np.einsum("bth,bthf,bthe->bhfe", decay, phi_k, v)
    z = np.einsum("bth,bthf->bhf", decay, phi_k)
    return S, z
