"""Predicted against measured peak memory of one training step.

    python benchmarks/bench_memory.py

For each case: build the model, run one training step (loss, gradients, AdamW update) to
create the optimizer state, then reset MLX's peak counter and run a second step;
``mx.get_peak_memory()`` is the measurement, ``llm.memory.estimate`` the prediction.
Target: every prediction within +-15%.
"""

from __future__ import annotations

import dataclasses

import click
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from common import machine_description, machine_line, now, write_report

from llm import RetentionLLM, create_model_config
from llm.adapters import add_adapters, quantize_base
from llm.memory import Adapters, estimate, format_bytes
from power_retention import tuning
from power_retention.cpu_tuning import release_freed_memory, tune_process

# A ~50M model: the small preset at half width and two thirds of the depth.
MID = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
           num_hidden_layers=8, intermediate_size=1408)
CASES = [
    # (name, preset, overrides, batch, seq_len, method, checkpointing[, adapters])
    ("ultra-tiny attention", "ultra-tiny", {}, 16, 128, "attention", False),
    ("ultra-tiny chunked", "ultra-tiny", {}, 16, 128, "chunked", False),
    ("ultra-tiny softmax", "ultra-tiny", {"mixer": "softmax"}, 16, 128, None, False),
    ("tiny attention", "tiny", {}, 4, 512, "attention", False),
    ("tiny chunked", "tiny", {}, 4, 512, "chunked", False),
    ("tiny chunked ckpt", "tiny", {}, 4, 512, "chunked", True),
    ("tiny chunked no-conv", "tiny", {"conv_size": 0}, 4, 512, "chunked", False),
    ("tiny softmax", "tiny", {"mixer": "softmax"}, 4, 512, None, False),
    ("tiny softmax ckpt", "tiny", {"mixer": "softmax"}, 4, 512, None, True),
    ("50M attention", "small", MID, 2, 512, "attention", False),
    ("50M chunked ckpt", "small", MID, 2, 1024, "chunked", True),
    ("50M chunked", "small", MID, 2, 1024, "chunked", False),
    ("50M softmax", "small", {**MID, "mixer": "softmax"}, 2, 1024, None, False),
    # Fine-tuning: adapters only are trained (llm/adapters.py), over a quantized base for QLoRA.
    ("tiny lora 8", "tiny", {}, 4, 512, "chunked", False, Adapters("lora", 8)),
    ("tiny lora 8 last 2", "tiny", {}, 4, 512, "chunked", False, Adapters("lora", 8, 2)),
    ("tiny qlora 4-bit", "tiny", {}, 4, 512, "chunked", False, Adapters("lora", 8, 0, 4)),
    ("tiny dora 8-bit ckpt", "tiny", {}, 4, 512, "chunked", True, Adapters("dora", 8, 0, 8)),
    ("50M qlora 4-bit", "small", MID, 2, 1024, "chunked", False, Adapters("lora", 16, 4, 4)),
]


def measure(config, batch, seq_len, method, checkpointing, adapters=None) -> int:
    mx.random.seed(0)
    model = RetentionLLM(config)
    if adapters is not None:
        if adapters.bits:
            quantize_base(model, adapters.bits)
        add_adapters(model, adapters.kind, adapters.rank, adapters.layers or None)
    mx.eval(model.parameters())
    model.checkpointing = checkpointing
    if method is not None:
        model.set_retention_form(method)
    optimizer = optim.AdamW(1e-4)
    tokens = mx.random.randint(0, config.vocab_size, (batch, seq_len + 1))
    step = nn.value_and_grad(model, lambda m: nn.losses.cross_entropy(
        m(tokens[:, :-1]), tokens[:, 1:], reduction="mean"))
    for repeat in range(2):
        if repeat == 1:
            mx.reset_peak_memory()
        loss, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        del loss, grads
    peak = mx.get_peak_memory()
    del model, optimizer
    release_freed_memory()
    return peak


@click.command()
@click.option("--cases", default="", help="comma-separated case names (default: all)")
@click.option("--out", default=None, help="JSON path (default benchmarks/results/memory-DATE.json)")
def main(cases, out):
    tune_process()
    wanted = {c.strip() for c in cases.split(",") if c.strip()}
    unknown = wanted - {case[0] for case in CASES}
    if unknown:
        raise click.BadParameter(f"unknown case(s) {sorted(unknown)}; known: "
                                 f"{', '.join(case[0] for case in CASES)}", param_hint="--cases")
    started = now()
    machine = machine_description()
    print(f"# training-step memory, predicted vs measured, {started:%Y-%m-%d %H:%M %Z}")
    print(f"# machine: {machine_line(machine)}; float32, AdamW; peak = mx.get_peak_memory() "
          f"over one step")
    header = f"{'case':<24} {'B x T':>9} {'form':>9} {'predicted':>10} {'measured':>10} {'error':>7}"
    print(header)
    print("-" * len(header))
    results = []
    for name, preset, overrides, batch, seq_len, method, checkpointing, *adapters in CASES:
        if wanted and name not in wanted:
            continue
        adapters = adapters[0] if adapters else None
        config = create_model_config(preset, **overrides)
        # One chunk size for the estimate and the step (left unset, the op measures its own).
        if config.chunk_size is None:
            config = dataclasses.replace(config, chunk_size=tuning.DEFAULT_CHUNK)
        predicted = estimate(config, batch, seq_len, checkpointing=checkpointing,
                             method=method or "auto", adapters=adapters)
        measured = measure(config, batch, seq_len, method, checkpointing, adapters)
        error = predicted.total / measured - 1
        results.append({"case": name, "preset": preset, "overrides": overrides, "batch": batch,
                        "seq_len": seq_len, "method": predicted.method,
                        "checkpointing": checkpointing,
                        "adapters": adapters and dataclasses.asdict(adapters),
                        "predicted_bytes": predicted.total,
                        "measured_bytes": measured, "relative_error": error})
        print(f"{name:<24} {f'{batch} x {seq_len}':>9} {predicted.method:>9} "
              f"{format_bytes(predicted.total):>10} {format_bytes(measured):>10} {100 * error:>6.1f}%",
              flush=True)
    worst = max(abs(r["relative_error"]) for r in results)
    print(f"# worst error {100 * worst:.1f}% (target 15%)")
    out = write_report("bench_memory", started, {"results": results, "worst_relative_error": worst}, out)
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
