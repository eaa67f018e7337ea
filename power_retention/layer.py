"""``PowerRetention``: the op as a drop-in sequence-mixing layer, with its recurrent cache.

    layer = PowerRetention(dim=256)                  # 4 heads of 64, degree 2, gated
    y = layer(x)                                     # x (B, T, dim) -> (B, T, dim)

    cache = layer.make_cache()                       # continue a sequence piece by piece
    y1 = layer(x[:, :100], cache=cache)              # prefill (chunked form)
    y2 = layer(x[:, 100:101], cache=cache)           # one token (recurrent step)
"""

from __future__ import annotations

import math
import warnings

import mlx.core as mx
import mlx.nn as nn

from .cache import ArraysCache
from .convolution import ShortConvolution
from .ops import power_retention, power_retention_step
from .state import RetentionState
from .sympow import expanded_dim
from .validation import check_degree, check_integer, check_method, check_normalize, check_reset

# The gate's bias is set so that sigmoid(bias) = INITIAL_GATE: every head starts with a memory
# of about 1 / (1 - INITIAL_GATE) tokens and learns to shorten it where that helps. A memory
# of ~1000 tokens is what recall across long gaps needs: started at 0.9 (~10 tokens), p = 2
# never leaves chance on MQAR at 16 pairs in 128 tokens, where 0.999 recalls; on text the
# long start costs 0.01-0.05 nats at 1000 steps (the tables in the README's "Evaluation").
INITIAL_GATE = 0.999
CONV_SIZE = 4
ROPE = False

def check_gate_init(gate_init) -> float:
    if isinstance(gate_init, bool) or not isinstance(gate_init, (int, float)) \
            or not 0 < gate_init < 1:
        raise ValueError(f"gate_init must be a number in (0, 1) (the gate every head starts at), "
                         f"got {gate_init!r}")
    return float(gate_init)


def state_floats(*, num_heads: int, num_kv_heads: int, head_dim: int, deg: int,
                 conv_size: int) -> int:
    """Floats of recurrent state one layer keeps per sequence: S (D x head_dim) and z (D) per
    key/value head, and the short convolution's last inputs."""
    return (num_kv_heads * expanded_dim(head_dim, deg) * (head_dim + 1)
            + ShortConvolution.state_floats((num_heads + 2 * num_kv_heads) * head_dim, conv_size))


def resolve_heads(dim, num_heads=None, num_kv_heads=None, head_dim=None):
    """(num_heads, num_kv_heads, head_dim) with the layer's defaults filled in.

    With neither given, heads are 64 wide (narrower if dim < 64): the state per head is
    D x (d + 1) floats with D = C(d + 1, 2) at degree 2 (``state_floats``), so narrow heads
    keep it small (power_retention/README.md, "Costs").
    """
    dim = check_integer("dim", dim)
    num_heads = check_integer("num_heads", num_heads, allow_none=True)
    num_kv_heads = check_integer("num_kv_heads", num_kv_heads, allow_none=True)
    head_dim = check_integer("head_dim", head_dim, allow_none=True)
    if head_dim is None:
        if num_heads is None:
            head_dim = min(dim, 64)
        elif dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}: "
                             f"pass head_dim explicitly")
        else:
            head_dim = dim // num_heads
    if num_heads is None:
        num_heads = max(1, dim // head_dim)
    if num_kv_heads is None:
        num_kv_heads = num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    return num_heads, num_kv_heads, head_dim


# The slots of a power mixer's ArraysCache.
STATE_S, STATE_Z, CONV_TAIL, POSITION = range(4)


def RetentionCache() -> ArraysCache:
    """An empty cache of a ``PowerRetention`` layer: the name it had before it became an
    mlx-lm ``ArraysCache``; ``layer.make_cache()`` is the way to get one."""
    return ArraysCache(4)


class PowerRetention(nn.Module):
    """Multi-head power retention: projections, a short convolution, a decay gate, the op, a
    per-head norm.

    Args:
        dim: model width (input and output features).
        num_heads, num_kv_heads, head_dim: query heads, key/value heads (grouped queries:
            each key/value head serves num_heads // num_kv_heads query heads) and per-head
            width; see ``resolve_heads`` for the defaults.
        deg: the power p. Even p (default 2) gives non-negative weights and the normalized form.
        gating: learn a per-token, per-key/value-head decay ``log_g = logsigmoid(x W_g + b)``
            (starting at g = ``gate_init``); False means no decay.
        chunk_size, method: passed to ``power_retention``; by default the form and chunk size
            measured fastest for the shape on this device (``power_retention.tuning``).
        normalize: divide by the sum of weights; default True for even deg, False for odd.
        scale: the query scale (only matters when normalize=False); default 1/sqrt(head_dim).
        use_metal: run on the fused Metal kernels where they run (``kernels``): one-token
            steps on the decode kernel, the chunked form's state products on the prefill
            kernels; where they do not (no Metal, or the CPU as MLX's default device), warn
            once and use the MLX path. Gradients through the kernels are those of the MLX
            path. (``use_metal_kernels``, its former name, is still accepted.)
        gate_init: the gate every head starts at, in (0, 1).
        conv_size: taps of the causal depthwise convolution (with SiLU) on q, k and v after
            their projections (``ShortConvolution``); 0 for none.
        output_norm: an RMS norm on each head's output (below); default: for the
            unnormalized form only.
        rope, rope_theta: rotary position embeddings on q and k (base rope_theta), as the
            softmax baseline has, so that weights can depend on the distance between tokens.

    The unnormalized form (odd p) sums its weighted values, so its output grows with the
    number of tokens: an RMS norm on each head (one learnable gain of head_dim entries,
    shared by the heads, as flash-linear-attention's linear-attention layers have) gives it
    unit scale at any context length. The normalized form's output is already a weighted
    average of values, as softmax attention's is, and there the norm only throws away its
    size (how spread the weights are, how far the values agree), which the model uses:
    removing it lowered character-level validation loss by 0.10 nats (the ablation table in
    benchmarks/README.md), so it is off by default for even p. Since any factor common to a query's
    weights cancels in the normalized form, and in the norm, a learned temperature on q
    would change nothing: sharper weights come from a higher degree or from key sizes.
    """

    def __init__(self, dim: int, num_heads: int | None = None, num_kv_heads: int | None = None,
                 head_dim: int | None = None, deg: int = 2, gating: bool = True,
                 chunk_size: int | None = None, use_metal: bool = False, *,
                 method: str = "auto", normalize: bool | None = None, scale: float | None = None,
                 norm_eps: float = 1e-6, gate_init: float = INITIAL_GATE,
                 conv_size: int = CONV_SIZE, output_norm: bool | None = None, rope: bool = ROPE,
                 rope_theta: float = 10000.0, use_metal_kernels: bool | None = None):
        super().__init__()
        if use_metal_kernels is not None:
            warnings.warn("PowerRetention(use_metal_kernels=...) is now use_metal=...",
                          DeprecationWarning, stacklevel=2)
            use_metal = use_metal_kernels
        num_heads, num_kv_heads, head_dim = resolve_heads(dim, num_heads, num_kv_heads, head_dim)
        deg = check_degree(deg)
        normalize = check_normalize(deg, normalize)
        check_method(method)
        check_gate_init(gate_init)
        check_integer("conv_size", conv_size, minimum=0, meaning="0: no convolution")
        self.dim = dim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.deg = deg
        self.gating = bool(gating)
        self.chunk_size = check_integer("chunk_size", chunk_size, allow_none=True,
                                        meaning="None: the size measured fastest here")
        self.method = method
        self.normalize = bool(normalize)
        self.scale = scale
        self.norm_eps = norm_eps
        self.use_metal = bool(use_metal)
        self.gate_init = float(gate_init)
        self.conv_size = int(conv_size)
        self.output_norm = (not normalize) if output_norm is None else bool(output_norm)
        if rope:
            if head_dim % 2:
                raise ValueError(f"rope=True needs an even head_dim, got {head_dim}")
            self.rope = nn.RoPE(head_dim, base=rope_theta)

        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)
        if self.conv_size:
            self.conv = ShortConvolution((num_heads + 2 * num_kv_heads) * head_dim, self.conv_size)
        if self.gating:
            self.gate_proj = nn.Linear(dim, num_kv_heads, bias=True)
            # Zero weights: every gate starts at exactly gate_init and learns from there.
            self.gate_proj.weight = mx.zeros_like(self.gate_proj.weight)
            self.gate_proj.bias = mx.full((num_kv_heads,), math.log(gate_init / (1 - gate_init)))
        if self.output_norm:
            self.norm_weight = mx.ones((head_dim,))

    @property
    def expanded_dim(self) -> int:
        """D, the number of symmetric-power features per head."""
        return expanded_dim(self.head_dim, self.deg)

    @property
    def state_size(self) -> int:
        """Floats of recurrent state per sequence: S (D x head_dim) and z (D) per kv head, and
        the convolution's last conv_size - 1 inputs."""
        return state_floats(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                            head_dim=self.head_dim, deg=self.deg, conv_size=self.conv_size)

    def make_cache(self) -> ArraysCache:
        """The layer's recurrent state between calls, the same size at any context length: an
        mlx-lm ``ArraysCache`` whose slots hold S and z (see ``RetentionState``), the short
        convolution's last inputs and, with rotary embeddings, the position (tokens seen)."""
        return RetentionCache()

    def __call__(self, x: mx.array, cache: ArraysCache | None = None,
                 reset: mx.array | None = None) -> mx.array:
        """``reset`` (B, T) bool, optional: True where a new document starts. Nothing before it
        reaches it or anything after it (a zero gate, and the convolution stops there), so
        documents packed into one sequence give what each gives alone."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, T, dim={self.dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        check_reset(reset, (B, T))
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv_size:
            (q, k, v), tail = self.conv.split(q, k, v, tail=None if cache is None else cache[CONV_TAIL],
                                              reset=reset)
            if cache is not None:
                cache[CONV_TAIL] = tail
        q = q.reshape(B, T, self.num_heads, self.head_dim)
        k = k.reshape(B, T, self.num_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim)
        if "rope" in self:
            # Rotating q_i and k_j by their positions makes q_i . k_j, and so every weight,
            # depend on i - j; the features of the rotated key are what the state stores.
            offset = 0 if cache is None or cache[POSITION] is None else cache[POSITION]
            if cache is not None:
                cache[POSITION] = offset + T
            q = self.rope(q.swapaxes(1, 2), offset=offset).swapaxes(1, 2)
            k = self.rope(k.swapaxes(1, 2), offset=offset).swapaxes(1, 2)
        log_g = nn.log_sigmoid(self.gate_proj(x)) if self.gating else None
        if reset is not None:
            # A gate of zero (log_g = -inf) is the op's reset: the state before it is dropped.
            kept = mx.zeros((B, T, self.num_kv_heads), dtype=x.dtype) if log_g is None else log_g
            log_g = mx.where(reset[..., None], -mx.inf, kept)
        # logsigmoid gates are <= 0 by construction: no need to read them back.
        options = dict(deg=self.deg, scale=self.scale, normalize=self.normalize,
                       use_metal=self.use_metal, check_gates=False)

        state = None if cache is None or cache[STATE_S] is None else \
            RetentionState(cache[STATE_S], cache[STATE_Z])
        if cache is None:
            y = power_retention(q, k, v, log_g, method=self.method, chunk_size=self.chunk_size,
                                **options)
        elif T == 1:
            y, state = power_retention_step(q[:, 0], k[:, 0], v[:, 0],
                                            None if log_g is None else log_g[:, 0], state, **options)
            y = y[:, None]
        else:
            y, state = power_retention(q, k, v, log_g, method=self.method, chunk_size=self.chunk_size,
                                       initial_state=state, return_state=True, **options)
        if cache is not None:
            cache[STATE_S], cache[STATE_Z] = state

        if self.output_norm:
            y = mx.fast.rms_norm(y, self.norm_weight, self.norm_eps)
        return self.o_proj(y.reshape(B, T, self.num_heads * self.head_dim))
