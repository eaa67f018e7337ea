"""The normalized form's division y = numerator / denominator, with a backward pass that
stays finite where float32 can still represent the answer.

Autodiff through ``a / b`` forms ``a / b^2``: a weight sum of 1e-20 (at degree 4 one key at
q . k ~ 1e-5, which a few hundred thousand first tokens of training meet) squares to zero in
float32 and the gradient becomes inf or NaN. Here the backward uses y itself:

    d numerator = dy / b,    d denominator = -(dy . y) / b

so it needs 1 / b, not 1 / b^2. Rows whose weights sum to zero (y = 0) or to less than the
smallest normal float get no gradient: nothing in them is representable to differentiate.
The forward is the exact quotient (no epsilon), as before.
"""

from __future__ import annotations

import mlx.core as mx

from .autodiff import custom_function


def _forward(numerator, denominator):
    return numerator / mx.where(denominator == 0, 1.0, denominator)


def _vjp(primals, cotangent, y):
    denominator = primals[1]
    representable = denominator >= mx.finfo(denominator.dtype).smallest_normal
    inverse = mx.where(representable, 1.0 / mx.where(representable, denominator, 1.0), 0.0)
    d_numerator = cotangent * inverse
    d_denominator = -(cotangent * y).sum(axis=-1, keepdims=True) * inverse
    return d_numerator, d_denominator


divide_by_weight_sum = custom_function(_forward, _vjp)
