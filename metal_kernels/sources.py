"""The kernel sources: bodies in the form ``mx.fast.metal_kernel`` takes (kernels/*.metal)
and the helper headers they use (kernels/*.h). Read once; shared by the Metal dispatch and
by the emulator that tests the kernels on Linux."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

KERNELS = Path(__file__).resolve().parent / "kernels"


@lru_cache(maxsize=None)
def kernel_body(name: str) -> str:
    path = KERNELS / f"{name}.metal"
    if not path.is_file():
        known = sorted(p.stem for p in KERNELS.glob("*.metal"))
        raise ValueError(f"no kernel named {name!r}; known: {', '.join(known)}")
    return path.read_text()


@lru_cache(maxsize=None)
def header(*names: str) -> str:
    return "\n".join((KERNELS / f"{name}.h").read_text() for name in names)
