"""Multi-query associative recall (MQAR), the recall benchmark of Zoology (Arora et al. 2023).

A sequence opens with ``num_pairs`` key-value pairs, k1 v1 k2 v2 ..., then every key is asked
again once, later, among noise tokens; at each such query the model must predict the key's
value. Only those positions count (loss and accuracy); everything else is a random token.

    task = MQAR(vocab_size=256, seq_len=64, num_pairs=8)
    inputs, targets, mask = task.batch(batch_size=64, step=0)     # fresh data at every step
    test = task.test_set(1000)                                     # a fixed held-out set

As in Zoology, keys come from the lower half of the vocabulary and values from the upper half,
each distinct within a sequence; queries sit at even offsets after the pairs, at gaps drawn
without replacement from a power law p(gap) ~ (gap + 1)^(a - 1) with a = 0.01 (short gaps are
likelier, long ones still appear; ``gaps="uniform"`` draws them uniformly); noise tokens are
drawn from the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from power_retention.validation import check_integer

GAP_DISTRIBUTIONS = ("power", "uniform")
POWER_LAW_A = 0.01
_TEST_STREAM = 1 << 40  # seeds the held-out set apart from every training step


@dataclass(frozen=True)
class MQAR:
    vocab_size: int
    seq_len: int
    num_pairs: int
    gaps: str = "power"
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "num_pairs"):
            check_integer(f"MQAR {name}", getattr(self, name))
        check_integer("MQAR seed", self.seed, minimum=0)
        if self.gaps not in GAP_DISTRIBUTIONS:
            raise ValueError(f"MQAR gaps must be one of {GAP_DISTRIBUTIONS}, got {self.gaps!r}")
        if 4 * self.num_pairs > self.seq_len:
            raise ValueError(f"MQAR needs seq_len >= 4 * num_pairs (the pairs, then room for "
                             f"each query at its own even offset); got seq_len={self.seq_len}, "
                             f"num_pairs={self.num_pairs}")
        if self.vocab_size // 2 - 1 < self.num_pairs:
            raise ValueError(f"MQAR vocab_size={self.vocab_size} has too few keys for "
                             f"num_pairs={self.num_pairs} distinct ones (keys are 1 .. vocab/2 - 1)")

    @property
    def name(self) -> str:
        return f"mqar-N{self.num_pairs}-T{self.seq_len}-V{self.vocab_size}"

    def batch(self, batch_size: int, step: int):
        """The training batch of ``step``: the same for the same (seed, step), new at each step."""
        return self._sample(np.random.default_rng((self.seed, step)), batch_size)

    def test_set(self, size: int):
        """A fixed held-out set, drawn from a stream no training step uses."""
        return self._sample(np.random.default_rng((self.seed, _TEST_STREAM)), size)

    def _sample(self, rng: np.random.Generator, size: int):
        """inputs and targets (size, seq_len) int32, mask (size, seq_len) float32: 1 at the
        queries, where targets[i] is the value of the key inputs[i]."""
        check_integer("batch size", size)
        V, T, N = self.vocab_size, self.seq_len, self.num_pairs
        half = V // 2
        # Distinct keys in [1, half) and distinct values in [half, V), per sequence.
        keys = 1 + np.argsort(rng.random((size, half - 1)), axis=1)[:, :N]
        values = half + np.argsort(rng.random((size, V - half)), axis=1)[:, :N]

        inputs = rng.integers(0, V, (size, T))
        inputs[:, 0:2 * N:2] = keys
        inputs[:, 1:2 * N:2] = values
        # N distinct gaps per sequence: top-N of log p + Gumbel noise samples without
        # replacement in proportion to p.
        slots = (T - 2 * N) // 2
        gap = np.arange(slots)
        log_p = (POWER_LAW_A - 1) * np.log(gap + 1.0) if self.gaps == "power" else np.zeros(slots)
        scores = log_p - np.log(-np.log(rng.random((size, slots))))
        gaps = np.argsort(-scores, axis=1)[:, :N]
        positions = 2 * N + 2 * gaps
        rows = np.arange(size)[:, None]
        inputs[rows, positions] = keys

        targets = np.zeros((size, T), dtype=np.int64)
        mask = np.zeros((size, T), dtype=np.float32)
        targets[rows, positions] = values
        mask[rows, positions] = 1.0
        return inputs.astype(np.int32), targets.astype(np.int32), mask
