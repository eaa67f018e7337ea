"""The one tolerance helper every test uses, the shared input builder, and a fresh Python
process for what must not share this one's state."""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

# fp32 rounding of sums of up to T products, relative to the output's norm.
FP32_TOLERANCE = 1e-5
# The state forms evaluate (q . k)^deg as a sum of D signed feature products, whose rounding
# error scales with |q|^deg |k|^deg rather than with (q . k)^deg: larger by d (d + 2) / 3 = 27
# on average at deg 4, d = 8 (E[(q.k)^4] = 3 |q|^4 |k|^4 / (d (d + 2))), and by more for
# nearly orthogonal pairs. A recurrent form or one-token chunks put all history in the state,
# so at deg 4 they get that factor of fp32's 1e-5; float64 shows the math itself is exact.
STATE_FORM_DEG4_TOLERANCE = 27 * FP32_TOLERANCE


def _as_float64(x):
    return np.asarray(x.astype(mx.float64) if isinstance(x, mx.array) else x, dtype=np.float64)


def relative_error(actual, expected, norm="fro") -> float:
    """Normwise relative error ||actual - expected|| / ||expected||.

    norm="fro" (the default, as in flash-linear-attention's tests): root-sum-square over every
    element. norm="max": largest absolute error over largest absolute expected value.
    """
    actual, expected = _as_float64(actual), _as_float64(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    assert np.isfinite(actual).all(), "result has NaN or inf"
    if norm == "fro":
        error, scale = np.linalg.norm(actual - expected), np.linalg.norm(expected)
    else:
        error, scale = np.abs(actual - expected).max(initial=0.0), np.abs(expected).max(initial=0.0)
    return error / scale if scale > 0 else error


def assert_close(name, actual, expected, tolerance, norm="fro"):
    error = relative_error(actual, expected, norm)
    assert error <= tolerance, f"{name}: relative error ({norm}) {error:.3e} > {tolerance:.1e}"


def make_inputs(*, B=2, T=16, Hq=4, H=2, d=8, e=8, gated=True, seed=0, dtype=mx.float32,
                decay_strength=0.2):
    """Random q, k, v ~ N(0, 1) and log_g uniform in [-decay_strength, 0] (None if not gated)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, Hq, d))
    k = rng.standard_normal((B, T, H, d))
    v = rng.standard_normal((B, T, H, e))
    log_g = -decay_strength * rng.random((B, T, H)) if gated else None
    arrays = [mx.array(x, dtype=dtype) for x in (q, k, v)]
    arrays.append(None if log_g is None else mx.array(log_g, dtype=dtype))
    return arrays


def run_python(code: str, timeout: float = 120, launcher: tuple = ()) -> str:
    """Run ``code`` in a fresh interpreter (started through ``launcher``, a command prefix, if
    given); return its standard output (it must succeed)."""
    result = subprocess.run([*launcher, sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def bound_by_file_permissions():
    """A ``preexec_fn`` under which a child process obeys file permissions even when the tests
    run as root: it drops the capabilities that let root read and write past them
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding set, which the exec then applies.
    None when there is nothing to drop (not root)."""
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
    return drop


def write(path: Path, content) -> Path:
    """Write ``content`` (text as UTF-8, or bytes) to ``path``, making its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path
