"""Chunked form: attention inside chunks of c positions, a recurrent state across chunks.

The attention form is this with one chunk spanning the sequence (c = T): the T x T weight
matrix and no scan (``attention_power_retention``). Inputs here are already validated, in
the compute dtype (float32 or float64), with the scale applied to q (``inputs.prepare_inputs``).

Layout inside is chunk-major so that the scan reads contiguous slices: q (n, B, H, G, c, d)
where query head h * G + g reads key/value head h; k (n, B, H, 1, c, d); values with a
column of ones appended, v1 (n, B, H, 1, c, e + 1), so that one product yields numerator
and denominator together (and the state's S and z together, as S1 = [S | z]); cumulative
in-chunk log decay l (n, B, H, 1, c). The state is kept transposed, S1t = [S | z]^T
(e + 1, D): then every product of the state path and of its vjp writes a contiguous result
(the (D, e + 1) layout makes autodiff hand the key features' vjp a transposed cotangent, and
that strided pass costs more than the products). Its feature axis follows
``sympow.StateLayout`` (at degree 2 a rolled layout of d (d // 2 + 1) features, d / 2 more
than D for even d, converted to sympow's at the boundaries: initial and final state).

On Linux CPUs in float32 the attention within each chunk and, at degree 2, the two state
products and the scan between them run compiled (``native.intra_chunk``,
``native.rolled_chunk_states``, ``native.rolled_read_states``, ``native.states_entering_chunks``:
the same arrays in the same layouts, each (chunk, head) computed with its c x c weights and
feature blocks in cache), and the attention form without a state to start from or return runs
as one compiled product in the op's own layout (``native.attention``: no chunk-major copies, no
column of ones, the normalisation inside); the MLX ops here say what they compute and run
everywhere else.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from . import native
from .normalize import divide_by_weight_sum
from .state import RetentionState
from .autodiff import custom_function
from .sympow import StateLayout, integer_power


def _causal_mask(c: int) -> mx.array:
    return mx.tril(mx.ones((c, c), dtype=mx.bool_))


def _decay_weights(log_g):
    """exp(l_i - l_j) on and below the diagonal for l = cumsum(log_g), and 1 above it (the
    caller masks): (..., c, c) from log_g (..., c), as running products of the gates down each
    column. MLX's elementwise exp runs scalar code on the CPU: the exp of the masked
    differences takes 5x as long (133 vs 26 ms at c = 256, T = 8192, 4 heads)."""
    c = log_g.shape[-1]
    below = mx.tril(mx.ones((c, c), dtype=mx.bool_), k=-1)
    return mx.cumprod(mx.where(below, mx.exp(log_g)[..., :, None], 1.0), axis=-2)


@lru_cache(maxsize=16)
def _intra_chunk_function(deg: int, gated: bool):
    """[numerator | denominator] (n, B, H, G, c, e + 1) of the attention form within each
    chunk, from q (n, B, H, G, c, d), k (n, B, H, 1, c, d), v1 (n, B, H, 1, c, e + 1) and, when
    gated, the log gates log_g (n, B, H, 1, c).

    The weights are w = s^deg * P for the scores s = q . k and the decays P (the causal mask
    when not gated). The vjp is written by hand from two c x c arrays the forward keeps (w and
    s^(deg - 1) * P): autodiff through the mask, the power and the broadcast difference makes
    about three times as many passes over c x c arrays."""

    def forward(q, k, v1, log_g=None):
        scores = q @ k.swapaxes(-1, -2)
        causal = _causal_mask(q.shape[-2])
        if gated:
            decays = _decay_weights(log_g)
            slope = decays if deg == 1 else integer_power(scores, deg - 1) * decays
        else:
            slope = 1.0 if deg == 1 else integer_power(scores, deg - 1)
        # Selects, not products, above the diagonal: a NaN or inf in a later key or value
        # times a zero weight is NaN, and it must not reach an earlier query. Rows at or
        # after a non-finite value are NaN, as the recurrent form gives them.
        slope = mx.where(causal, slope, 0.0)
        weights = mx.where(causal, scores * slope, 0.0)
        finite = mx.isfinite(v1).all(axis=-1, keepdims=True)
        out = weights @ mx.where(finite, v1, 0.0)
        reached = mx.cumsum(mx.logical_not(finite).astype(mx.int32), axis=-2) > 0
        return mx.where(reached, mx.nan, out), weights, slope

    def vjp(primals, cotangents, outputs):
        q, k, v1 = primals[:3]
        d_out, (_, weights, slope) = cotangents[0], outputs
        n, B, H, G, c, d = q.shape
        d_weights = d_out @ v1.swapaxes(-1, -2)
        # The G query heads of a group share k, v1 and the gates: their cotangents sum over G.
        d_v1 = weights.reshape(n, B, H, 1, G * c, c).swapaxes(-1, -2) @ d_out.reshape(n, B, H, 1, G * c, -1)
        d_scores = d_weights * slope
        d_q = deg * (d_scores @ k)
        d_k = deg * (d_scores.reshape(n, B, H, 1, G * c, c).swapaxes(-1, -2) @ q.reshape(n, B, H, 1, G * c, d))
        if not gated:
            return d_q, d_k, d_v1
        # d w_ij / d l_i = w_ij and d w_ij / d l_j = -w_ij; l is the running sum of log_g.
        through_weights = (d_weights * weights).sum(axis=3, keepdims=True)
        d_l = through_weights.sum(axis=-1) - through_weights.sum(axis=-2)
        return d_q, d_k, d_v1, mx.cumsum(d_l, axis=-1, reverse=True)

    return custom_function(forward, vjp)


def _intra_chunk(q, k, v1, log_g, deg):
    """[numerator | denominator] (..., c, e + 1) of the attention form within each chunk."""
    if native.applies_to(q):  # the same, with its c x c arrays kept in cache
        return native.intra_chunk(q, k[:, :, :, 0], v1[:, :, :, 0],
                                  None if log_g is None else log_g[:, :, :, 0], deg)
    if log_g is None:
        return _intra_chunk_function(deg, False)(q, k, v1)[0]
    return _intra_chunk_function(deg, True)(q, k, v1, log_g)[0]


def _stacked_states_entering_chunks_forward(chunk_S1, chunk_decay, S1):
    """The states entering each chunk, stacked (n, ...), and the state after the last one.

    chunk_S1 (n, B, H, ...): each chunk's own contribution, decayed to the chunk's end;
    chunk_decay (n, B, H, 1, 1): each chunk's total decay; S1 (B, H, ...): the state entering
    the first chunk. Elementwise, so either layout of [S | z] works."""
    entering = []
    for i in range(chunk_S1.shape[0]):
        entering.append(S1)
        S1 = chunk_decay[i] * S1 + chunk_S1[i]
    return mx.stack(entering), S1


def _stacked_states_entering_chunks_vjp(primals, cotangents, outputs):
    # Written by hand because autodiff through the loop's slices x[i] builds a full-size zero
    # array per chunk for each slice's cotangent: quadratic in the number of chunks.
    entering, chunk_decay = outputs[0], primals[1]
    d_entering, d_final = cotangents
    d_state = mx.zeros_like(entering[0]) if d_final is None else d_final
    d_chunk, d_decay = [None] * len(entering), [None] * len(entering)
    for i in reversed(range(len(entering))):
        d_chunk[i] = d_state
        d_decay[i] = (d_state * entering[i]).sum(axis=(-2, -1), keepdims=True)
        d_state = chunk_decay[i] * d_state
        if d_entering is not None:
            d_state = d_state + d_entering[i]
    return mx.stack(d_chunk), mx.stack(d_decay), d_state


_stacked_states_entering_chunks = custom_function(_stacked_states_entering_chunks_forward,
                                                  _stacked_states_entering_chunks_vjp)


def _read_states_forward(phi_q, entering):
    """What every query reads from the state entering its chunk: phi_q (n, B, H, G, c, D) and
    entering [S | z]^T (n, B, H, e + 1, D) give (n, B, H, G, c, e + 1)."""
    return phi_q @ entering[:, :, :, None].swapaxes(-1, -2)


def _read_states_vjp(primals, cotangent, output):
    # By hand so that both cotangents come out contiguous: autodiff would hand the entering
    # states' cotangent over transposed.
    phi_q, entering = primals
    n, B, H, G, c, D = phi_q.shape
    d_phi_q = cotangent @ entering[:, :, :, None]
    d_entering = cotangent.reshape(n, B, H, G * c, -1).swapaxes(-1, -2) @ phi_q.reshape(n, B, H, G * c, D)
    return d_phi_q, d_entering


_read_states = custom_function(_read_states_forward, _read_states_vjp)


def chunk_power_retention(q, k, v, log_g, *, deg, normalize, initial_state=None,
                          return_state=False, chunk_size=64, state_kernels=None):
    """y (B, T, Hq, e) and the final RetentionState (None unless ``return_state``).
    ``state_kernels``: fused kernels for the two state products (``kernels.StateKernels``)."""
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
        log_g = log_g.reshape(B, n, c, H).transpose(1, 0, 3, 2)[:, :, :, None]
        l = mx.cumsum(log_g, axis=-1)

    out = _intra_chunk(q, k, v1, log_g, deg)

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
            # The decay from each key to the chunk's end is a sum of the gates after it, not
            # a difference of running sums: after a reset (-inf) both of those are -inf.
            after = mx.cumsum(log_g, axis=-1, reverse=True, inclusive=False)
            k = k * mx.exp(after / deg)[..., None]
            q = q * mx.exp(l / deg)[..., None]
        initial = None if initial_state is None else \
            mx.concatenate([initial_state.S, initial_state.z[..., None]], axis=-1)
        if state_kernels is None:
            layout = StateLayout.for_degree(deg, d, q.dtype)
            # On the CPU the compiled products compute the features in cache instead.
            compiled = deg == 2 and native.applies_to(q)
            chunk_S1t = native.rolled_chunk_states(k[:, :, :, 0], v1[:, :, :, 0]) if compiled \
                else layout.weigh((v1.swapaxes(-1, -2) @ layout.features(k))[:, :, :, 0])
            S1t = mx.zeros(chunk_S1t.shape[1:], chunk_S1t.dtype) if initial is None \
                else layout.from_sympow(initial.swapaxes(-1, -2))
            scan = native.states_entering_chunks if compiled else _stacked_states_entering_chunks
            entering, S1t = scan(chunk_S1t, chunk_decay, S1t)
            if compiled:
                reads = native.rolled_read_states(q.reshape(n, B, H, G * c, d), entering)
                reads = reads.reshape(n, B, H, G, c, e + 1)
            else:
                reads = _read_states(layout.features(q), entering)
            S1 = layout.to_sympow(S1t).swapaxes(-1, -2)
        else:
            # The kernels keep [S | z] as (D, e + 1), whose writes coalesce on a GPU.
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
        y = divide_by_weight_sum(y, out[..., e:])
    y = y.transpose(1, 0, 4, 2, 3, 5).reshape(B, n * c, Hq, e)
    if pad:
        y = y[:, :T]
    return y, (final_state if return_state else None)


def attention_power_retention(q, k, v, log_g, *, deg, normalize, initial_state=None,
                              return_state=False, state_kernels=None):
    """The attention form: one chunk spanning the sequence (its T x T weights, no scan)."""
    if state_kernels is None and initial_state is None and not return_state and native.applies_to(q):
        return native.attention(q, k, v, log_g, deg, normalize), None
    return chunk_power_retention(q, k, v, log_g, deg=deg, normalize=normalize,
                                 initial_state=initial_state, return_state=return_state,
                                 chunk_size=q.shape[1], state_kernels=state_kernels)
