"""Several adapters over one base (llm.route): switching gives each adapter's own model without
touching the base, rules and the nearest-centroid classifier choose as they should, and the
command answers with the adapter it chose and why."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map

from llm import ByteTokenizer, RetentionLLM, create_model_config, load
from llm.adapters import add_adapters, load_adapters, save_adapters
from llm.route import AdapterSet, Router

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["abc", "kite", "moon", "tree", "wolf", "glass", "rain", "stone", "river", "cloud"]


def make_adapter(base: Path, directory: Path, seed: int, rank: int, layers: int) -> Path:
    """Adapters with random (non-zero) tensors, so that each changes the model its own way."""
    model, _ = load(base)
    config = add_adapters(model, "lora", rank=rank, layers=layers)
    mx.random.seed(seed)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    save_adapters(model, directory, config)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("route")
    mx.random.seed(0)
    RetentionLLM(create_model_config("ultra-tiny", vocab_size=ByteTokenizer().vocab_size)) \
        .save_pretrained(directory / "base", ByteTokenizer())
    # Different ranks and depths: switching between them rebuilds the adapter layers.
    return {"base": directory / "base",
            "reverse": make_adapter(directory / "base", directory / "reverse", 1, rank=4, layers=3),
            "spell": make_adapter(directory / "base", directory / "spell", 2, rank=2, layers=1)}


def logits(model, text="reverse moon ="):
    return model(mx.array([ByteTokenizer().encode(text, add_bos=True)]))


def test_switching_adapters_gives_each_ones_model_and_never_touches_the_base(setup):
    adapter_set = AdapterSet(setup["base"], {"reverse": setup["reverse"], "spell": setup["spell"]})
    base_model, _ = load(setup["base"])
    expected = {None: logits(base_model)}
    for name in ("reverse", "spell"):
        model, _ = load(setup["base"])
        load_adapters(model, setup[name])
        expected[name] = logits(model)
    assert not mx.array_equal(expected["reverse"], expected["spell"]).item()

    adapter_set.use(None)
    base_arrays = {name: array for name, array in tree_flatten(adapter_set.model.parameters())}
    for name in ("reverse", "spell", "reverse", None, "spell", None):
        adapter_set.use(name)
        assert adapter_set.active == name
        assert mx.array_equal(logits(adapter_set.model), expected[name]).item(), name
    # Back to the base alone: the very same arrays (nothing reloaded, nothing copied).
    assert all(array is base_arrays[name] for name, array in tree_flatten(adapter_set.model.parameters()))

    memory = adapter_set.memory()
    assert set(memory["adapters"]) == {"reverse", "spell"}
    assert memory["total"] == memory["base"] + sum(memory["adapters"].values())
    assert memory["total"] < memory["separate_models"]


def test_rules_choose_by_keyword_then_regex_then_default(setup):
    adapter_set = AdapterSet(setup["base"], {"reverse": setup["reverse"], "spell": setup["spell"]})
    router = Router(adapter_set, [{"adapter": "reverse", "keywords": ["Reverse", "backwards"]},
                                  {"adapter": "spell", "regex": r"^spell\b"}], default="spell")
    assert router.route("please REVERSE this") == router.route("reverse it")
    assert router.route("write it backwards").reason == "rule 1: keyword 'backwards'"
    chosen = router.route("spell moon =")
    assert (chosen.adapter, chosen.reason) == ("spell", r"rule 2: regex '^spell\\b'")
    fallback = router.route("what is the time")
    assert fallback.adapter == "spell" and "the default" in fallback.reason
    assert Router(adapter_set).route("anything").adapter is None  # no default: the base alone


def test_nearest_centroid_routes_held_out_prompts(setup):
    adapter_set = AdapterSet(setup["base"], {"reverse": setup["reverse"], "spell": setup["spell"]})
    router = Router(adapter_set)
    router.fit_centroids({"reverse": [f"reverse {w} =" for w in WORDS[:6]],
                          "spell": [f"spell {w} =" for w in WORDS[:6]]})
    for word in WORDS[6:]:
        for task in ("reverse", "spell"):
            chosen = router.route(f"{task} {word} =")
            assert chosen.adapter == task and chosen.reason.startswith("nearest centroid (cosine"), chosen
    strict = Router(adapter_set, default="reverse", min_similarity=1.01)  # nothing is that near
    strict.centroids, strict.center = router.centroids, router.center
    assert strict.route("spell rain =").adapter == "reverse"


def test_route_command_answers_and_says_why(setup, tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [{"adapter": "reverse", "keywords": ["reverse"]}],
                                 "default": "spell"}))
    result = subprocess.run(
        [sys.executable, "-m", "llm.route", "--base", str(setup["base"]),
         "--adapter", f"reverse={setup['reverse']}", "--adapter", f"spell={setup['spell']}",
         "--rules", str(rules), "--prompt", "reverse moon =", "--prompt", "spell moon =",
         "--max-new-tokens", "4"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "MB in all, against" in lines[0]
    assert lines[1].startswith("[reverse: rule 1: keyword 'reverse'] reverse moon =")
    assert lines[2].startswith("[spell: no rule matched: the default] spell moon =")
