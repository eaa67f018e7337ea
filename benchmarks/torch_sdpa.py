"""PyTorch's causal SDPA, run on request from another process (bench_retention.py's `torch`
rows), in a process of its own with the environment a PyTorch user has.

Not in the benchmark's own process: there OpenBLAS is preloaded with its threads, PyTorch's
BLAS calls then resolve to it, and its CPU flash kernel calls the threaded OpenBLAS from each
of its own threads: at T=8192 (4 heads of 64) its forward took 2.6 s there against 0.17 s in
a process of its own, on a 2-core Xeon.

Protocol, one line each way: "case B T H d" makes random q, k, v (B, H, T, d) and answers the
device; "forward" or "forward_backward" runs once and answers "done"; end of input ends it.
"""

from __future__ import annotations

import os
import sys

import torch


def main() -> None:
    if torch.backends.mps.is_available():
        device = torch.device("mps")
        finish = torch.mps.synchronize
    else:
        device = torch.device("cpu")
        torch.set_num_threads(os.cpu_count() or 1)
        finish = lambda: None  # noqa: E731
    attend = torch.nn.functional.scaled_dot_product_attention
    q = k = v = None
    for line in sys.stdin:
        command, *sizes = line.split()
        if command == "case":
            B, T, H, d = map(int, sizes)
            q, k, v = (torch.randn(B, H, T, d, device=device, requires_grad=True) for _ in range(3))
            answer = f"{device.type} torch {torch.__version__}"
        elif command == "forward":
            with torch.no_grad():
                attend(q, k, v, is_causal=True)
            finish()
            answer = "done"
        elif command == "forward_backward":
            attend(q, k, v, is_causal=True).sum().backward()
            finish()
            answer = "done"
        else:
            raise SystemExit(f"torch_sdpa: unknown command {command!r}")
        print(answer, flush=True)


if __name__ == "__main__":
    main()
