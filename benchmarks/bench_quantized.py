"""A trained model at fp32, bf16, 8-bit and 4-bit (mlx-lm's quantization): validation loss
and decoding speed, side by side in one run.

    python benchmarks/bench_quantized.py --model runs/RUN/checkpoints/last/model --data FILE

The validation loss is the mean next-token loss over --windows windows of --seq-len tokens
spread over the last --held-out share of FILE (held out: train on the rest). Decoding speed
is the generation tokens/s of greedy ``stream_generate`` after the prompt (median of
--repeats after a warm-up). Quantization is mlx-lm's ``quantize_model`` with the model's
``quant_predicate`` (the decay gate stays fp32) at --group-size; weights only, the recurrent
state stays fp32. Needs the mlx-lm extra.
"""

from __future__ import annotations

import statistics

import click
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from common import machine_description, machine_line, now, write_report
from mlx.utils import tree_flatten

from llm import load, stream_generate
from power_retention.cpu_tuning import tune_process

PRECISIONS = ("fp32", "bf16", "8-bit", "4-bit")


def in_precision(directory, precision: str, group_size: int):
    from mlx_lm.utils import quantize_model

    model, tokenizer = load(directory)
    if precision == "bf16":
        model.set_dtype(mx.bfloat16)
    elif precision.endswith("-bit"):
        model, _ = quantize_model(model, {}, group_size=group_size, bits=int(precision[:-4]))
    mx.eval(model.parameters())
    return model, tokenizer


def validation_loss(model, windows: np.ndarray) -> float:
    losses = []
    for window in windows:
        tokens = mx.array(window[None])
        logits = model(tokens[:, :-1]).astype(mx.float32)
        losses.append(nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean").item())
    return float(np.mean(losses))


def decode_tps(model, tokenizer, prompt: str, tokens: int, repeats: int) -> float:
    speeds = []
    for _ in range(repeats + 1):  # the first is the warm-up
        last = list(stream_generate(model, tokenizer, prompt, tokens, temperature=0))[-1]
        speeds.append(last.generation_tps)
    return statistics.median(speeds[1:])


@click.command()
@click.option("--model", "directory", required=True, help="a saved model directory")
@click.option("--data", required=True, help="a text file; its last --held-out share is scored")
@click.option("--held-out", default=0.1, show_default=True)
@click.option("--windows", default=32, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--decode-tokens", default=200, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--group-size", default=64, show_default=True)
@click.option("--out", default=None, help="JSON path (default benchmarks/results/quantized-DATE.json)")
def main(directory, data, held_out, windows, seq_len, decode_tokens, repeats, group_size, out):
    tune_process()
    started = now()
    text = open(data, encoding="utf-8").read()
    held = text[int(len(text) * (1 - held_out)):]
    _, tokenizer = load(directory)
    ids = np.array(tokenizer.encode(held), dtype=np.int32)
    starts = np.linspace(0, len(ids) - seq_len - 1, windows).astype(int)
    scored = np.stack([ids[s:s + seq_len + 1] for s in starts])
    prompt = held[:200]
    rows = []
    for precision in PRECISIONS:
        model, tokenizer = in_precision(directory, precision, group_size)
        weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        rows.append({"precision": precision, "val_loss": validation_loss(model, scored),
                     "decode_tps": decode_tps(model, tokenizer, prompt, decode_tokens, repeats),
                     "weight_bytes": weights})
        print(rows[-1])
    machine = machine_description()
    table = [f"{directory}, {len(scored)} windows of {seq_len} tokens; {machine_line(machine)}", "",
             "| precision | validation loss | decode tokens/s | weights |",
             "|---|---|---|---|"]
    base = rows[0]
    for row in rows:
        table.append(f"| {row['precision']} | {row['val_loss']:.4f} ({row['val_loss'] - base['val_loss']:+.4f})"
                     f" | {row['decode_tps']:.0f} ({row['decode_tps'] / base['decode_tps']:.2f}x)"
                     f" | {row['weight_bytes'] / 2**20:.2f} MiB |")
    print("\n".join(table))
    path = write_report("bench_quantized", started, {"model": directory, "rows": rows,
                                                      "table": "\n".join(table)}, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
