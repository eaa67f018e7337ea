"""Adapters on a RetentionLLM: mlx-lm's LoRA and DoRA layers and its adapter files, so that an
adapter trained here loads in ``mlx_lm generate --adapter-path`` and one trained by
``mlx_lm lora`` loads here. Needs the mlx-lm extra.

    config = add_adapters(model, kind="lora", rank=8, layers=2)   # base frozen, adapters trainable
    ...train model.trainable_parameters()...
    save_adapters(model, "adapters", config)     # adapters.safetensors + adapter_config.json
    load_adapters(base_model, "adapters")         # the same adapters on a fresh base

A directory holds the adapter tensors only (what ``mlx_lm lora`` writes); the base model is a
separate directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from power_retention.validation import check_integer

from .atomic import MANIFEST, DamagedFileError, replace_directory, verify_directory

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
KINDS = ("lora", "dora")
# mlx-lm's default LoRA scale (the update is scale * (x A) B); it has no alpha.
DEFAULT_SCALE = 20.0
QUANTIZE_BITS = (4, 8)
QUANTIZE_GROUP_SIZE = 64  # mlx-lm's default


def _mlx_lm_tuner():
    try:
        from mlx_lm.tuner import utils
    except ImportError as error:
        raise ImportError("adapters use mlx-lm's LoRA layers: pip install -e '.[mlx-lm]'") from error
    return utils


def add_adapters(model, kind: str = "lora", rank: int = 8, layers: int | None = None,
                 scale: float = DEFAULT_SCALE, dropout: float = 0.0) -> dict:
    """Freeze ``model`` and put trainable ``kind`` adapters of ``rank`` on every linear layer
    (and the embedding) of its last ``layers`` blocks (default: all); return the adapter
    config, as mlx-lm writes it in adapter_config.json."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    check_integer("rank", rank)
    layers = len(model.layers) if layers is None else layers
    check_integer("layers", layers)
    if layers > len(model.layers):
        raise ValueError(f"layers={layers} is more than the model's {len(model.layers)} blocks")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    config = {"fine_tune_type": kind, "num_layers": layers,
              "lora_parameters": {"rank": rank, "scale": float(scale), "dropout": float(dropout)}}
    model.freeze()
    _mlx_lm_tuner().linear_to_lora_layers(model, layers, config["lora_parameters"],
                                          use_dora=kind == "dora")
    return config


def quantize_base(model, bits: int, group_size: int = QUANTIZE_GROUP_SIZE):
    """Quantize ``model``'s layers in place as ``mlx_lm convert -q`` would (the layers its
    ``quant_predicate`` allows): the frozen base of QLoRA."""
    if bits not in QUANTIZE_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, QUANTIZE_BITS))}, got {bits!r}")
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda path, module: hasattr(module, "to_quantized")
                and model.quant_predicate(path, module))


def remove_adapters(model):
    """Put back, in place, the layers the adapters wrap: the base as it was."""
    wrapped = [(name, module.linear if "linear" in module else module.embedding)
               for name, module in model.named_modules() if "lora_a" in module]
    if wrapped:
        model.update_modules(tree_unflatten(wrapped))
    return model


def files_fingerprint(directory) -> str:
    """sha256 over a model directory's files (its checksum manifest, when it has one): what an
    adapter records of the base it was trained on."""
    directory = Path(directory)
    digest = hashlib.sha256()
    manifest = directory / MANIFEST
    files = [manifest] if manifest.is_file() else sorted(p for p in directory.iterdir() if p.is_file())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fuse_adapters(model):
    """Merge every adapter into the layer it wraps (mlx-lm's fuse), in place: the model is a
    plain model again, and a quantized base stays quantized at its settings."""
    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if not fused:
        raise ValueError("the model has no adapters to fuse")
    model.update_modules(tree_unflatten(fused))
    return model


def adapter_weights(model) -> dict:
    """The trainable tensors of a model with adapters: what an adapter file holds."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model, directory, config: dict) -> Path:
    """Write the adapter tensors and their config (atomically, with checksums)."""
    weights = adapter_weights(model)
    if not weights:
        raise ValueError("the model has no trainable adapter tensors: call add_adapters first")
    mx.eval(weights)

    def build(tmp: Path):
        mx.save_safetensors(str(tmp / ADAPTER_FILE), weights, metadata={"format": "mlx"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return replace_directory(build, directory)


def load_adapters(model, directory) -> dict:
    """Put the adapters saved in ``directory`` on ``model`` (its base); return their config.
    A file damaged since it was written, or tensors that do not fit this base, are errors
    naming the file."""
    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} does not exist: not an adapter directory")
    verify_directory(directory)
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        kind, layers = config.get("fine_tune_type", "lora"), config["num_layers"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{directory / ADAPTER_CONFIG} is not an adapter config ({error})") from None
    if kind not in KINDS:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: fine_tune_type {kind!r} is not an adapter "
                         f"({', '.join(KINDS)})")
    if layers > len(model.layers):
        raise ValueError(f"{directory / ADAPTER_CONFIG}: adapters for {layers} blocks, the base "
                         f"has {len(model.layers)}: they were trained on another model")
    try:
        _mlx_lm_tuner().load_adapters(model, str(directory))
    except ValueError as error:  # mlx-lm lists the tensors that do not fit
        raise ValueError(f"{directory / ADAPTER_FILE} does not fit this base model: {error}") from None
    return config


def load_adapter_weights(model, directory):
    """Load the tensors of an adapter directory into ``model``, which already has those
    adapters (a fine-tuning run resuming from its checkpoint); a file damaged since it was
    written, or one whose tensors are not exactly the model's adapters, is an error naming it."""
    path = Path(directory) / ADAPTER_FILE
    verify_directory(directory)
    try:
        weights = mx.load(str(path))
    except Exception as error:  # MLX raises RuntimeError or ValueError by what is wrong
        raise DamagedFileError(f"{path} cannot be read: {error}") from error
    mismatch = first_mismatch(weights, model)
    if mismatch:
        raise ValueError(f"{path} does not hold this run's adapters (first mismatch: {mismatch!r})")
    model.load_weights(list(weights.items()), strict=False)


def first_mismatch(weights: dict, model) -> str | None:
    """The first tensor name that is in ``weights`` or in ``model``'s adapters but not both,
    or in both with another shape; None when the tensors are exactly its adapters'."""
    expected = adapter_weights(model)
    wrong = sorted(set(weights) ^ set(expected)) + sorted(
        name for name in set(weights) & set(expected) if weights[name].shape != expected[name].shape)
    return wrong[0] if wrong else None
