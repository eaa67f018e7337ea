"""Which kernels exist, where they run, and the arguments each call takes.

The kernels run on "metal" (built once, at import, on a machine with Metal), on the CPU
"emulator" (how Linux tests run the very same launches), or nowhere (None). This package
knows nothing of the op: ``power_retention.kernels`` decides when a call takes a kernel and
supplies the MLX path beside it.
"""

from __future__ import annotations

import mlx.core as mx

from . import emulator
from .sources import header, kernel_body

BACKENDS = ("metal", "emulator")
# name: (input names, output names, helper headers)
KERNELS = {
    "decode_step": (("q", "k", "v", "decay", "S", "z"),
                    ("S_out", "z_out", "numerator", "denominator"), ("sympow",)),
    "chunk_states": (("k", "v1"), ("S1",), ("sympow",)),
    "query_states": (("q", "S1"), ("out",), ("sympow",)),
}
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# Threadgroup limits. Metal allows up to 1024 threads only to kernels light enough on
# registers, and MLX raises (it does not fall back) above a pipeline's own limit: 256 is a
# cap every kernel here stays under. 32 KB of threadgroup memory is every Apple GPU's.
MAX_THREADS_PER_THREADGROUP = 256
MAX_THREADGROUP_BYTES = 32 * 1024
# Features per threadgroup: decode (its state tiles) and prefill (per pass); queries per
# prefill threadgroup.
DECODE_TILE = 128
FEATURE_TILE = 64
QUERY_ROWS = 16


def _build(factory, **options) -> dict:
    return {name: factory(name=name, input_names=list(inputs), output_names=list(outputs),
                          source=kernel_body(name), header=header(*headers), **options)
            for name, (inputs, outputs, headers) in KERNELS.items()}


_backend = "metal" if mx.metal.is_available() else None
_kernels = _build(mx.fast.metal_kernel) if _backend == "metal" else {}


def set_backend(name: str | None, **emulator_options) -> None:
    """Run the kernels on "metal", on the CPU "emulator" (slow; for tests: options are
    ``order`` and ``seed`` of ``emulator.run_kernel``), or not at all (None: the MLX path)."""
    global _backend, _kernels
    if name not in (*BACKENDS, None):
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    if name == "metal" and not mx.metal.is_available():
        raise ValueError("backend 'metal' needs a Mac with Metal; this machine has none")
    if emulator_options and name != "emulator":
        raise ValueError(f"options {sorted(emulator_options)} apply to the emulator only")
    kernels = {"metal": lambda: _build(mx.fast.metal_kernel),
               "emulator": lambda: _build(emulator.metal_kernel, **emulator_options),
               None: dict}[name]()
    _backend, _kernels = name, kernels


def backend() -> str | None:
    """Where the kernels run now: "metal", "emulator" or None (they do not: MLX path)."""
    return _backend


def kernel_dtype(*arrays):
    """The one dtype the kernels read the arrays in, or None if they cannot."""
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    return dtype if dtype in KERNEL_DTYPES else None


def decode_launch(q, k, v, log_g, S, z, *, deg: int) -> dict:
    """The decode kernel's call arguments (inputs, template, grid, threadgroup, outputs) for
    prepared inputs: q (B, Hq, d) float32, k (B, H, d) and v (B, H, e) in one kernel dtype,
    log_g (B, H), S (B, H, D, e) and z (B, H, D) float32."""
    B, Hq, d = q.shape
    H, e = k.shape[1], v.shape[-1]
    D = S.shape[2]
    tiles = -(-D // DECODE_TILE)
    return dict(
        inputs=[q, k, v, mx.exp(log_g), S, z],
        template=[("T", k.dtype), ("DEG", deg), ("DIM", d), ("E", e), ("G", Hq // H),
                  ("FEATURES", D), ("TILE", DECODE_TILE)],
        grid=(B * H * e, tiles, 1), threadgroup=(e, 1, 1),
        output_shapes=[S.shape, z.shape, (tiles, B, Hq, e), (tiles, B, Hq)],
        output_dtypes=[mx.float32] * 4)


def chunk_states_launch(k, v1, *, deg: int, features: int) -> dict:
    """Call arguments of the chunk_states kernel: k (N, c, d), v1 (N, c, e + 1) float32, and
    the number of symmetric power features D of a key."""
    N, C, d = k.shape
    E1, D = v1.shape[-1], features
    tile = max(1, min(FEATURE_TILE, MAX_THREADGROUP_BYTES // (4 * C)))
    return dict(inputs=[k, v1],
                template=[("DEG", deg), ("DIM", d), ("C", C), ("E1", E1), ("FEATURES", D),
                          ("TILE", tile)],
                grid=(N * E1, -(-D // tile), 1), threadgroup=(E1, 1, 1),
                output_shapes=[(N, D, E1)], output_dtypes=[mx.float32])


def query_states_launch(q, S1, *, deg: int) -> dict:
    """Call arguments of the query_states kernel: q (N * G, c, d), S1 (N, D, e + 1) float32."""
    NG, C, d = q.shape
    N, D, E1 = S1.shape
    rows = min(QUERY_ROWS, C)
    return dict(inputs=[q, S1],
                template=[("DEG", deg), ("DIM", d), ("C", C), ("E1", E1), ("FEATURES", D),
                          ("TILE", FEATURE_TILE), ("ROWS", rows), ("G", NG // N)],
                grid=(NG * E1, -(-C // rows), 1), threadgroup=(E1, 1, 1),
                output_shapes=[(NG, C, E1)], output_dtypes=[mx.float32])


def run(name: str, launch: dict) -> list:
    """The outputs of kernel ``name`` called with ``launch`` (from its ``*_launch`` function)."""
    if _backend is None:
        raise ValueError(f"kernel {name!r}: the kernels are switched off (set_backend)")
    return _kernels[name](**launch)
