"""The caches a layer keeps between calls, in mlx-lm's cache protocol.

The class names and the layouts of ``state`` are mlx-lm's (``mlx_lm/models/cache.py``), on
purpose: mlx-lm saves a prompt cache as each cache's ``state`` under its class name and loads
it back as its own class of that name, so these caches and mlx-lm's must be interchangeable.
The layers use nothing but that protocol (slots of an ``ArraysCache``, ``update_and_fetch``
and ``offset`` of a ``KVCache``), so a cache mlx-lm loaded works in them as one made here.

- ``ArraysCache``: fixed slots of arrays, the power mixer's recurrent state (S, z, the short
  convolution's last inputs, the position): the same size at any context length.
- ``KVCache``: keys and values that grow with the context, the softmax mixer's.
- ``CacheList``: several caches for one layer (softmax attention with a convolution).
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten


class Cache:
    """What every cache answers besides its arrays (``state``, what ``mx.eval`` materialises
    and a prompt cache file stores, each subclass's own): whether it can drop its last
    tokens, its size and bytes, and how it is rebuilt from a state."""

    def is_trimmable(self) -> bool:
        return False

    def size(self) -> int:
        """Tokens held (0 for a cache whose size does not grow with them)."""
        return 0

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for _, array in tree_flatten(self.state) if isinstance(array, mx.array))

    def empty(self) -> bool:
        raise NotImplementedError

    @classmethod
    def from_state(cls, state):
        cache = cls.__new__(cls)
        cache.state = state
        return cache


class ArraysCache(Cache):
    """``size`` slots, each an array or None; ``state`` is (slots, left_padding, lengths), the
    last two for mlx-lm's batched generation (None here)."""

    def __init__(self, size: int):
        self.cache = [None] * size
        self.left_padding = self.lengths = None

    def __getitem__(self, index):
        return self.cache[index]

    def __setitem__(self, index, value):
        self.cache[index] = value

    @property
    def state(self):
        return self.cache, self.left_padding, self.lengths

    @state.setter
    def state(self, value):
        self.cache, self.left_padding, self.lengths = value
        self.cache = list(self.cache)

    def empty(self) -> bool:
        return self.cache[0] is None


class KVCache(Cache):
    """Keys and values (B, H, offset, head_dim), grown ``step`` positions at a time so that
    decoding does not copy the whole cache at every token."""

    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys, values):
        """Append (B, H, T, head_dim) keys and values; return every key and value so far."""
        B, H, T, hd = keys.shape
        start = self.offset
        if self.keys is None or start + T > self.keys.shape[2]:
            capacity = -(-(start + T) // self.step) * self.step
            grown = [mx.zeros((B, H, capacity, array.shape[-1]), dtype=array.dtype)
                     for array in (keys, values)]
            if self.keys is not None:
                grown[0][:, :, :start] = self.keys[:, :, :start]
                grown[1][:, :, :start] = self.values[:, :, :start]
            self.keys, self.values = grown
        self.keys[:, :, start:start + T] = keys
        self.values[:, :, start:start + T] = values
        self.offset = start + T
        return self.keys[:, :, :self.offset], self.values[:, :, :self.offset]

    def size(self) -> int:
        return self.offset

    @property
    def state(self):
        """(keys, values, offset): the whole buffers, of which the first offset positions hold
        tokens (mlx-lm's layout at the versions this project supports)."""
        return self.keys, self.values, self.offset

    @state.setter
    def state(self, value):
        self.keys, self.values, self.offset = value

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens (at most all of them); return how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def empty(self) -> bool:
        return self.keys is None


class CacheList(Cache):
    """Several caches of one layer; ``cache[i]`` is the i-th."""

    def __init__(self, *caches):
        self.caches = caches

    def __getitem__(self, index):
        return self.caches[index]

    @property
    def state(self):
        return [(cache.state, type(cache).__name__) for cache in self.caches]

    @state.setter
    def state(self, value):
        self.caches = tuple(CACHES[name].from_state(state) for state, name in value)

    def is_trimmable(self) -> bool:
        return all(cache.is_trimmable() for cache in self.caches)

    def trim(self, n: int) -> int:
        return [cache.trim(n) for cache in self.caches][-1]

    def empty(self) -> bool:
        return self.caches[0].empty()


CACHES = {cls.__name__: cls for cls in (ArraysCache, KVCache, CacheList)}
