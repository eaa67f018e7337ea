"""Power retention (symmetric power attention) in MLX.

    from power_retention import power_retention, PowerRetention
    y = power_retention(q, k, v, log_g, deg=2)          # the op: (B, T, Hq, e)
    layer = PowerRetention(dim=256)                     # the layer: (B, T, 256) -> (B, T, 256)

See SPEC.md for the math and README.md for the forms and their costs.
"""

from .cpu_backend import keep_freed_memory, release_freed_memory
from .layer import PowerRetention, RetentionCache
from .ops import choose_method, estimated_seconds, power_retention, power_retention_step
from .state import RetentionState
from .sympow import expanded_dim, sympow

keep_freed_memory()

__all__ = [
    "PowerRetention",
    "RetentionCache",
    "RetentionState",
    "choose_method",
    "estimated_seconds",
    "expanded_dim",
    "power_retention",
    "power_retention_step",
    "release_freed_memory",
    "sympow",
]
