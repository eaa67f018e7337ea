"""The op: ``power_retention`` over a sequence, ``power_retention_step`` for one token.

Both validate their inputs (``inputs``), compute in float32 (float64 for float64 inputs) and
return the output in q's dtype. The forms they dispatch to share one signature and return
``(y, final_state)``: ``attention_power_retention`` and ``chunk_power_retention``
(``chunk.py``), ``recurrent_power_retention`` (``recurrent.py``); ``naive.py`` holds the
definition they are tested against, ``cost.py`` the model ``method="auto"`` chooses by, and
power_retention/README.md the math.
"""

from __future__ import annotations

from . import kernels
from .chunk import attention_power_retention, chunk_power_retention
from .cost import check_fits
from .inputs import prepare_inputs
from .recurrent import recurrent_power_retention, recurrent_step
from .validation import check_integer, check_method


def power_retention(q, k, v, log_g=None, *, deg=2, scale=None, method="auto", chunk_size=None,
                    initial_state=None, return_state=False, normalize=None, use_metal=False,
                    check_gates=True):
    """Causal power retention over a sequence.

    q (B, T, Hq, d), k (B, T, H, d), v (B, T, H, e), log_g (B, T, H) with log_g <= 0 or None
    (no decay). Query head i reads key/value head i // (Hq // H). Returns y (B, T, Hq, e) in
    q's dtype, and also the final RetentionState when ``return_state``; passing that state as
    ``initial_state`` to the next call continues the sequence exactly. A gate of zero
    (log_g = -inf) resets the state: nothing before it is remembered, which is how packed
    sequences keep their documents apart.

    normalize: divide by the sum of the weights (needs an even deg); None, the default, means
    True for even deg and False for odd. check_gates: refuse log_g > 0 or NaN where the values
    can be read (not inside mx.compile); a caller whose gates are <= 0 by construction skips it.

    method: "attention" (T x T weights, cheapest for short T), "chunked" (attention inside
    chunks of ``chunk_size``, a state across them; linear in T), "recurrent" (one token at a
    time), or "auto" (the fastest). ``chunk_size``: None, the default, takes the form and chunk
    size measured fastest for this shape on this device (``tuning``: measured at the first call
    of a shape, then kept on disk); with a chunk size given, "auto" picks the form by the cost
    model (``estimated_seconds``). ``use_metal``: the chunked and
    attention forms' state products on the fused Metal kernels where they run (``kernels``).
    """
    check_method(method)
    chunk_size = check_integer("chunk_size", chunk_size, allow_none=True,
                               meaning="None: the size measured fastest here")
    out_dtype = q.dtype if hasattr(q, "dtype") else None
    raw = (q, k, v)
    q, k, v, log_g, deg, normalize, initial_state = prepare_inputs(
        q, k, v, log_g, deg, scale, normalize, initial_state, has_time=True, check_gates=check_gates)
    B, T, Hq, d = q.shape
    shape = dict(B=B, T=T, Hq=Hq, H=k.shape[2], d=d, e=v.shape[-1], deg=deg,
                 gated=log_g is not None, with_state=initial_state is not None or return_state)
    from . import tuning  # here, so that python -m power_retention.tuning runs it as a script

    method, chunk_size = tuning.resolve(method, chunk_size, dtype=q.dtype, **shape)
    shape["chunk_size"] = chunk_size
    check_fits(method, **shape)
    options = dict(deg=deg, normalize=normalize, initial_state=initial_state,
                   return_state=return_state)
    if method == "recurrent":
        y, state = recurrent_power_retention(q, k, v, log_g, **options)
    else:
        if kernels.kernels_run(use_metal) and kernels.prefill_fits(*raw):
            options["state_kernels"] = kernels.StateKernels
        if method == "attention":
            y, state = attention_power_retention(q, k, v, log_g, **options)
        else:
            y, state = chunk_power_retention(q, k, v, log_g, chunk_size=chunk_size, **options)
    y = y.astype(out_dtype)
    return (y, state) if return_state else y


def power_retention_step(q, k, v, log_g, state, *, deg=2, scale=None, normalize=None,
                         use_metal=False, check_gates=True):
    """One token: q (B, Hq, d), k (B, H, d), v (B, H, e), log_g (B, H) or None; state None
    starts an empty sequence. Returns y (B, Hq, e) in q's dtype and the new RetentionState.
    ``use_metal``: on the fused decode kernel where it runs and takes the inputs (``kernels``)."""
    out_dtype = q.dtype if hasattr(q, "dtype") else None
    raw = (q, k, v)
    q, k, v, log_g, deg, normalize, state = prepare_inputs(
        q, k, v, log_g, deg, scale, normalize, state, has_time=False, check_gates=check_gates)
    log_g = None if log_g is None else log_g[:, 0]
    if kernels.kernels_run(use_metal) and kernels.decode_fits(*raw, deg):
        return kernels.decode_step(q[:, 0], *raw[1:], log_g, state, deg=deg, normalize=normalize)
    y, state = recurrent_step(q[:, 0], k[:, 0], v[:, 0], log_g, state, deg=deg,
                              normalize=normalize)
    return y.astype(out_dtype), state
