"""``ModelConfig``, the presets from ultra-tiny to 7b, and parameter counts without allocation.

Field names follow Hugging Face's config.json (hidden_size, num_hidden_layers, ...), so a
saved config.json reads like any other model's.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

from power_retention import tuning
from power_retention.convolution import ShortConvolution
from power_retention.layer import CONV_SIZE, INITIAL_GATE, ROPE, check_gate_init, state_floats
from power_retention.validation import check_integer, is_integer

MIXERS = ("power", "softmax")
# Saved configs from before a field was renamed or added: old name -> today's name, and the
# value a file without the field meant (what the model had before the field existed).
RENAMED_FIELDS = {"power": "deg"}


# Keys that mlx-lm and Hugging Face write into config.json beside the model's own fields:
# they say how to load the model (its file, its quantization, its tokens), not what it is.
LOADER_FIELDS = ("model_file", "quantization", "quantization_config", "quantize_activations",
                 "eos_token_id", "bos_token_id", "architectures", "torch_dtype",
                 "transformers_version", "_name_or_path")


def fields_added_later(mixer: str) -> dict:
    """What a config saved before these fields existed meant for them (the model it had)."""
    return {"gate_init": 0.999, "conv_size": 0, "output_norm": True, "rope": mixer == "softmax"}


def upgrade_saved_fields(values: dict) -> dict:
    """A saved config's fields (config.json) in today's names, with what an older file meant
    for the fields it lacks, so that every model saved before still loads as it was."""
    values = {RENAMED_FIELDS.get(name, name): value for name, value in values.items()}
    return {**fields_added_later(values.get("mixer", "power")), **values}


def saved_config(values: dict, source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a saved config.json, written by this project or by mlx-lm (whose
    loader keys are set aside); any other unknown field is still an error."""
    fields = {name: value for name, value in values.items() if name not in LOADER_FIELDS}
    return ModelConfig.from_dict(upgrade_saved_fields(fields), source=source)


class ModelArgs:
    """mlx-lm's name for what its loader builds from config.json and passes to ``Model``
    (here the ModelConfig that RetentionLLM takes): see the model file that
    ``save_pretrained`` writes. As mlx-lm's own model arguments do, it takes the fields it
    knows and leaves the rest (mlx-lm adds its loading options to the same dictionary)."""

    @staticmethod
    def from_dict(values: dict) -> ModelConfig:
        known = {field.name for field in fields(ModelConfig)} | set(RENAMED_FIELDS)
        return saved_config({name: value for name, value in values.items() if name in known})


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    mixer: str = "power"          # "power" (power retention) or "softmax" (the baseline)
    deg: int = 2                  # degree p of the power mixer
    gating: bool = True           # learned decay in the power mixer
    gate_init: float = INITIAL_GATE  # the power mixer's gate at initialisation, in (0, 1)
    conv_size: int | None = None  # taps of the short convolution on q, k, v (0: none; None: the
                                  # mixer's default, CONV_SIZE for power, 0 for softmax)
    output_norm: bool | None = None  # RMS norm on each power-mixer head's output (None: the
                                     # degree's default, on for odd degrees only)
    rope: bool | None = None      # rotary embeddings on q, k (None: the mixer's default, ROPE
                                  # for power; softmax always has them)
    chunk_size: int | None = None  # chunk of the power mixer's chunked form (None: the form and
                                   # size measured fastest on the device, power_retention.tuning)
    rope_theta: float = 10000.0   # rotary embedding base
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    document_start_id: int | None = None  # a token that starts a document (the tokenizer's
                                          # bos): where it is, every mixer forgets all before
                                          # it, so packed documents do not see each other
    model_type: str = "retention_llm"

    def __post_init__(self):
        if self.conv_size is None:
            self.conv_size = CONV_SIZE if self.mixer == "power" else 0
        if self.output_norm is None:
            self.output_norm = self.deg % 2 == 1
        if self.rope is None:
            self.rope = ROPE if self.mixer == "power" else True
        if self.mixer == "softmax" and not self.rope:
            raise ValueError("ModelConfig.rope=False applies to the power mixer only: the softmax "
                             "mixer always has rotary embeddings")
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) or field.name == "conv_size":
                check_integer(f"ModelConfig.{field.name}", value,
                              minimum=0 if field.name == "conv_size" else 1)
            elif field.type.startswith("bool") and not isinstance(value, (bool, np.bool_)):
                # "false" is a true value to Python: a string here would silently mean True.
                raise ValueError(f"ModelConfig.{field.name} must be true or false, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
        check_integer("ModelConfig.chunk_size", self.chunk_size, allow_none=True,
                      meaning="None: the size measured fastest here")
        check_integer("ModelConfig.document_start_id", self.document_start_id, minimum=0,
                      allow_none=True)
        if self.document_start_id is not None and self.document_start_id >= self.vocab_size:
            raise ValueError(f"ModelConfig.document_start_id must be a token id below "
                             f"vocab_size={self.vocab_size}, got {self.document_start_id}")
        try:
            check_gate_init(self.gate_init)
        except ValueError as error:
            raise ValueError(f"ModelConfig.{error}") from None
        if self.mixer not in MIXERS:
            raise ValueError(f"ModelConfig.mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"ModelConfig.num_attention_heads={self.num_attention_heads} must be a "
                             f"multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for rotary embeddings, "
                             f"got {self.head_dim}")

    # A mapping, so that RetentionLLM(**create_model_config("tiny")) works as well as
    # RetentionLLM(create_model_config("tiny")).
    def keys(self):
        return [field.name for field in fields(self)]

    def __getitem__(self, name):
        return getattr(self, name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "ModelConfig":
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; ModelConfig fields are "
                             f"{sorted(known)}")
        required = {f.name for f in fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}")
        return cls(**values)


def _preset(hidden_size, layers, heads, kv_heads, intermediate_size, max_len, vocab=50257, **extra):
    return dict(vocab_size=vocab, hidden_size=hidden_size, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=hidden_size // heads, intermediate_size=intermediate_size,
                max_position_embeddings=max_len, **extra)


# Heads are at most 64 wide: a head's degree-2 state is C(d + 1, 2) x (d + 1) floats, 0.54 MB
# at d = 64 but 33.8 MB at d = 256 (power_retention/README.md, "Costs"). The larger presets share each key/value
# head among 4 query heads, which divides the recurrent state (and the KV cache) by 4.
PRESETS = {
    "ultra-tiny": _preset(64, 3, 2, 2, 128, 128, vocab=1000, chunk_size=32),   # ffn_mult 2
    "tiny": _preset(256, 6, 4, 4, 640, 512),
    "small": _preset(768, 12, 12, 12, 2048, 1024),
    "medium": _preset(1024, 24, 16, 16, 2816, 1024),
    "1b": _preset(2048, 20, 32, 8, 5632, 2048),
    "3b": _preset(3072, 28, 48, 12, 8192, 2048),
    "7b": _preset(4096, 32, 64, 16, 13312, 4096, tie_word_embeddings=False),
}


def create_model_config(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` with any field replaced, e.g. ``create_model_config("tiny", mixer="softmax")``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known presets: {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    values.update(overrides)
    if "head_dim" not in overrides:  # keep heads as wide as the (possibly new) width implies
        width, heads = values["hidden_size"], values["num_attention_heads"]
        if is_integer(width) and is_integer(heads) and heads > 0 and width % heads:
            raise ValueError(f"create_model_config({name!r}): hidden_size={width} is not divisible "
                             f"by num_attention_heads={heads}; pass head_dim explicitly")
        if is_integer(heads) and heads > 0:
            values["head_dim"] = width // heads
    return ModelConfig.from_dict(values, source=f"create_model_config({name!r})")


def mixer_param_count(config: ModelConfig) -> int:
    dim, hd = config.hidden_size, config.head_dim
    Hq, H = config.num_attention_heads, config.num_key_value_heads
    projections = dim * hd * (2 * Hq + 2 * H)          # q, o and k, v
    conv = (Hq + 2 * H) * hd * config.conv_size
    if config.mixer == "softmax":
        return projections + conv
    gate = (dim + 1) * H if config.gating else 0
    norm = hd if config.output_norm else 0
    return projections + conv + gate + norm


def retention_shape(config: ModelConfig, batch_size: int, seq_len: int) -> dict:
    """The power mixer's shape at ``batch_size`` x ``seq_len``, as the keyword arguments of
    ``power_retention.tuning.choose`` and ``resolve``."""
    return dict(B=batch_size, T=seq_len, Hq=config.num_attention_heads, H=config.num_key_value_heads,
                d=config.head_dim, e=config.head_dim, deg=config.deg, gated=config.gating)


def training_form(config: ModelConfig, batch_size: int, seq_len: int):
    """The retention form and chunk size measured fastest for a training step of this shape on
    this device (measured once, then kept: ``power_retention.tuning``), as a ``tuning.Choice``;
    None when the model names its chunk size or has no power mixer."""
    if config.mixer != "power" or config.chunk_size is not None:
        return None
    return tuning.choose(**retention_shape(config, batch_size, seq_len), mode="training")


def param_count(config: ModelConfig) -> int:
    """Number of parameters, computed from the config alone (nothing is allocated)."""
    dim = config.hidden_size
    mlp = 3 * dim * config.intermediate_size          # SwiGLU: gate, up, down
    block = 2 * dim + mixer_param_count(config) + mlp  # two RMSNorm gains
    embeddings = config.vocab_size * dim * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_hidden_layers * block + dim


def state_floats_per_layer(config: ModelConfig, context: int = 0) -> int:
    """Floats a layer keeps per sequence while decoding: the recurrent state of the power
    mixer (independent of ``context``), or the KV cache of the softmax mixer at ``context``."""
    if config.mixer == "softmax":
        channels = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        return (2 * config.num_key_value_heads * config.head_dim * context
                + ShortConvolution.state_floats(channels, config.conv_size))
    return state_floats(num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                        head_dim=config.head_dim, deg=config.deg, conv_size=config.conv_size)


def describe(config: ModelConfig) -> str:
    return (f"{config.mixer} mixer, {config.num_hidden_layers} layers x {config.hidden_size} wide, "
            f"{config.num_attention_heads} heads of {config.head_dim}"
            f"{f' ({config.num_key_value_heads} kv)' if config.num_key_value_heads != config.num_attention_heads else ''}"
            f", {param_count(config) / 1e6:.1f}M parameters")
