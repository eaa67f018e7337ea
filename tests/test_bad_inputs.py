"""Every bad input gets a ValueError that names the argument and what was expected."""

import mlx.core as mx
import pytest

from power_retention import RetentionState, expanded_dim, power_retention, power_retention_step
from tests.helpers import make_inputs

B, T, Hq, H, d, e = 2, 10, 4, 2, 8, 6
D = expanded_dim(d, 2)


def _good():
    q, k, v, log_g = make_inputs(B=B, T=T, Hq=Hq, H=H, d=d, e=e)
    return dict(q=q, k=k, v=v, log_g=log_g)


def _state(S_shape=(B, H, D, e), z_shape=(B, H, D), dtype=mx.float32):
    return RetentionState(mx.zeros(S_shape, dtype=dtype), mx.zeros(z_shape, dtype=dtype))


CASES = {
    "q-3d": (dict(q=mx.zeros((B, T, d))), {}, r"q must have shape \(B, T, Hq, d\)"),
    "k-batch": (dict(k=mx.zeros((B + 1, T, H, d))), {}, r"k must have shape .*B=2"),
    "k-length": (dict(k=mx.zeros((B, T + 1, H, d))), {}, r"k must have shape .*T=10"),
    "k-head-dim": (dict(k=mx.zeros((B, T, H, d + 1))), {}, r"k must have shape .*d=8"),
    "heads-not-multiple": (dict(k=mx.zeros((B, T, 3, d)), v=mx.zeros((B, T, 3, e))), {},
                           r"Hq=4 must be a multiple of .* H=3"),
    "v-heads": (dict(v=mx.zeros((B, T, H + 1, e))), {}, r"v must have shape \(B=2, T=10, H=2, e\)"),
    "v-length": (dict(v=mx.zeros((B, T - 1, H, e))), {}, r"v must have shape"),
    "log_g-shape": (dict(log_g=mx.zeros((B, T, Hq))), {}, r"log_g must have shape \(2, 10, 2\)"),
    "log_g-integer": (dict(log_g=mx.zeros((B, T, H), dtype=mx.int32)), {}, r"log_g must be"),
    "q-integer": (dict(q=mx.zeros((B, T, Hq, d), dtype=mx.int32)), {}, r"q must be floating point"),
    "v-bool": (dict(v=mx.zeros((B, T, H, e), dtype=mx.bool_)), {}, r"v must be floating point"),
    "k-numpy-list": (dict(k=[[1.0]]), {}, r"k must be an mlx.core.array"),
    "deg-zero": ({}, dict(deg=0), r"deg must be an integer >= 1"),
    "deg-float": ({}, dict(deg=2.0), r"deg must be an integer >= 1"),
    "deg-odd-normalized": ({}, dict(deg=3, normalize=True),
                           r"normalize=True needs an even deg.*normalize=False"),
    "deg1-normalized": ({}, dict(deg=1, normalize=True), r"use normalize=False"),
    "normalize-string": ({}, dict(normalize="yes"), r"normalize must be True, False or None"),
    "batch-zero": (dict(q=mx.zeros((0, T, Hq, d)), k=mx.zeros((0, T, H, d)), v=mx.zeros((0, T, H, e)),
                        log_g=mx.zeros((0, T, H))), {}, r"B >= 1.*got B=0"),
    "kv-heads-zero": (dict(k=mx.zeros((B, T, 0, d)), v=mx.zeros((B, T, 0, e)), log_g=mx.zeros((B, T, 0))),
                      {}, r"H >= 1 \(k, v\); got B=2, Hq=4, H=0"),
    "log_g-positive": (dict(log_g=mx.full((B, T, H), 0.01)), {}, r"log_g must be <= 0 .*0\.01"),
    "log_g-nan": (dict(log_g=mx.full((B, T, H), mx.nan)), {}, r"log_g must be <= 0 .*got NaN"),
    "chunk-size-zero": ({}, dict(chunk_size=0), r"chunk_size must be an integer >= 1"),
    "chunk-size-float": ({}, dict(chunk_size=16.0), r"chunk_size must be an integer >= 1"),
    "method-unknown": ({}, dict(method="flash"), r"method must be one of .*'chunked'"),
    "scale-negative": ({}, dict(scale=-1.0), r"scale must be a positive finite number"),
    "state-not-pair": ({}, dict(initial_state=mx.zeros((B, H, D, e))), r"initial_state must be a RetentionState"),
    "state-S-shape": ({}, dict(initial_state=_state(S_shape=(B, H, D + 1, e))),
                      r"initial_state.S must have shape \(2, 2, 36, 6\)"),
    "state-z-shape": ({}, dict(initial_state=_state(z_shape=(B, Hq, D))),
                      r"initial_state.z must have shape \(2, 2, 36\)"),
    "state-dtype": ({}, dict(initial_state=_state(dtype=mx.float16)),
                    r"initial_state.S must be mlx.core.float32"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_power_retention_rejects(case):
    overrides, options, message = CASES[case]
    arrays = {**_good(), **overrides}
    with pytest.raises(ValueError, match=message):
        power_retention(arrays["q"], arrays["k"], arrays["v"], arrays["log_g"], **options)


STEP_CASES = {
    "q-4d": (dict(q=mx.zeros((B, 1, Hq, d))), {}, r"q must have shape \(B, Hq, d\)"),
    "k-head-dim": (dict(k=mx.zeros((B, H, d + 1))), {}, r"k must have shape \(B, H, d\)"),
    "v-heads": (dict(v=mx.zeros((B, H + 1, e))), {}, r"v must have shape \(B=2, H=2, e\)"),
    "log_g-shape": (dict(log_g=mx.zeros((B, Hq))), {}, r"log_g must have shape \(2, 2\)"),
    "deg-odd-normalized": ({}, dict(deg=3, normalize=True), r"normalize=False"),
    "log_g-positive": (dict(log_g=mx.full((B, H), 0.5)), {}, r"log_g must be <= 0"),
    "state-S-shape": ({}, dict(state=_state(S_shape=(B, H, D, e + 1))), r"initial_state.S must have shape"),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_power_retention_step_rejects(case):
    overrides, options, message = STEP_CASES[case]
    arrays = {name: x[:, 0] for name, x in _good().items()}
    arrays.update(overrides)
    state = options.pop("state", None)
    with pytest.raises(ValueError, match=message):
        power_retention_step(arrays["q"], arrays["k"], arrays["v"], arrays["log_g"], state, **options)


def test_a_state_too_large_for_memory_is_refused_before_it_is_built():
    """deg 8 with heads of 64: D = C(71, 8) features, terabytes of state. The forms with a
    state are refused with the sizes and what fits; the attention form without a state runs."""
    q, k, v, log_g = make_inputs(B=1, T=4, Hq=1, H=1, d=64, e=4)
    for options in (dict(method="chunked"), dict(method="recurrent"), dict(return_state=True)):
        with pytest.raises(ValueError, match=r"deg=8 with heads of d=64 has D=10,639,125,640 "
                                             r"features .* GiB"):
            power_retention(q, k, v, log_g, deg=8, **options)
    with pytest.raises(ValueError, match=r"the attention form fits without a state"):
        power_retention(q, k, v, log_g, deg=8, method="chunked", return_state=True)
    assert mx.isfinite(power_retention(q, k, v, log_g, deg=8)).all().item()


# The model, generation and configs.

def _model():
    from llm import RetentionLLM, create_model_config
    return RetentionLLM(create_model_config("ultra-tiny", vocab_size=258))


def _stream(prompt):
    from llm import ByteTokenizer, stream_generate
    return list(stream_generate(_model(), ByteTokenizer(), prompt, 2))


MODEL_CASES = {
    "token-above-vocab": (lambda: _model()(mx.array([[1, 300]])),
                          r"tokens holds the token id 300, outside \[0, 258\)"),
    "token-far-above-vocab": (lambda: _model()(mx.array([[100000]])), r"token id 100000"),
    "token-negative": (lambda: _model()(mx.array([[-1, 3]])), r"token id -1"),
    "tokens-float": (lambda: _model()(mx.array([[1.0, 2.0]])), r"tokens must hold integer token ids"),
    "tokens-1d": (lambda: _model()(mx.array([1, 2])), r"tokens must be .* shape \(B, T\)"),
    "generate-prompt-above-vocab": (lambda: _model().generate([5, 258]), r"prompt holds the token id 258"),
    "generate-prompt-text": (lambda: _model().generate("hello"), r"prompt_tokens must be token ids"),
    "generate-prompt-bytes": (lambda: _model().generate(b"hello"), r"prompt_tokens must be token ids"),
    "generate-prompt-3d": (lambda: _model().generate([[[1]]]), r"prompt_tokens must have shape"),
    "stream-prompt-bytes": (lambda: _stream(b"hello"), r"prompt must be text .* got bytes"),
    "stream-prompt-ids-above-vocab": (lambda: _stream([1, 999]), r"prompt holds the token id 999"),
}


def _config(**fields):
    from llm import create_model_config
    return create_model_config("ultra-tiny", **fields)


CONFIG_CASES = {
    "heads-do-not-divide-width": (dict(hidden_size=64, num_attention_heads=3, num_key_value_heads=3),
                                  r"hidden_size=64 is not divisible by num_attention_heads=3"),
    "gating-string": (dict(gating="false"), r"ModelConfig.gating must be true or false, got 'false'"),
    "tie-embeddings-int": (dict(tie_word_embeddings=1), r"ModelConfig.tie_word_embeddings must be true"),
    "rope-theta-negative": (dict(rope_theta=-1.0), r"ModelConfig.rope_theta must be a positive finite"),
    "rms-norm-eps-zero": (dict(rms_norm_eps=0.0), r"ModelConfig.rms_norm_eps must be a positive finite"),
    "rms-norm-eps-nan": (dict(rms_norm_eps=float("nan")), r"ModelConfig.rms_norm_eps"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_and_generation_reject(case):
    call, message = MODEL_CASES[case]
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_model_config_rejects(case):
    fields, message = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=message):
        _config(**fields)
