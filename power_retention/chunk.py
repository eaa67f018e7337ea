"""Chunked form: attention inside chunks of c positions, a recurrent state across chunks.

The attention form is this with one chunk spanning the sequence (c = T): the T x T weight
matrix and no scan. Inputs here are already validated, in the compute dtype (float32 or
float64), with the scale applied to q (see ``ops.power_retention``).

Layout inside is chunk-major so that the scan reads contiguous slices: q (n, B, H, G, c, d)
where query head h * G + g reads key/value head h; k (n, B, H, 1, c, d); values with a
column of ones appended, v1 (n, B, H, 1, c, e + 1), so that one product yields numerator
and denominator together (and the state's S and z together, as S1 = [S | z]); cumulative
in-chunk log decay l (n, B, H, 1, c). The state is kept transposed, S1t = [S | z]^T
(e + 1, D): then every product of the state path and of its vjp writes a contiguous result
(the (D, e + 1) layout makes autodiff hand the key features' vjp a transposed cotangent, and
that strided pass costs more than the products).
"""

from __future__ import annotations

import mlx.core as mx

from .state import RetentionState
from .sympow import integer_power, sympow


def _causal_mask(c: int) -> mx.array:
    return mx.tril(mx.ones((c, c), dtype=mx.bool_))


def _intra_chunk(q, k, v1, l, deg):
    """[numerator | denominator] (..., c, e + 1) of the attention form within each chunk."""
    causal = _causal_mask(q.shape[-2])
    weights = integer_power(q @ k.swapaxes(-1, -2), deg)
    if l is None:
        weights = mx.where(causal, weights, 0.0)
    else:
        # Mask before exp: above the diagonal l_i - l_j > 0 could overflow, and inf * 0 is NaN
        # in the backward pass.
        log_decay = mx.where(causal, l[..., :, None] - l[..., None, :], -mx.inf)
        weights = weights * mx.exp(log_decay)
    return weights @ v1


def _states_entering_chunks(chunk_S1t, chunk_decay, S1t):
    """The state [S | z]^T entering each chunk (a list), and the state after the last one."""
    entering = []
    for i in range(chunk_S1t.shape[0]):
        entering.append(S1t)
        S1t = chunk_decay[i] * S1t + chunk_S1t[i]
    return entering, S1t


@mx.custom_function
def _scan_chunks(phi_q, chunk_S1t, chunk_decay, S1t):
    """Carry the state [S | z]^T across chunks and read it with each chunk's queries.

    phi_q (n, B, H, G, c, D): query features; chunk_S1t (n, B, H, e + 1, D): each chunk's own
    contribution; chunk_decay (n, B, H, 1, 1): each chunk's total decay; S1t (B, H, e + 1, D):
    the state entering the first chunk. Returns what every query reads from the state entering
    its chunk, (n, B, H, G, c, e + 1), and the state after the last chunk.
    """
    entering, final = _states_entering_chunks(chunk_S1t, chunk_decay, S1t)
    return mx.stack([phi_q[i] @ state[:, :, None].swapaxes(-1, -2)
                     for i, state in enumerate(entering)]), final


def _reverse_scan(entering, chunk_decay, d_final, d_entering):
    """The vjp of S_{i+1} = decay_i S_i + C_i given the states entering each chunk, the final
    state's cotangent and ``d_entering(i)``, what reaches entering[i] from elsewhere (or
    None): the cotangents of C (stacked), of the decays (stacked) and of S_0.

    Written by hand because autodiff through the loop's slices x[i] builds a full-size zero
    array per chunk for each slice's cotangent: quadratic in the number of chunks."""
    n = len(entering)
    d_state = mx.zeros_like(entering[0]) if d_final is None else d_final
    d_chunk, d_decay = [None] * n, [None] * n
    for i in reversed(range(n)):
        d_chunk[i] = d_state
        d_decay[i] = (d_state * entering[i]).sum(axis=(-2, -1), keepdims=True)
        d_state = chunk_decay[i] * d_state
        elsewhere = d_entering(i)
        if elsewhere is not None:
            d_state = d_state + elsewhere
    return mx.stack(d_chunk), mx.stack(d_decay), d_state


@_scan_chunks.vjp
def _scan_chunks_vjp(primals, cotangents, outputs):
    # The entering states are recomputed (cheap) instead of kept.
    phi_q, chunk_S1t, chunk_decay, S1t = primals
    d_reads, d_final = cotangents
    n, B, H, G, c, D = phi_q.shape
    entering, _ = _states_entering_chunks(chunk_S1t, chunk_decay, S1t)
    d_phi_q = mx.stack([d_reads[i] @ entering[i][:, :, None] for i in range(n)])

    def read_by_queries(i):
        reads = d_reads[i].reshape(B, H, G * c, -1).swapaxes(-1, -2)
        return reads @ phi_q[i].reshape(B, H, G * c, D)

    return (d_phi_q, *_reverse_scan(entering, chunk_decay, d_final, read_by_queries))


@mx.custom_function
def _stacked_states_entering_chunks(chunk_S1, chunk_decay, S1):
    """``_states_entering_chunks`` as one stacked array (n, ...), for the kernel path, which
    reads every entering state at once."""
    entering, final = _states_entering_chunks(chunk_S1, chunk_decay, S1)
    return mx.stack(entering), final


@_stacked_states_entering_chunks.vjp
def _stacked_states_entering_chunks_vjp(primals, cotangents, outputs):
    d_entering, d_final = cotangents
    return _reverse_scan(outputs[0], primals[1], d_final,
                         lambda i: None if d_entering is None else d_entering[i])


def chunk_power_retention(q, k, v, log_g, *, deg, chunk_size, initial_state, return_state,
                          normalize, state_kernels=None):
    """y (B, T, Hq, e) and the final RetentionState (None unless return_state).
    ``state_kernels``: fused kernels for the two state products (see ``run_power_retention``)."""
    B, T, Hq, d = q.shape
    H, e = k.shape[2], v.shape[-1]
    G = Hq // H
    c = min(chunk_size, T)
    n = -(-T // c)
    pad = n * c - T
    v1 = mx.concatenate([v, mx.ones((B, T, H, 1), dtype=v.dtype)], axis=-1)
    if pad:
        # Zero keys have zero features and a zero log gate keeps the decay: padding adds nothing.
        widths = [(0, 0), (0, pad), (0, 0), (0, 0)]
        q, k, v1 = mx.pad(q, widths), mx.pad(k, widths), mx.pad(v1, widths)
        if log_g is not None:
            log_g = mx.pad(log_g, widths[:3])

    q = q.reshape(B, n, c, H, G, d).transpose(1, 0, 3, 4, 2, 5)
    k = k.reshape(B, n, c, H, d).transpose(1, 0, 3, 2, 4)[:, :, :, None]
    v1 = v1.reshape(B, n, c, H, e + 1).transpose(1, 0, 3, 2, 4)[:, :, :, None]
    l = None
    if log_g is not None:
        l = mx.cumsum(log_g.reshape(B, n, c, H).transpose(1, 0, 3, 2), axis=-1)[:, :, :, None]

    out = _intra_chunk(q, k, v1, l, deg)

    # Keys reach later chunks only through the state; queries read the state entering their
    # chunk. The decays are split as exp(x / deg) on the inputs because phi is homogeneous
    # of degree deg; every such factor is <= 1 for log_g <= 0, so nothing overflows.
    reads_state = initial_state is not None or n > 1
    final_state = None
    if reads_state or return_state:
        if l is None:
            chunk_decay = mx.ones((n, B, H, 1, 1), dtype=q.dtype)
        else:
            chunk_decay = mx.exp(l[:, :, :, 0, -1])[..., None, None]
            k = k * mx.exp((l[..., -1:] - l) / deg)[..., None]
            q = q * mx.exp(l / deg)[..., None]
        initial = None if initial_state is None else \
            mx.concatenate([initial_state.S, initial_state.z[..., None]], axis=-1)
        # Each chunk's own contribution to the state, decayed to the chunk's end.
        if state_kernels is None:
            chunk_S1t = (v1.swapaxes(-1, -2) @ sympow(k, deg))[:, :, :, 0]
            S1t = mx.zeros(chunk_S1t.shape[1:], chunk_S1t.dtype) if initial is None \
                else initial.swapaxes(-1, -2)
            reads, S1t = _scan_chunks(sympow(q, deg), chunk_S1t, chunk_decay, S1t)
            S1 = S1t.swapaxes(-1, -2)
        else:
            # The kernels keep [S | z] as (D, e + 1), whose writes coalesce on a GPU; the scan
            # between them is elementwise and takes either layout.
            chunk_S1 = state_kernels.chunk_states(k[:, :, :, 0], v1[:, :, :, 0], deg)
            S1 = mx.zeros(chunk_S1.shape[1:], chunk_S1.dtype) if initial is None else initial
            entering, S1 = _stacked_states_entering_chunks(chunk_S1, chunk_decay, S1)
            reads = state_kernels.read_states(q, entering, deg)
        out = out + reads
        if return_state:
            final_state = RetentionState(S1[..., :e], S1[..., e])

    y = out[..., :e]
    if normalize:
        # No epsilon: a zero denominator means every weight is zero, and then so is the
        # numerator; any positive denominator, however small, is divided exactly.
        denominator = out[..., e:]
        y = y / mx.where(denominator == 0, 1.0, denominator)
    y = y.transpose(1, 0, 4, 2, 3, 5).reshape(B, n * c, Hq, e)
    if pad:
        y = y[:, :T]
    return y, (final_state if return_state else None)
