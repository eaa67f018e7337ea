"""Weights on disk in mlx-lm's layout: config.json, model.safetensors (or shards with
model.safetensors.index.json above ``max_shard_bytes``), and the tokenizer's files.

Saving is atomic: everything is written to a temporary directory beside the target, synced,
then renamed into place, so an interrupted save leaves the previous directory intact.
Loading checks every file before trusting it, so a truncated download or a config that
does not match its weights fails with a message that names the file or tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .atomic import recover_directory, replace_directory, verify_directory

# The file mlx-lm imports to build the model (config.json's "model_file", with
# --trust-remote-code): it names this package's model, so that one implementation exists.
MODEL_FILE_TEXT = '''"""RetentionLLM, a power-retention language model, for mlx-lm (--trust-remote-code).

The model is the power-retention-mlx package (pip install power-retention-mlx); this file
names it for mlx-lm's loader.
"""

from llm.config import ModelArgs  # noqa: F401
from llm.model import RetentionLLM as Model  # noqa: F401
'''

CONFIG_FILE = "config.json"
MODEL_FILE = "retention_llm.py"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30  # as mlx-lm
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def _shards(weights: dict, max_shard_bytes: int) -> list[dict]:
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = weights[name]
        size += nbytes
    return shards + [current]


def save_pretrained(model, directory, tokenizer=None, max_shard_bytes: int | None = None) -> Path:
    """Write config.json, the weights and (if given) the tokenizer into ``directory``."""
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    shards = _shards(weights, MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes)

    config = {**model.config.to_dict(), "model_file": MODEL_FILE}
    quantization = quantization_of(model)
    if quantization:  # as mlx-lm writes it
        config.update(quantization=quantization, quantization_config=quantization)
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)

    def build(tmp: Path):
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / MODEL_FILE).write_text(MODEL_FILE_TEXT)
        if len(shards) == 1:
            mx.save_safetensors(str(tmp / WEIGHTS_FILE), shards[0], metadata={"format": "mlx"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
                weight_map.update(dict.fromkeys(shard, name))
            index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())},
                     "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)

    return replace_directory(build, directory)


def read_config_file(directory) -> dict:
    """config.json of a saved directory, as written (this project's fields and mlx-lm's)."""
    recover_directory(directory)
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a saved RetentionLLM directory")
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of ModelConfig fields")
    return values


def check_safetensors(path: Path) -> dict:
    """The header of a safetensors file after checking that the file is complete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if header_size is None or header_size > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file "
                             f"({size} bytes, too short for its header)")
        try:
            header = json.loads(f.read(header_size))
            end = max([entry["data_offsets"][1] for name, entry in header.items()
                       if name != "__metadata__"], default=0)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{path} is corrupt: unreadable safetensors header ({error})") from error
    if 8 + header_size + end > size:
        raise ValueError(f"{path} is truncated: its header needs {8 + header_size + end} bytes, "
                         f"the file has {size}")
    return header


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path / INDEX_FILE} is corrupt: {error}") from error
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{file} (listed in {INDEX_FILE}) is missing")
        return files
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    raise FileNotFoundError(f"no weights in {path}: expected {WEIGHTS_FILE} or {INDEX_FILE}")


def quantization_of(model) -> dict | None:
    """The quantization of a model's layers as mlx-lm's config.json records it: the settings
    most layers share, plus an entry per layer that differs (None if nothing is quantized)."""
    settings = {path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
                for path, m in model.named_modules() if isinstance(m, QUANTIZED)}
    if not settings:
        return None
    common = max(settings.values(), key=list(settings.values()).count)
    return {**common, **{path: s for path, s in settings.items() if s != common}}


def quantize_as_saved(model, quantization: dict, names) -> None:
    """Quantize the layers that a saved directory holds quantized (those with ``.scales``
    among ``names``, the tensors saved), with the settings its config records."""
    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in names

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def read_weights(model, path, strict: bool = True, quantization: dict | None = None) -> list:
    """(name, array) pairs from a weights file or a saved directory, checked against ``model``:
    every tensor the model has must be present with the model's shape and kind (and, when
    strict, no other tensor). ``quantization`` (a saved config's): the model's layers are
    first quantized as the saved ones were."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        verify_directory(path)  # every byte as written, where the directory lists checksums
    loaded, source = {}, {}
    for file in _weight_files(path):
        if file.suffix == ".safetensors":
            check_safetensors(file)
        try:
            arrays = mx.load(str(file))
        except Exception as error:  # MLX raises RuntimeError or ValueError by format
            raise ValueError(f"{file} cannot be read: {error}") from error
        for name, array in arrays.items():
            if name in loaded:
                raise ValueError(f"tensor {name!r} appears in both {source[name]} and {file}")
            loaded[name], source[name] = array, file

    if quantization:
        quantize_as_saved(model, quantization, set(loaded))
    parameters = dict(tree_flatten(model.parameters()))
    expected = {name: tuple(p.shape) for name, p in parameters.items()}
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if missing and strict:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                         f" ({len(missing)} of {len(expected)})")
    if extra and strict:
        raise ValueError(f"{path}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}"
                         f" that this model does not have")
    for name in sorted(set(expected) & set(loaded)):
        array = loaded[name]
        if tuple(array.shape) != expected[name]:
            raise ValueError(f"tensor {name!r} in {source[name]} has shape {tuple(array.shape)}"
                             f", the model expects {expected[name]}: the config does not match "
                             f"these weights")
        if not mx.issubdtype(parameters[name].dtype, mx.floating):  # packed quantized weights
            if array.dtype != parameters[name].dtype:
                raise ValueError(f"tensor {name!r} in {source[name]} is {array.dtype}; the "
                                 f"quantized layer holds {parameters[name].dtype}")
            continue
        if not mx.issubdtype(array.dtype, mx.floating):
            raise ValueError(f"tensor {name!r} in {source[name]} is {array.dtype}; a model's "
                             f"weights are floating point")
        if not mx.isfinite(array).all().item():
            raise ValueError(f"tensor {name!r} in {source[name]} holds NaN or inf")
    return [(name, loaded[name]) for name in sorted(loaded) if name in expected]
