"""Weights on disk: bit-exact round trips (single file and shards) and clear errors."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from llm import ByteTokenizer, RetentionLLM, create_model_config, load
from llm.weights import WEIGHTS_FILE


@pytest.fixture
def model():
    mx.random.seed(0)
    return RetentionLLM(create_model_config("ultra-tiny", vocab_size=258))


def flat(model):
    return dict(tree_flatten(model.parameters()))


def assert_same_weights(a, b):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(np.array(a[name]), np.array(b[name])), name


def test_round_trip_is_bit_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "run", tokenizer=ByteTokenizer())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == \
        ["checksums.json", "config.json", "model.safetensors", "retention_llm.py", "tokenizer.json",
         "tokenizer_config.json"]
    loaded, tokenizer = load(tmp_path / "run")
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    assert tokenizer.encode("héllo") == ByteTokenizer().encode("héllo")
    tokens = mx.array([[1, 2, 3, 4]])
    assert np.array_equal(np.array(loaded(tokens)), np.array(model(tokens)))


def test_sharded_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "run", max_shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "run" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(flat(model))
    assert_same_weights(RetentionLLM.from_pretrained(tmp_path / "run"), model)


def test_load_weights_from_file_and_directory(model, tmp_path):
    model.save_pretrained(tmp_path / "run")
    for source in (tmp_path / "run" / WEIGHTS_FILE, tmp_path / "run", str(tmp_path / "run")):
        fresh = RetentionLLM(model.config)
        fresh.load_weights(source)
        assert_same_weights(fresh, model)


def test_saving_again_replaces_the_directory(model, tmp_path):
    model.save_pretrained(tmp_path / "run", max_shard_bytes=100_000)
    model.save_pretrained(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary leftovers
    assert not list((tmp_path / "run").glob("model-*"))
    assert_same_weights(RetentionLLM.from_pretrained(tmp_path / "run"), model)


def written_elsewhere(directory):
    """Drop the checksums: as a directory another tool wrote (or an edited one) has none, so
    the loader's own checks of each file are what stands between it and a wrong model."""
    (directory / "checksums.json").unlink()


def test_a_save_killed_between_its_renames_is_recovered(model, tmp_path):
    """The state a kill between replace_directory's two renames leaves: the target missing,
    the previous version parked beside it, a complete new version still temporary. Loading
    puts the previous version back and removes the leftovers."""
    from llm.atomic import recover_directory

    model.save_pretrained(tmp_path / "run")
    parked = tmp_path / ".run.old-abc123"
    parked.mkdir()
    (tmp_path / "run").rename(parked / "replaced")
    (tmp_path / ".run.tmp-def456").mkdir()
    assert not (tmp_path / "run").exists()
    loaded = RetentionLLM.from_pretrained(tmp_path / "run")
    assert_same_weights(loaded, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    recover_directory(tmp_path / "run")  # nothing to do: harmless
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_saved_files_are_not_private(model, tmp_path):
    model.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run").stat().st_mode & 0o055 == 0o055 & ~_umask()


def _umask():
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("mixer", ["power", "softmax"])
def test_a_config_saved_before_the_layer_options_loads_as_it_was(mixer, tmp_path):
    """config.json from before deg was renamed and the layer options existed: the model it
    describes (no convolution, the gate at 0.999, rotary embeddings only for softmax) loads."""
    old = RetentionLLM(create_model_config("ultra-tiny", mixer=mixer, conv_size=0, gate_init=0.999,
                                           output_norm=True, rope=mixer == "softmax"))
    old.save_pretrained(tmp_path / "run")
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    config["power"] = config.pop("deg")
    for name in ("gate_init", "conv_size", "output_norm", "rope"):
        del config[name]
    path.write_text(json.dumps(config))
    written_elsewhere(tmp_path / "run")  # older versions wrote no checksums
    loaded = RetentionLLM.from_pretrained(tmp_path / "run")
    assert loaded.config == old.config
    assert_same_weights(loaded, old)

