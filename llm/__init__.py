"""RetentionLLM: language models whose sequence mixer is power retention (or softmax attention,
the baseline), with presets from ultra-tiny to 7b, generation and weights on disk.

    from llm import RetentionLLM, create_model_config, generate, load
    model = RetentionLLM(create_model_config("ultra-tiny"))
"""

from .config import PRESETS, ModelConfig, create_model_config, param_count, state_floats_per_layer
from .generate import GenerationResponse, generate, make_sampler, stream_generate
from .model import KVCache, RetentionLLM
from .tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer, train_tokenizer


def load(directory, *, use_metal: bool = False):
    """(model, tokenizer) from a directory written by ``save_pretrained`` (as mlx-lm's load)."""
    return RetentionLLM.from_pretrained(directory, use_metal=use_metal), load_tokenizer(directory)


__all__ = [
    "PRESETS",
    "ByteTokenizer",
    "GenerationResponse",
    "KVCache",
    "ModelConfig",
    "RetentionLLM",
    "SentencePieceTokenizer",
    "create_model_config",
    "generate",
    "load",
    "load_tokenizer",
    "make_sampler",
    "param_count",
    "state_floats_per_layer",
    "stream_generate",
    "train_tokenizer",
]
