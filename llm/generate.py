"""Sampling and text generation (mlx-lm style): ``generate``, ``stream_generate``.

The prompt is prefilled in pieces of ``prefill_step`` tokens (the power mixer runs its
chunked form on each piece and carries the state between them), then tokens are decoded one
at a time on the recurrent state (power) or the KV cache (softmax).
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx

from power_retention.validation import check_integer

from .tokenizer import StreamingDetokenizer


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0):
    """A function (logits (B, V), key or None) -> tokens (B,).

    temperature 0 is greedy (argmax). top_k > 0 keeps the k most likely tokens; top_p < 1
    keeps the smallest set of most likely tokens whose probability reaches top_p (nucleus).
    """
    if not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    check_integer("top_k", top_k, minimum=0, meaning="0: off")

    if temperature == 0:
        return lambda logits, key=None: mx.argmax(logits, axis=-1)

    def sample(logits, key=None):
        logits = logits.astype(mx.float32) / temperature
        if 0 < top_k < logits.shape[-1]:
            kth_largest = mx.topk(logits, top_k, axis=-1).min(axis=-1, keepdims=True)
            logits = mx.where(logits < kth_largest, -mx.inf, logits)
        if top_p < 1:
            descending = mx.sort(logits, axis=-1)[..., ::-1]
            probs = mx.softmax(descending, axis=-1)
            # A token is kept while the tokens more likely than it hold less than top_p.
            kept = (mx.cumsum(probs, axis=-1) - probs) < top_p
            smallest_kept = mx.where(kept, descending, mx.inf).min(axis=-1, keepdims=True)
            logits = mx.where(logits < smallest_kept, -mx.inf, logits)
        return mx.random.categorical(logits, key=key)

    return sample


def generate_tokens(model, prompt: mx.array, cache: list, max_new_tokens: int, *,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    seed: int | None = None, prefill_step: int = 2048) -> Iterator[mx.array]:
    """Feed ``prompt`` (B, T) into ``cache`` and yield ``max_new_tokens`` sampled tokens (B,).

    The last token yielded has not been fed to the model (the caller feeds it, or not).
    """
    check_integer("max_new_tokens", max_new_tokens, minimum=0)
    if not isinstance(prompt, mx.array) or prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must hold at least one token, shape (B, T >= 1); got "
                         f"{tuple(prompt.shape) if isinstance(prompt, mx.array) else type(prompt).__name__}")
    if hasattr(model, "config"):
        from .model import check_tokens  # the model module imports this one
        check_tokens("prompt", prompt, model.config.vocab_size)
    sampler = make_sampler(temperature, top_p, top_k)
    key = None if seed is None else mx.random.key(seed)

    T = prompt.shape[1]
    for start in range(0, T - 1, prefill_step):
        piece = prompt[:, start:min(start + prefill_step, T - 1)]
        model(piece, cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(prompt[:, T - 1:], cache=cache)[:, -1]
    for n in range(max_new_tokens):
        if key is not None:
            key, subkey = mx.random.split(key)
        token = sampler(logits, None if key is None else subkey)
        mx.eval(token)
        yield token
        if n + 1 < max_new_tokens:
            logits = model(token[:, None], cache=cache)[:, -1]


@dataclass
class GenerationResponse:
    text: str                  # new text since the previous response
    token: int | None          # the token just sampled (None in a final flush)
    prompt_tokens: int
    prompt_tps: float          # prefill tokens per second
    generation_tokens: int
    generation_tps: float      # decode tokens per second
    peak_memory: float         # GB, mx.get_peak_memory()
    finish_reason: str | None  # "stop" (end of sequence), "length", or None while running


def stream_generate(model, tokenizer, prompt, max_new_tokens: int = 256, *,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    seed: int | None = None, cache: list | None = None
                    ) -> Iterator[GenerationResponse]:
    """Yield the continuation of ``prompt`` (text or token ids) piece by piece."""
    if isinstance(prompt, (bytes, bytearray)):
        raise ValueError("prompt must be text (str) or a list of token ids, got bytes: decode it "
                         "to str first")
    ids = tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("prompt is empty and the tokenizer added no beginning-of-sequence token")
    cache = model.make_cache() if cache is None else cache
    detokenizer = StreamingDetokenizer(tokenizer)
    start = time.perf_counter()
    prompt_tps = generation_tps = 0.0
    n = 0

    def response(text, token, finish_reason):
        return GenerationResponse(text, token, len(ids), prompt_tps, n, generation_tps,
                                  mx.get_peak_memory() / 1e9, finish_reason)

    finish_reason = "length"
    for token in generate_tokens(model, mx.array([ids]), cache, max_new_tokens,
                                 temperature=temperature, top_p=top_p, top_k=top_k, seed=seed):
        token = token.item()
        if n == 0:
            prompt_tps = len(ids) / (time.perf_counter() - start)
            start = time.perf_counter()
        n += 1
        generation_tps = n / max(time.perf_counter() - start, 1e-9)
        if token == tokenizer.eos_id:
            finish_reason = "stop"
            break
        detokenizer.add_token(token)
        yield response(detokenizer.last_segment, token, None)
    detokenizer.finalize()
    yield response(detokenizer.last_segment, None, finish_reason)


def generate(model, tokenizer, prompt, max_new_tokens: int = 256, *, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             verbose: bool = False) -> str:
    """The continuation of ``prompt`` as one string; verbose prints it as it comes and the speed."""
    pieces = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed):
        pieces.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\nprompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s; "
              f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s; "
              f"peak memory {last.peak_memory:.3f} GB")
    return "".join(pieces)
