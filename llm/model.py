"""RetentionLLM: a decoder-only language model whose sequence mixer is power retention.

Read top to bottom: the softmax baseline's attention and KV cache, the MLP, the block, the
model. ``mixer="power"`` (default) uses ``power_retention.PowerRetention``; ``mixer="softmax"``
uses grouped-query attention with rotary embeddings. Everything else (embeddings, norms, MLP,
initialisation, caches, generation, weights on disk) is shared, so the two compare like for
like.

    model = RetentionLLM(create_model_config("tiny"))
    logits = model(tokens)                          # tokens (B, T) int -> (B, T, vocab) float32
    cache = model.make_cache()
    logits = model(prompt, cache=cache)             # prefill, then one token at a time
    logits = model(next_token[:, None], cache=cache)
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from power_retention import ArraysCache, CacheList, KVCache, PowerRetention, native
from power_retention.convolution import ShortConvolution
from power_retention.validation import check_reset

from .config import ModelConfig, saved_config
from .generate import generate_tokens
from .weights import read_config_file, read_weights, save_pretrained



def check_tokens(name: str, tokens, vocab_size: int) -> None:
    """ValueError naming ``name`` unless ``tokens`` is a (B, T) array of integer ids in
    [0, vocab_size). An id outside the table would read memory past the embedding (or crash):
    checked wherever the values can be read (not inside mx.compile, where they do not exist)."""
    if not isinstance(tokens, mx.array) or tokens.ndim != 2:
        raise ValueError(f"{name} must be an mlx array of token ids of shape (B, T), got "
                         f"{tuple(tokens.shape) if isinstance(tokens, mx.array) else type(tokens).__name__}")
    if not mx.issubdtype(tokens.dtype, mx.integer):
        raise ValueError(f"{name} must hold integer token ids, got {tokens.dtype}")
    if tokens.size == 0:
        return
    try:
        outside = mx.logical_or(tokens < 0, tokens >= vocab_size).any().item()
    except ValueError:  # inside mx.compile or mx.vmap: the caller's contract
        return
    if outside:
        bad = tokens.min().item() if tokens.min().item() < 0 else tokens.max().item()
        raise ValueError(f"{name} holds the token id {bad}, outside [0, {vocab_size}) (the "
                         f"model's vocab_size)")

def document_mask(reset: mx.array, offset: int, previous_start) -> tuple[mx.array, mx.array]:
    """The attention mask (B, 1, T, offset + T) of causal attention within documents, for
    queries at positions offset..offset + T - 1 whose documents start where ``reset`` (B, T)
    is True (or, before the first, at ``previous_start`` (B,), or 0 if None); and where the last
    query's document starts, per sequence (B,)."""
    B, T = reset.shape
    queries = mx.arange(offset, offset + T)
    previous = 0 if previous_start is None else previous_start[:, None]
    starts = mx.cummax(mx.where(reset, queries, previous), axis=1)
    keys = mx.arange(offset + T)
    mask = (keys <= queries[:, None]) & (keys >= starts[..., None])
    return mask[:, None], starts[:, -1]


class SoftmaxAttention(nn.Module):
    """Causal grouped-query attention with rotary position embeddings: the baseline mixer.
    With ``conv_size``, q, k and v first go through the power mixer's short convolution
    (Primer's depthwise convolution; Zoology's recall benchmarks give attention one too)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, hd)
        self.q_proj = nn.Linear(dim, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, dim, bias=False)
        self.rope = nn.RoPE(hd, base=config.rope_theta)
        self.conv_size = config.conv_size
        if self.conv_size:
            self.conv = ShortConvolution((self.num_heads + 2 * self.num_kv_heads) * hd, self.conv_size)

    def make_cache(self) -> KVCache | CacheList:
        """Keys and values (mlx-lm's KVCache); with a convolution, its last inputs beside them
        in an ArraysCache of one slot."""
        return CacheList(KVCache(), ArraysCache(1)) if self.conv_size else KVCache()

    def __call__(self, x, cache: KVCache | CacheList | None = None, reset: mx.array | None = None):
        B, T, _ = x.shape
        check_reset(reset, (B, T))
        conv_cache = None
        if cache is not None and not hasattr(cache, "update_and_fetch"):  # a CacheList, ours or mlx-lm's
            cache, conv_cache = cache[0], cache[1]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv_size:
            (q, k, v), tail = self.conv.split(q, k, v, tail=None if conv_cache is None else conv_cache[0],
                                              reset=reset)
            if conv_cache is not None:
                conv_cache[0] = tail
        q = q.reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if reset is None:
            # "causal" aligns the last query with the last key, which is what a prefill that
            # continues a cache needs; a single new token sees every key.
            mask = "causal" if T > 1 else None
        else:
            mask, start = document_mask(reset, offset, getattr(cache, "document_start", None))
            if cache is not None:
                cache.document_start = start
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(native.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, use_metal: bool = False):
        super().__init__()
        if config.mixer == "power":
            self.mixer = PowerRetention(
                config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                config.head_dim, deg=config.deg, gating=config.gating,
                chunk_size=config.chunk_size, use_metal=use_metal,
                gate_init=config.gate_init, conv_size=config.conv_size,
                output_norm=config.output_norm, rope=config.rope, rope_theta=config.rope_theta)
        else:
            self.mixer = SoftmaxAttention(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def __call__(self, x, cache=None, reset=None):
        x = x + self.mixer(self.input_layernorm(x), cache=cache, reset=reset)
        return x + self.mlp(self.post_attention_layernorm(x))


def _checkpointed(block, x, reset):
    """block(x), keeping only x for the backward pass: the block is recomputed there. The
    parameters are explicit inputs so that their gradients flow through the checkpoint."""
    def run(parameters, x):
        block.update(parameters)
        return block(x, reset=reset)

    return mx.checkpoint(run)(block.trainable_parameters(), x)


class _Session:
    """The cache behind the stateful API, plus the last sampled token, which has not been
    fed to the model yet (the next ``generate`` call starts with it)."""

    def __init__(self, cache):
        self.cache = cache
        self.pending = None


class RetentionLLM(nn.Module):
    """Token embeddings, ``num_hidden_layers`` blocks, a final RMSNorm and the output head.

    ``RetentionLLM(config)`` or ``RetentionLLM(**config)``; ``use_metal=True`` asks the
    power mixer for its fused Metal kernels (see ``PowerRetention``).
    """

    def __init__(self, config: ModelConfig | None = None, *, use_metal: bool = False, **fields):
        super().__init__()
        if config is None:
            config = ModelConfig.from_dict(fields, source="RetentionLLM(**fields)")
        elif fields:
            raise ValueError(f"pass either a ModelConfig or its fields, not both (got {sorted(fields)})")
        elif not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.use_metal = use_metal
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Block(config, use_metal) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._initialise()
        self._session = None
        self.checkpointing = False  # recompute each block in the backward pass (mx.checkpoint)

    def _initialise(self, std: float = 0.02):
        """GPT-2 / nanoGPT initialisation: N(0, 0.02) for embeddings and projections, and
        0.02 / sqrt(2 * layers) for the projections that write into the residual stream, so
        its variance does not grow with depth. Norm gains start at 1 and the retention gate
        keeps its own initialisation."""
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        self.embed_tokens.weight = std * mx.random.normal(self.embed_tokens.weight.shape)
        if not self.config.tie_word_embeddings:
            self.lm_head.weight = std * mx.random.normal(self.lm_head.weight.shape)
        for block in self.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(block.mixer, name)
                scale = residual_std if name == "o_proj" else std
                linear.weight = scale * mx.random.normal(linear.weight.shape)
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(block.mlp, name)
                scale = residual_std if name == "down_proj" else std
                linear.weight = scale * mx.random.normal(linear.weight.shape)

    def set_retention_form(self, method: str = "auto", chunk_size: int | None = None):
        """The form (and chunk size) every power-retention layer uses from now on."""
        for block in self.layers:
            if isinstance(block.mixer, PowerRetention):
                block.mixer.method = method
                if chunk_size is not None:
                    block.mixer.chunk_size = chunk_size

    def make_cache(self) -> list:
        """One cache per layer, in mlx-lm's protocol: an ArraysCache (the power mixer's, constant
        size) or a KVCache (grows with the context)."""
        return [block.mixer.make_cache() for block in self.layers]

    def __call__(self, tokens: mx.array, cache: list | None = None,
                 reset: mx.array | None = None) -> mx.array:
        return self.logits(self.hidden_states(tokens, cache, reset))

    def hidden_states(self, tokens: mx.array, cache: list | None = None,
                      reset: mx.array | None = None) -> mx.array:
        """The final norm's output (B, T, hidden_size): what ``logits`` maps to the vocabulary.
        Apart, so that a loss on a few positions needs their logits only.

        ``reset`` (B, T) bool: True where a document starts; no mixer carries anything across
        it. Default: where ``tokens`` hold ``config.document_start_id``, if it is set."""
        check_tokens("tokens", tokens, self.config.vocab_size)
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache must hold one entry per layer ({len(self.layers)}), "
                             f"got {len(cache)}: use model.make_cache()")
        if reset is None and self.config.document_start_id is not None:
            reset = tokens == self.config.document_start_id
        x = self.embed_tokens(tokens)
        for i, block in enumerate(self.layers):
            if self.checkpointing and cache is None:
                x = _checkpointed(block, x, reset)
            else:
                x = block(x, cache=None if cache is None else cache[i], reset=reset)
        return self.norm(x)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            return self.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    # The stateful API: the model keeps one running sequence (or batch of sequences).

    def reset_states(self):
        """Forget the running sequence of ``generate``."""
        self._session = None

    def generate(self, prompt_tokens, max_new_tokens: int = 20, temperature: float = 0.8,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> mx.array:
        """Continue the running sequence with ``prompt_tokens`` and sample ``max_new_tokens``.

        prompt_tokens: (T,) or (B, T) integers. Returns the new tokens, (max_new_tokens,) or
        (B, max_new_tokens). Calls continue where the previous one stopped until
        ``reset_states()``; temperature 0 is greedy.
        """
        if isinstance(prompt_tokens, (str, bytes, bytearray)):
            raise ValueError(f"prompt_tokens must be token ids ((T,) or (B, T) integers), got "
                             f"{type(prompt_tokens).__name__}: encode text with the tokenizer")
        prompt = mx.array(prompt_tokens)
        if prompt.ndim not in (1, 2):
            raise ValueError(f"prompt_tokens must have shape (T,) or (B, T), got {tuple(prompt.shape)}")
        squeeze = prompt.ndim == 1
        prompt = prompt[None] if squeeze else prompt
        if self._session is None:
            self._session = _Session(self.make_cache())
        elif self._session.pending is not None and self._session.pending.shape[0] != prompt.shape[0]:
            raise ValueError(f"prompt_tokens has batch {prompt.shape[0]} but the running sequence "
                             f"has batch {self._session.pending.shape[0]}: call reset_states() first")
        if self._session.pending is not None:
            prompt = mx.concatenate([self._session.pending[:, None], prompt], axis=1)
        new = list(generate_tokens(self, prompt, self._session.cache, max_new_tokens,
                                   temperature=temperature, top_p=top_p, top_k=top_k, seed=seed))
        # With no new token, every token given has been fed: nothing is pending.
        self._session.pending = new[-1] if new else None
        out = mx.stack(new, axis=1) if new else mx.zeros((prompt.shape[0], 0), dtype=mx.int32)
        return out[0] if squeeze else out

    # Weights on disk (mlx-lm layout: config.json, model.safetensors, tokenizer files).

    def save_pretrained(self, directory, tokenizer=None, *, max_shard_bytes: int | None = None):
        save_pretrained(self, directory, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_pretrained(cls, directory, *, use_metal: bool = False) -> "RetentionLLM":
        """A directory written by ``save_pretrained``, or by mlx-lm from one (``convert -q``,
        ``fuse``): quantized layers are rebuilt as they were saved."""
        values = read_config_file(directory)
        model = cls(saved_config(values, source=f"{directory}/config.json"), use_metal=use_metal)
        model.load_weights(read_weights(model, directory, quantization=values.get("quantization")))
        return model

    def quant_predicate(self, path: str, module) -> bool:
        """Which layers mlx-lm's quantization (``convert -q``) may quantize: all but the power
        mixer's decay gate, whose few weights set how fast every head forgets (norms and the
        convolution are not quantizable layers)."""
        return not path.endswith("mixer.gate_proj")

    def load_weights(self, file_or_weights, strict: bool = True):
        """Load a .safetensors file, a saved directory, or a list of (name, array) pairs.
        Files are checked first: a missing, extra or mis-shaped tensor, or a truncated file,
        raises ValueError naming it."""
        if isinstance(file_or_weights, (str, Path)):
            file_or_weights = read_weights(self, file_or_weights, strict=strict)
        return super().load_weights(file_or_weights, strict=strict)
