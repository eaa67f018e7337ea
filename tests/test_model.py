"""RetentionLLM: presets and parameter counts, caches against the full forward, generation."""


import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from llm import (PRESETS, ByteTokenizer, ModelConfig, RetentionLLM, create_model_config, generate,
                 make_sampler, param_count, stream_generate)
from tests.helpers import assert_close, run_python

MIXERS = ["power", "softmax"]
# Logits after three blocks, prefill + decode against one forward: the bound for fp32.
# The forms differ by fp32 rounding (~1e-6 relative, see FP32_TOLERANCE) amplified through
# the blocks and the output head.
DECODE_TOLERANCE = 2e-3


def small_model(mixer, **overrides):
    """ultra-tiny with short chunks, so that short sequences cross chunk boundaries."""
    mx.random.seed(0)
    config = create_model_config("ultra-tiny", mixer=mixer, chunk_size=8, **overrides)
    return RetentionLLM(config)


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("name", ["ultra-tiny", "tiny", "small"])
def test_param_count_equals_real_count(name, mixer):
    config = create_model_config(name, mixer=mixer)
    model = RetentionLLM(config)  # MLX is lazy: the weights are never materialised here
    assert param_count(config) == sum(p.size for _, p in tree_flatten(model.parameters()))


def test_preset_sizes():
    counts = {name: param_count(create_model_config(name)) for name in PRESETS}
    assert abs(counts["tiny"] / 17.2e6 - 1) < 0.03
    assert abs(counts["small"] / 125e6 - 1) < 0.03
    assert abs(counts["medium"] / 355e6 - 1) < 0.03
    assert abs(counts["7b"] / 7e9 - 1) < 0.03
    for name in PRESETS:
        assert create_model_config(name).head_dim <= 64, name
    ultra = create_model_config("ultra-tiny")
    assert (ultra.hidden_size, ultra.num_hidden_layers, ultra.vocab_size,
            ultra.max_position_embeddings, ultra.intermediate_size, ultra.chunk_size) == \
        (64, 3, 1000, 128, 128, 32)


def test_7b_table_needs_no_7b_of_memory():
    """The 7b row of the README table, in a fresh process: its peak resident size stays far
    below the 28 GB the fp32 weights alone would take."""
    code = ("import resource\n"
            "from llm.memory import preset_table\n"
            "table = preset_table()\n"
            "assert '| 7b |' in table\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    peak_kb = int(run_python(code).strip().splitlines()[-1])
    assert peak_kb < 1_000_000, f"computing the table took {peak_kb / 1e6:.1f} GB"


def test_both_constructor_forms():
    config = create_model_config("ultra-tiny")
    by_fields = RetentionLLM(**config, use_metal=False)
    assert isinstance(by_fields.config, ModelConfig) and by_fields.config == config
    assert RetentionLLM(config).config == config
    overridden = create_model_config("ultra-tiny", hidden_size=128)
    assert (overridden.head_dim, overridden.num_attention_heads) == (64, 2)


@pytest.mark.parametrize("mixer", MIXERS)
def test_logits_shape_and_initial_loss(mixer):
    model = small_model(mixer)
    tokens = mx.random.randint(0, 1000, (2, 20))
    logits = model(tokens)
    assert logits.shape == (2, 20, 1000) and logits.dtype == mx.float32
    # Small initial weights: the prediction starts close to uniform (loss ~ ln 1000 = 6.91).
    loss = nn.losses.cross_entropy(logits[:, :-1], tokens[:, 1:], reduction="mean")
    assert abs(loss.item() - np.log(1000)) < 0.05


@pytest.mark.parametrize("prefill", [1, 8, 13], ids=lambda n: f"prefill{n}")
@pytest.mark.parametrize("mixer,options", [
    ("power", {}), ("power", {"conv_size": 0}), ("power", {"rope": True}),
    ("softmax", {}), ("softmax", {"conv_size": 3})],
    ids=["power", "power-conv0", "power-rope", "softmax", "softmax-conv3"])
def test_prefill_and_decode_equal_full_forward(mixer, options, prefill):
    """Batch 2, chunks of 8: a prefill of `prefill` tokens and token-by-token decoding to 30
    give the logits of one forward pass over all 30 (the convolution's last inputs carried
    in the cache across calls)."""
    model = small_model(mixer, **options)
    tokens = mx.random.randint(0, 1000, (2, 30))
    whole = model(tokens)
    cache = model.make_cache()
    pieces = [model(tokens[:, :prefill], cache=cache)]
    pieces += [model(tokens[:, t:t + 1], cache=cache) for t in range(prefill, 30)]
    assert_close("logits", mx.concatenate(pieces, axis=1), whole, DECODE_TOLERANCE)


@pytest.mark.parametrize("method", ["attention", "chunked", "recurrent", "softmax"])
def test_packed_documents_with_resets_equal_documents_run_apart(method):
    """Two sequences of three packed documents each, the boundaries at different places, the
    convolution on: logits with ``reset`` at the document starts equal each document's own
    logits, in one forward pass and through a cache fed in pieces that cut documents."""
    model = small_model("softmax" if method == "softmax" else "power", conv_size=4)
    if method != "softmax":
        model.set_retention_form(method)
    lengths = [[7, 12, 11], [1, 20, 9]]
    tokens = mx.random.randint(0, 1000, (2, 30))
    reset = mx.array([[t in np.cumsum(row[:-1]) for t in range(30)] for row in lengths])
    apart = mx.stack([mx.concatenate([model(tokens[b:b + 1, start:start + n])[0]
                                      for start, n in zip(np.cumsum([0] + row[:-1]), row)])
                      for b, row in enumerate(lengths)])
    assert_close("packed", model(tokens, reset=reset), apart, DECODE_TOLERANCE)
    cache = model.make_cache()
    pieces = [model(tokens[:, a:b], cache=cache, reset=reset[:, a:b])
              for a, b in [(0, 9), (9, 10), (10, 25), *((t, t + 1) for t in range(25, 30))]]
    assert_close("packed, in pieces", mx.concatenate(pieces, axis=1), apart, DECODE_TOLERANCE)


@pytest.mark.parametrize("mixer", MIXERS)
def test_a_document_start_id_resets_every_mixer_where_it_appears(mixer):
    model = small_model(mixer, document_start_id=1)
    tokens = mx.random.randint(2, 1000, (1, 20))
    tokens[0, 6] = 1
    assert mx.array_equal(model(tokens), model(tokens, reset=tokens == 1)).item()
    assert_close("second document", model(tokens)[:, 6:], model(tokens[:, 6:]), DECODE_TOLERANCE)


def test_power_cache_is_constant_size_and_kv_cache_grows():
    power, softmax = small_model("power"), small_model("softmax")
    sizes = {}
    for name, model in (("power", power), ("softmax", softmax)):
        cache = model.make_cache()
        model(mx.zeros((1, 10), dtype=mx.int32), cache=cache)
        small = sum(c.nbytes for c in cache)
        model(mx.zeros((1, 590), dtype=mx.int32), cache=cache)
        sizes[name] = (small, sum(c.nbytes for c in cache))
    assert sizes["power"][0] == sizes["power"][1] > 0
    # The KV cache holds its buffers, grown 256 positions at a time: 256, then 768.
    assert sizes["softmax"][1] == 3 * sizes["softmax"][0]


@pytest.mark.parametrize("mixer", MIXERS)
def test_greedy_generation_is_deterministic_and_argmax(mixer):
    model = small_model(mixer)
    prompt = mx.array([5, 17, 256, 3, 999, 42, 7, 7, 1])
    first = model.generate(prompt, max_new_tokens=12, temperature=0)
    model.reset_states()
    second = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert first.shape == (12,) and np.array_equal(np.array(first), np.array(second))
    # Teacher forcing: every generated token is the argmax after the tokens before it.
    sequence = mx.concatenate([prompt, first])
    logits = model(sequence[None, :-1])[0, len(prompt) - 1:]
    assert np.array_equal(np.array(mx.argmax(logits, axis=-1)), np.array(first))


@pytest.mark.parametrize("mixer", MIXERS)
def test_stateful_generate_continues_until_reset(mixer):
    model = small_model(mixer)
    part1, part2 = mx.array([[1, 2, 3, 4]] * 2), mx.array([[9, 8]] * 2)
    new1 = model.generate(part1, max_new_tokens=5, temperature=0)
    new2 = model.generate(part2, max_new_tokens=5, temperature=0)
    assert new1.shape == new2.shape == (2, 5)
    model.reset_states()
    at_once = model.generate(mx.concatenate([part1, new1, part2], axis=1), max_new_tokens=5,
                             temperature=0)
    assert np.array_equal(np.array(at_once), np.array(new2))


def test_seeded_sampling_is_reproducible():
    model = small_model("power")
    prompt = mx.array([1, 2, 3])
    draws = []
    for seed in (3, 3, 4):
        model.reset_states()
        draws.append(np.array(model.generate(prompt, max_new_tokens=16, temperature=1.0, seed=seed)))
    assert np.array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])


def test_sampler_filters():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    key = mx.random.key(0)
    keys = mx.random.split(key, 400)
    top1 = make_sampler(temperature=1.0, top_k=1)
    assert all(top1(logits, k).item() == 0 for k in keys[:50])
    nucleus = make_sampler(temperature=1.0, top_p=0.7)  # keeps {0.5, 0.3}
    seen = {nucleus(logits, k).item() for k in keys}
    assert seen == {0, 1}
    top3 = make_sampler(temperature=1.0, top_k=3)
    assert {top3(logits, k).item() for k in keys} == {0, 1, 2}


def test_stream_generate_matches_generate():
    model = small_model("power", vocab_size=ByteTokenizer().vocab_size)
    tokenizer = ByteTokenizer()
    text = generate(model, tokenizer, "Hello, world", max_new_tokens=20, temperature=0)
    responses = list(stream_generate(model, tokenizer, "Hello, world", max_new_tokens=20,
                                     temperature=0))
    assert "".join(r.text for r in responses) == text
    last = responses[-1]
    assert last.finish_reason in ("length", "stop")
    assert last.prompt_tokens == len(tokenizer.encode("Hello, world", add_bos=True))
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert 1 <= last.generation_tokens <= 20


def test_stateful_generate_with_no_new_tokens_feeds_everything_once():
    model = small_model("power", rope=True)
    model.generate(mx.array([1, 2, 3]), max_new_tokens=3, temperature=0)   # 3 fed, 1 pending
    model.generate(mx.array([5, 6]), max_new_tokens=0, temperature=0)      # pending + 2 fed
    model.generate(mx.array([7, 8]), max_new_tokens=1, temperature=0)      # 2 fed, 1 pending
    assert model._session.cache[0][3] == 3 + 3 + 2 + 2  # the position slot
