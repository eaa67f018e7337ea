"""Memory a model needs, computed from its config alone (nothing is allocated).

``estimate`` breaks down one training step; ``inference_estimate`` the memory of decoding.
Activation counts follow what MLX's autodiff keeps for the backward pass of each op in
``llm/model.py`` and ``power_retention/chunk.py``: the inputs of every matmul and
nonlinearity, per token, plus the per-sequence states of the chunked form.

    python -m llm.memory                  # the table of every preset (README)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import click
from mlx.utils import tree_flatten

from power_retention import native, tuning
from power_retention.sympow import expanded_dim

from .config import (PRESETS, ModelConfig, create_model_config, param_count, retention_shape,
                     state_floats_per_layer)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Optimizer state per parameter, in parameters' worth: AdamW keeps two moments, Lion and Muon
# one momentum buffer, SGD without momentum nothing.
OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "lion": 1, "muon": 1, "sgd": 0}
GB = 1e9


@dataclass(frozen=True)
class Adapters:
    """What fine-tuning trains of a fixed base model: ``kind`` "lora" or "dora" adapters of
    ``rank`` on the last ``layers`` blocks (0: all), over a base quantized to ``bits`` (0: as
    it is); or every parameter (``kind`` "full")."""
    kind: str
    rank: int = 8
    layers: int = 0
    bits: int = 0


_footprints: dict = {}


def adapter_footprint(config: ModelConfig, adapters: Adapters) -> tuple[int, int, int]:
    """(bytes of the frozen base, trainable parameters, linear layers with an adapter), counted
    on the model that fine-tuning builds (mlx-lm's adapter layers over the quantized base).
    MLX is lazy and nothing here is evaluated, so nothing is allocated, whatever the size."""
    from .adapters import add_adapters, quantize_base
    from .model import RetentionLLM

    key = (json.dumps(config.to_dict(), sort_keys=True), adapters)
    if key in _footprints:
        return _footprints[key]
    model = RetentionLLM(config)
    if adapters.bits:
        quantize_base(model, adapters.bits)
    add_adapters(model, adapters.kind, adapters.rank, adapters.layers or None)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    base = sum(array.nbytes for name, array in tree_flatten(model.parameters())
               if name not in trainable)
    adapted = sum(1 for _, module in model.named_modules() if hasattr(module, "lora_a"))
    _footprints[key] = base, sum(array.size for array in trainable.values()), adapted
    return _footprints[key]


@dataclass
class MemoryEstimate:
    """Bytes of one training step, by kind; ``total`` is the predicted peak."""
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int                 # kept for the backward pass, all layers
    activations_per_layer: int
    logits_and_loss: int
    transient: int                   # the largest short-lived buffers of the backward pass
    largest_buffer: int
    largest_buffer_name: str
    method: str                      # the power mixer's form ("attention" / "chunked" / ...)
    live_buffers: int                # arrays alive at the peak (Metal limits their number)
    decode_state: int = 0            # the recurrent state of one sequence, all layers: what
                                     # the run's samples (and any generation) hold

    @property
    def total(self) -> int:
        kept = self.parameters + self.gradients + self.optimizer_state
        # A step and a sample never run at once: the peak is the larger of the two.
        return kept + max(self.activations + self.logits_and_loss + self.transient,
                          self.decode_state)


def _mixer_activations(config: ModelConfig, B: int, T: int, method: str, chunk_size: int,
                       compiled: bool) -> tuple:
    """Floats the mixer keeps per layer for backward, its largest single buffer, and the
    extra floats its backward needs for a while (all in floats). ``compiled``: the chunked
    form's compiled products run (power_retention.native), which keep neither the in-chunk
    weights nor (at degree 2) the features."""
    hd, Hq, H = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    projections = B * T * (Hq + 2 * H) * hd
    if config.conv_size:
        # The short convolution keeps its padded input, the pre-activation and its sigmoid
        # for the backward pass (its output is the attention's input, counted above).
        projections += 3 * B * (T + config.conv_size - 1) * (Hq + 2 * H) * hd
    if config.mixer == "softmax":
        # Scores and probabilities of every head (MLX's CPU attention materialises them).
        weights = 2 * B * Hq * T * T
        return projections + weights + B * T * Hq * hd, B * Hq * T * T, 0
    D = expanded_dim(hd, config.deg)
    c = T if method == "attention" else min(chunk_size, T)
    # The in-chunk weights (one c x c block per chunk): the forward keeps two copies for the
    # backward (the weights and their slope), which needs three more for a while (the weights'
    # cotangent, the scores' cotangent, and their product with the weights). Compiled, they
    # live in a block of rows per core and the backward recomputes them.
    weights = 0 if compiled else B * Hq * T * c
    floats = projections + 2 * weights + 3 * B * T * Hq * hd  # + scaled q, output, normed output
    largest, transient = weights, 3 * weights
    if method == "recurrent":
        # Autodiff keeps every token's state [S | z] and its features.
        states = B * T * H * D * (hd + 1)
        return projections + states + B * T * (Hq + H) * D, max(states // T, B * T * Hq * D), 0
    if method != "attention" and T > c:
        n = -(-T // c)
        states = n * B * H * D * (hd + 1)         # each chunk's own contribution [S | z]
        if compiled and config.deg == 2:
            # Features computed in cache; the state entering every chunk is kept (measured: one
            # stack of states, not also the chunks' contributions), and the backward holds the
            # two cotangents of the scan.
            floats += states
            transient += 2 * states
            largest = max(largest, states)
        else:
            features = B * T * (Hq + H) * D       # phi(q) and phi(k)
            floats += features + states
            # One layer at a time, the backward recomputes the state entering every chunk and
            # holds the features' gradients.
            transient += states + features
            largest = max(largest, B * T * Hq * D, states)
    return floats, largest, transient


def _live_buffers(config: ModelConfig, T: int, method: str, chunk_size: int, checkpointing: bool,
                  optimizer: str) -> int:
    """Arrays alive at the peak: each parameter with its gradient and optimizer slots, and the
    activations of each layer (about 40 arrays, plus a few per chunk in the chunked form's
    scan and per token in the recurrent form)."""
    per_layer_tensors = (12 if config.mixer == "power" else 9) + (1 if config.conv_size else 0)
    tensors = config.num_hidden_layers * per_layer_tensors + 2 + (0 if config.tie_word_embeddings else 1)
    activations = 40
    if config.mixer == "power" and method == "chunked":
        activations += 8 * -(-T // chunk_size)
    elif config.mixer == "power" and method == "recurrent":
        activations += 12 * T
    layers = 1 if checkpointing else config.num_hidden_layers
    return tensors * (2 + OPTIMIZER_SLOTS[optimizer]) + layers * activations + config.num_hidden_layers


def estimate(config: ModelConfig, batch_size: int, seq_len: int, dtype: str = "float32",
             optimizer: str = "adamw", checkpointing: bool = False, method: str = "auto",
             chunk_size: int | None = None, adapters: Adapters | None = None,
             cpu_streams: int = 1, compiled: bool | None = None) -> MemoryEstimate:
    """Predicted peak memory of one training step (forward, backward, optimizer update);
    with ``adapters``, of a fine-tuning step that trains only them; with ``cpu_streams``, of
    the micro-batch split across that many CPU streams (llm.cpu_streams). ``compiled``: whether
    the power mixer runs power_retention.native's chunked products; None, the default, means as
    it would here and now (Linux CPUs), False the MLX ops (macOS, GPUs)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if optimizer not in OPTIMIZER_SLOTS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_SLOTS)}, got {optimizer!r}")
    B, T, dim = batch_size, seq_len, config.hidden_size
    chunk_size = config.chunk_size if chunk_size is None else chunk_size
    if config.mixer == "power":
        # What the run will use: a measured choice where one is kept (nothing is measured here).
        method, chunk_size = tuning.resolve(method, chunk_size, mode="training", measure=False,
                                            **retention_shape(config, B, T))
    nbytes = DTYPE_BYTES[dtype]
    P = param_count(config)

    if compiled is None:
        compiled = native.available()
    mixer, mixer_largest, mixer_transient = _mixer_activations(config, B, T, method, chunk_size,
                                                               compiled)
    # Norm inputs and outputs, residual, and the MLP's gate, up, sigmoid (kept for SiLU's
    # backward), silu and product.
    block = B * T * (5 * dim + 5 * config.intermediate_size)
    per_layer = (mixer + block) * 4  # the op computes in float32 whatever the dtype
    layers = config.num_hidden_layers
    stored, trained, trained_bytes = P * nbytes, P, nbytes
    if adapters is not None and adapters.kind != "full":
        base_bytes, trained, adapted = adapter_footprint(config, adapters)
        trained_bytes = 4  # adapters are float32 whatever the base's dtype
        stored = base_bytes + trained * trained_bytes
        # No gradient flows below the first block with adapters, so the blocks under it
        # keep nothing for a backward pass; each adapter keeps its rank-wide projection.
        layers = min(adapters.layers or layers, layers)
        per_layer += 4 * B * T * adapters.rank * adapted // layers
    if checkpointing:
        # Only each block's input survives the forward; one block is recomputed at a time.
        activations = layers * B * T * dim * nbytes + per_layer
    else:
        activations = layers * per_layer
    logits = B * T * config.vocab_size * 4
    candidates = {"logits": logits, "mixer": mixer_largest * 4,
                  "embedding": config.vocab_size * dim * nbytes}
    largest_name = max(candidates, key=candidates.get)
    return MemoryEstimate(
        live_buffers=_live_buffers(config, T, method, chunk_size, checkpointing, optimizer),
        # The parts of a split micro-batch hold their activations at once (together, one
        # micro-batch's) and each its own gradients until they are summed.
        parameters=stored, gradients=min(max(1, cpu_streams), B) * trained * trained_bytes,
        # MLX keeps the slots in the parameters' dtype.
        optimizer_state=OPTIMIZER_SLOTS[optimizer] * trained * trained_bytes,
        activations=activations, activations_per_layer=per_layer,
        logits_and_loss=3 * logits,  # logits, their softmax, and its gradient
        # A layer's activation gradients during its backward, and the mixer's recomputation.
        transient=per_layer + mixer_transient * 4,
        largest_buffer=candidates[largest_name], largest_buffer_name=largest_name,
        method=method if config.mixer == "power" else "softmax",
        decode_state=inference_estimate(config, 1, T)["state"])


def inference_estimate(config: ModelConfig, batch_size: int = 1, context: int = 2048,
                       dtype: str = "float16") -> dict:
    """Bytes to decode: weights, and the recurrent state (power) or KV cache (softmax)."""
    weights = param_count(config) * DTYPE_BYTES[dtype]
    state_bytes = 4 if config.mixer == "power" else DTYPE_BYTES[dtype]  # states stay float32
    state = (config.num_hidden_layers * batch_size * state_bytes
             * state_floats_per_layer(config, context))
    return {"weights": weights, "state": state, "total": weights + state}


def format_bytes(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.95 * GB else f"{n / 1e6:.1f} MB"


def preset_table(batch_size: int = 8, seq_len: int = 1024, context: int = 8192) -> str:
    """Markdown table of every preset: parameters, per-sequence state, inference and training
    (the MLX ops' memory, as on a Mac: the compiled products on Linux CPUs need less)."""
    rows = ["| preset | parameters | power: state per layer per sequence | softmax: KV cache per "
            f"layer at {context} tokens | power: inference (fp16 weights + state, batch 1) | "
            f"power: training (fp32, AdamW, B={batch_size}, T={seq_len}) | same, checkpointing |",
            "|---|---|---|---|---|---|---|"]
    for name in PRESETS:
        power = create_model_config(name)
        softmax = create_model_config(name, mixer="softmax")
        T = min(seq_len, power.max_position_embeddings)
        shorter = "" if T == seq_len else f" at T={T}"
        rows.append(
            f"| {name} | {param_count(power) / 1e6:,.1f}M "
            f"| {format_bytes(state_floats_per_layer(power) * 4)} "
            f"| {format_bytes(state_floats_per_layer(softmax, context) * 2)} "
            f"| {format_bytes(inference_estimate(power, 1, context)['total'])} "
            f"| {format_bytes(estimate(power, batch_size, T, compiled=False).total)}{shorter} "
            f"| {format_bytes(estimate(power, batch_size, T, checkpointing=True, compiled=False).total)}{shorter} |")
    return "\n".join(rows)


@click.command()
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seq-len", default=1024, show_default=True)
@click.option("--context", default=8192, show_default=True)
def main(batch_size, seq_len, context):
    """Print the memory table of every preset."""
    print(preset_table(batch_size, seq_len, context))


if __name__ == "__main__":
    main()
