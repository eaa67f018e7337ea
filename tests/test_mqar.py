"""The MQAR generator: Zoology's layout, reproducible streams, and clear errors."""

import numpy as np
import pytest

from llm.mqar import MQAR


@pytest.mark.parametrize("pairs,seq_len,gaps", [(4, 32, "power"), (8, 64, "uniform"), (16, 64, "power")],
                         ids=["N4-T32-power", "N8-T64-uniform", "N16-T64-power"])
def test_every_key_is_queried_once_for_its_value(pairs, seq_len, gaps):
    task = MQAR(vocab_size=256, seq_len=seq_len, num_pairs=pairs, gaps=gaps)
    inputs, targets, mask = task.batch(batch_size=50, step=3)
    assert inputs.shape == targets.shape == mask.shape == (50, seq_len)
    assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
    assert inputs.min() >= 0 and inputs.max() < 256
    for row, target, weight in zip(inputs, targets, mask):
        keys, values = row[0:2 * pairs:2], row[1:2 * pairs:2]
        assert len(set(keys)) == pairs and ((keys >= 1) & (keys < 128)).all()
        assert len(set(values)) == pairs and ((values >= 128) & (values < 256)).all()
        queried = np.flatnonzero(weight)
        assert len(queried) == pairs and (queried >= 2 * pairs).all() and (queried % 2 == 0).all()
        value_of = dict(zip(keys, values))
        assert sorted(row[queried]) == sorted(keys)
        assert all(target[i] == value_of[row[i]] for i in queried)
        assert (weight[:2 * pairs] == 0).all()


def test_streams_are_reproducible_and_fresh():
    task = MQAR(vocab_size=128, seq_len=32, num_pairs=4, seed=7)
    first, again = task.batch(16, step=1), task.batch(16, step=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], task.batch(16, step=2)[0])
    assert not np.array_equal(first[0], MQAR(128, 32, 4, seed=8).batch(16, step=1)[0])
    test = task.test_set(16)
    assert np.array_equal(test[0], task.test_set(16)[0])
    assert not any(np.array_equal(test[0], task.batch(16, step)[0]) for step in range(5))


def test_power_law_gaps_favour_short_distances():
    """Zoology's power law (a = 0.01, p(gap) ~ 1 / gap): queries sit closer to the pairs than
    uniform gaps put them, and still reach the far end of the sequence."""
    def query_offsets(gaps):
        _, _, mask = MQAR(256, 128, 4, gaps=gaps, seed=1).batch(2000, step=0)
        return np.nonzero(mask)[1] - 8

    power, uniform = query_offsets("power"), query_offsets("uniform")
    assert np.median(power) < 0.6 * np.median(uniform)
    assert power.max() >= 100


@pytest.mark.parametrize("kwargs,message", [
    (dict(vocab_size=256, seq_len=30, num_pairs=8), "seq_len >= 4 \\* num_pairs"),
    (dict(vocab_size=16, seq_len=64, num_pairs=8), "too few keys"),
    (dict(vocab_size=256, seq_len=64, num_pairs=0), "num_pairs must be an integer >= 1"),
    (dict(vocab_size=256, seq_len=64, num_pairs=4, gaps="normal"), "gaps must be one of"),
    (dict(vocab_size=256, seq_len=64, num_pairs=4, seed=-1), "seed must be an integer >= 0"),
], ids=["too-short", "small-vocab", "no-pairs", "bad-gaps", "negative-seed"])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MQAR(**kwargs)
