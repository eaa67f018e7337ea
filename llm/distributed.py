"""Data-parallel training over MLX's own distributed layer (``mx.distributed``).

Started by ``mlx.launch`` (ring over TCP, MPI, or Apple's Thunderbolt backend), the same
``train.py`` runs as one process per rank:

    mlx.launch -n 2 --backend ring --python "$(which python)" train.py --model tiny ...

Every rank holds the whole model and reads the same global batch in the same seeded order,
then keeps its own rows of it (``shard``): rank r of W takes rows r, r + W, r + 2W, ... of
every micro-batch of W*b rows. Gradients and token counts are summed across ranks before the
update (``sum``), so a step sees the gradient of the whole global batch, as one process
would; every decision that follows (skip a non-finite step, roll back, stop early) is then
the same on every rank. Only rank 0 prints and writes. Started without ``mlx.launch``, the
group has one process and everything here is the identity.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

# What the ring backend raises on the surviving ranks when another rank's process is gone.
LOST_PEER_MARKERS = ("connection to a peer was lost", "closed by the peer", "failing pending tasks")


class World:
    """This process's place in the group training one model: ``World()`` alone, or
    ``World.join()`` the group ``mlx.launch`` started (alone again when it started none)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1

    @classmethod
    def join(cls) -> "World":
        return cls(mx.distributed.init() if mx.distributed.is_available() else None)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs and writes checkpoints."""
        return self.rank == 0

    def shard(self, batch: tuple) -> tuple:
        """This rank's rows of every array of a global batch: every size-th row from its
        rank on, so that a batch of any size is covered once (a last, smaller validation
        batch included)."""
        if self.size == 1:
            return batch
        return tuple(array[self.rank::self.size] for array in batch)

    def sum(self, tree):
        """Every array of ``tree`` summed over the ranks (a gradient, a loss, a count)."""
        if self.size == 1:
            return tree
        return tree_map(lambda x: mx.distributed.all_sum(x, group=self.group), tree)

    def sum_gradients(self, grads):
        """Gradients summed over the ranks, in large buffers (mlx's average_gradients)."""
        if self.size == 1:
            return grads
        return tree_map(lambda g: g * self.size, nn.utils.average_gradients(grads, group=self.group))

    def agree(self, failed: bool) -> bool:
        """Whether any rank ``failed``: every rank learns it before the next collective, so
        that none waits for a rank that will not come."""
        if self.size == 1:
            return failed
        return self.sum(mx.array([1.0 if failed else 0.0])).item() > 0


def is_lost_peer(error: BaseException) -> bool:
    return any(marker in str(error).lower() for marker in LOST_PEER_MARKERS)
