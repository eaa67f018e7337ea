"""Language modelling across mixers at equal width, depth, steps, batch and schedule.

    python benchmarks/eval_lm.py                                  # the standard library's source
    python benchmarks/eval_lm.py --data tinyshakespeare.txt       # the classic char-level corpus
    python benchmarks/eval_lm.py --mixers softmax,p2,p2:conv_size=0 --steps 1000,2000 --jobs 2

Every cell is one run of ``train.py`` (the guarded trainer users run, with its validation
split by document and its fixed validation windows spread over the whole split), byte-level
(character-level for ASCII text) by default, on a small model set with ``--set``: width,
depth and heads are the same for every mixer, so the models differ only in their mixers
(a few hundred parameters of gates, norms and convolutions; the table gives the counts).
The table gives the validation loss at the end of each run, mean and range over seeds, and
the plot the validation curves. Results go to a resumable JSON file, a Markdown table and a
PNG next to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

import click
import numpy as np
from common import RESULTS, machine_line, now
from harness import (Results, cell_model, format_spread, grid_options, parse_mixer, publish,
                     run_cells, spread)

from llm.data import DEFAULT_DATA
from power_retention.cpu_tuning import tune_process

TRAIN = str(Path(__file__).resolve().parent.parent / "train.py")


def train_cell(cell: dict) -> dict:
    """One run of train.py; its validation curve and summary."""
    started = time.perf_counter()
    fields = {name: cell["model"][name] for name in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "max_position_embeddings")}
    fields.update(parse_mixer(cell["mixer"]))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        command = [sys.executable, TRAIN, "--model", "ultra-tiny", "--data", cell["data"],
                   "--tokenizer", cell["tokenizer"], "--steps", str(cell["steps"]),
                   "--batch-size", str(cell["batch_size"]), "--seq-len", str(cell["seq_len"]),
                   "--lr", str(cell["lr"]), "--min-lr", str(cell["lr"] / 10),
                   "--warmup", str(max(1, cell["steps"] // 10)), "--seed", str(cell["seed"]),
                   "--eval-every", str(cell["eval_every"]), "--eval-batches", str(cell["eval_batches"]),
                   "--save-every", str(cell["steps"]), "--patience", "0", "--out", str(out)]
        for name, value in fields.items():
            command += ["--set", f"{name}={json.dumps(value)}"]
        process = subprocess.run(command, capture_output=True, text=True)
        if process.returncode != 0:
            raise RuntimeError(f"train.py failed:\n{process.stdout[-2000:]}\n{process.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": m["step"], "val_loss": m["val_loss"], "train_loss": m.get("train_loss")}
             for m in metrics if "val_loss" in m]
    return {"cell": cell, "val_loss": curve[-1]["val_loss"], "train_loss": curve[-1]["train_loss"],
            "curve": curve, "parameters": summary["parameters"], "tokens_per_s": summary["tokens_per_s"],
            "seconds": time.perf_counter() - started}


def summarize(records: list) -> dict:
    """{(mixer, steps): {"val_loss", "train_loss" spreads, "parameters", "curves"}}."""
    groups = {}
    for record in records:
        groups.setdefault((record["cell"]["mixer"], record["cell"]["steps"]), []).append(record)
    return {key: {"val_loss": spread([r["val_loss"] for r in runs]),
                  "train_loss": spread([r["train_loss"] for r in runs]),
                  "parameters": runs[0]["parameters"],
                  "curves": [r["curve"] for r in runs]}
            for key, runs in groups.items()}


def markdown_table(summary: dict) -> str:
    mixers = list(dict.fromkeys(k[0] for k in summary))
    budgets = sorted({k[1] for k in summary})
    reference = {b: summary.get(("softmax", b)) for b in budgets}
    lines = ["| mixer | parameters | " + " | ".join(
        f"validation loss at {b} steps | vs softmax | training loss at {b}" for b in budgets) + " |",
        "|" + "---|" * (2 + 3 * len(budgets))]
    for mixer in mixers:
        cells = []
        for b in budgets:
            s = summary.get((mixer, b))
            if s is None:
                cells += ["-", "-", "-"]
                continue
            ref = reference[b]
            delta = "-" if ref is None else f"{s['val_loss']['mean'] - ref['val_loss']['mean']:+.3f}"
            cells += [format_spread(s["val_loss"]), delta, format_spread(s["train_loss"])]
        params = next(summary[(mixer, b)]["parameters"] for b in budgets if (mixer, b) in summary)
        lines.append(f"| {mixer} | {params:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, plt):
    """The figure of the table (``plt`` is matplotlib.pyplot)."""
    budgets = sorted({k[1] for k in summary})
    figure, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4), squeeze=False)
    for axis, budget in zip(axes[0], budgets):
        for (mixer, steps), s in summary.items():
            if steps != budget:
                continue
            curves = s["curves"]
            x = [point["step"] for point in curves[0]]
            losses = np.array([[point["val_loss"] for point in curve] for curve in curves])
            line, = axis.plot(x[1:], losses.mean(axis=0)[1:], marker=".", label=mixer)
            axis.fill_between(x[1:], losses.min(axis=0)[1:], losses.max(axis=0)[1:],
                              color=line.get_color(), alpha=0.2)
        axis.set_title(f"validation loss, {budget} steps (range over seeds)")
        axis.set_xlabel("step")
        axis.set_ylabel("nats per token")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return figure


@click.command()
@click.option("--data", default=DEFAULT_DATA, show_default=True, help="train.py --data: a text file, "
              "directory, glob or jsonl; default: this Python's standard library source")
@click.option("--tokenizer", default="byte", show_default=True, help="train.py --tokenizer")
@click.option("--mixers", default="softmax,softmax:conv_size=4,p1,p2,p4",
              show_default=True,
              help="softmax or pN, each optionally with :field=value settings (benchmarks/harness.py)")
@click.option("--seeds", default="0,1", show_default=True)
@click.option("--steps", default="1000", show_default=True, help="training budgets, comma-separated")
@click.option("--width", default=128, show_default=True)
@click.option("--layers", default=4, show_default=True)
@click.option("--head-dim", default=32, show_default=True)
@click.option("--seq-len", default=64, show_default=True)
@click.option("--batch-size", default=12, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--eval-every", default=100, show_default=True)
@click.option("--eval-batches", default=50, show_default=True)
@grid_options("lm")
def main(data, tokenizer, mixers, seeds, steps, width, layers, head_dim, seq_len, batch_size, lr,
         eval_every, eval_batches, jobs, out, report, cell):
    """Train every (mixer, steps, seed) cell with train.py and compare validation losses."""
    tune_process()
    if cell:
        print(json.dumps(train_cell(json.loads(cell))))
        return
    started = now()
    settings = dict(data=data, tokenizer=tokenizer,
                    width=width, layers=layers, head_dim=head_dim, seq_len=seq_len,
                    batch_size=batch_size, lr=lr, eval_every=eval_every, eval_batches=eval_batches)
    models = {m: cell_model(m, vocab_size=256, width=width, layers=layers, head_dim=head_dim,
                            seq_len=seq_len) for m in mixers.split(",")}
    grid = [dict(settings, mixer=m, model=models[m], steps=int(b), seed=int(s))
            for m, b, s in product(mixers.split(","), steps.split(","), seeds.split(","))]
    name = Path(data).stem if os.path.exists(data) else data.replace(":", "-")
    path = out or f"{RESULTS}/lm-{name}-{started:%Y%m%d-%H%M}.json"
    results = Results(path, settings)
    run_cells(__file__, grid, results, jobs, lambda r: (
        f"{r['cell']['mixer']} {r['cell']['steps']} steps seed {r['cell']['seed']}: validation loss "
        f"{r['val_loss']:.4f} (training {r['train_loss']:.4f}; {r['seconds']:.0f} s)"))

    records = results.records(grid)
    summary = summarize(records)
    hours = sum(r["seconds"] for r in records) / 3600
    table = (f"Language modelling on {data} ({tokenizer} tokens), {layers} layers x {width}, heads "
             f"of {head_dim}, {batch_size} x {seq_len} tokens per step, lr {lr} (warmup, cosine to "
             f"lr/10), seeds {seeds}; validation loss at the last step, mean (min-max) over seeds; "
             f"{hours:.1f} h of training on {machine_line(results.data['machine'])}\n\n"
             + markdown_table(summary))
    publish(table, path, report, lambda plt: plot(summary, plt))


if __name__ == "__main__":
    main()
