"""Power retention (symmetric power attention) in MLX.

    from power_retention import power_retention, PowerRetention
    y = power_retention(q, k, v, log_g, deg=2)          # the op: (B, T, Hq, e)
    layer = PowerRetention(dim=256)                     # the layer: (B, T, 256) -> (B, T, 256)

The math is in power_retention/README.md. Importing this package changes nothing else in the
process: the Linux CPU tuning is opt-in (``power_retention.cpu_tuning``).
"""

from .cache import ArraysCache, CacheList, KVCache
from .cost import choose_method, estimated_seconds
from .layer import PowerRetention, RetentionCache
from .ops import power_retention, power_retention_step
from .state import RetentionState
from .sympow import expanded_dim, sympow

__all__ = [
    "ArraysCache",
    "CacheList",
    "KVCache",
    "PowerRetention",
    "RetentionCache",
    "RetentionState",
    "choose_method",
    "estimated_seconds",
    "expanded_dim",
    "power_retention",
    "power_retention_step",
    "sympow",
]
