"""Multi-query associative recall (Zoology's MQAR) across mixers, widths and learning rates.

    python benchmarks/eval_mqar.py                          # the whole default grid (hours)
    python benchmarks/eval_mqar.py --jobs 2                 # two cells at a time (2+ cores)
    python benchmarks/eval_mqar.py --tasks 8x64 --mixers p2,p2:conv_size=0 --seeds 0,1,2

Every cell trains a fresh 2-layer model (heads of --head-dim, SwiGLU MLP) on fresh batches
of ``llm.mqar.MQAR`` at every step, with the loss on the queried positions only, then
scores accuracy on a fixed held-out set. For each (task, mixer, width) the table takes the
learning rate with the best mean accuracy over seeds (Zoology sweeps learning rates the same
way) and gives the mean and the range over seeds. Results go to a JSON file (resumable: run
the same command again to finish an interrupted grid), a Markdown table and a PNG of
accuracy against state size (Zoology's plot) next to it.
"""

from __future__ import annotations

import json
import math
import time
from itertools import product

import click
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from common import RESULTS, machine_line, now
from harness import (Results, cell_model, format_spread, grid_options, publish, run_cells,
                     spread, state_floats)

from llm import ModelConfig, RetentionLLM, param_count
from llm.config import training_form
from llm.mqar import MQAR
from power_retention.cpu_tuning import tune_process

EVAL_BATCH = 250  # held-out sequences per forward pass


def parse_task(text: str) -> tuple[int, int]:
    pairs, _, seq_len = text.partition("x")
    if not (pairs.isdigit() and seq_len.isdigit()):
        raise click.BadParameter(f"expected PAIRSxLENGTH such as 8x64, got {text!r}", param_hint="--tasks")
    return int(pairs), int(seq_len)


def make_optimizer(lr: float, steps: int, warmup: int, weight_decay: float):
    """AdamW, linear warmup then cosine decay to lr / 10; no decay on gains and biases."""
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr / warmup, lr, warmup), optim.cosine_decay(lr, steps - warmup, lr / 10)],
        [warmup])
    return optim.MultiOptimizer([optim.AdamW(schedule, weight_decay=weight_decay),
                                 optim.AdamW(schedule, weight_decay=0.0)],
                                [lambda path, p: p.ndim == 2])


def query_positions(mask: np.ndarray) -> np.ndarray:
    """(B, N) positions of the N queries of each sequence."""
    rows, columns = np.nonzero(mask)
    return columns.reshape(mask.shape[0], -1).astype(np.int32)


def recall_logits(model, inputs, positions):
    """Logits at the queried positions only: (B, N, vocab)."""
    hidden = model.hidden_states(inputs)
    return model.logits(mx.take_along_axis(hidden, positions[..., None], axis=1))


def accuracy(model, test) -> float:
    inputs, targets, mask = test
    positions = query_positions(mask)
    answers = np.take_along_axis(targets, positions, axis=1)
    correct = 0
    for start in range(0, len(inputs), EVAL_BATCH):
        piece = slice(start, start + EVAL_BATCH)
        logits = recall_logits(model, mx.array(inputs[piece]), mx.array(positions[piece]))
        correct += int((np.array(logits.argmax(axis=-1)) == answers[piece]).sum())
    return correct / answers.size


def train_cell(cell: dict) -> dict:
    """Train one model on one task; return its record."""
    started = time.perf_counter()
    mx.random.seed(cell["seed"])
    task = MQAR(cell["vocab"], cell["seq_len"], cell["pairs"], seed=cell["seed"])
    config = ModelConfig.from_dict(cell["model"])
    model = RetentionLLM(config)
    choice = training_form(config, cell["batch_size"], cell["seq_len"])  # as train.py takes it
    if choice is not None:
        model.set_retention_form(choice.method, choice.chunk_size)
    steps = cell["steps"]
    optimizer = make_optimizer(cell["lr"], steps, max(1, steps // 10), cell["weight_decay"])
    test = task.test_set(cell["test_size"])

    def loss_fn(model, inputs, answers, positions):
        logits = recall_logits(model, inputs, positions)
        return nn.losses.cross_entropy(logits, answers, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(inputs, answers, positions):
        loss, grads = loss_and_grad(model, inputs, answers, positions)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    curve, recent = [], []
    for index in range(1, steps + 1):
        inputs, targets, mask = task.batch(cell["batch_size"], index)
        positions = query_positions(mask)
        answers = np.take_along_axis(targets, positions, axis=1)
        loss = step(mx.array(inputs), mx.array(answers), mx.array(positions))
        mx.eval(state, loss)
        recent = (recent + [loss.item()])[-50:]
        if index % cell["eval_every"] == 0 or index == steps:
            curve.append({"step": index, "accuracy": accuracy(model, test),
                          "train_loss": float(np.mean(recent))})
    return {"cell": cell, "accuracy": curve[-1]["accuracy"], "train_loss": curve[-1]["train_loss"],
            "diverged": not math.isfinite(curve[-1]["train_loss"]), "curve": curve,
            "state_floats": state_floats(config, cell["seq_len"]), "parameters": param_count(config),
            "form": choice and choice.describe(), "seconds": time.perf_counter() - started}


def group_by_lr(records: list) -> dict:
    """{(pairs, seq_len, mixer, width): {lr: [records]}}."""
    groups = {}
    for record in records:
        c = record["cell"]
        groups.setdefault((c["pairs"], c["seq_len"], c["mixer"], c["width"]), {}) \
              .setdefault(c["lr"], []).append(record)
    return groups


def best_lrs(records: list, sweep_seeds: list) -> dict:
    """The learning rate with the best mean accuracy over ``sweep_seeds``, per (pairs,
    seq_len, mixer, width)."""
    best = {}
    for key, by_lr in group_by_lr(records).items():
        best[key] = max(by_lr, key=lambda lr: np.mean(
            [r["accuracy"] for r in by_lr[lr] if r["cell"]["seed"] in sweep_seeds]))
    return best


def summarize(records: list, sweep_seeds: list) -> dict:
    """{(pairs, seq_len, mixer, width): {"lr", "accuracy" spread over every seed at that lr,
    "state_floats", "parameters", "all_lrs"}} at the best learning rate of the sweep seeds."""
    summary = {}
    chosen = best_lrs(records, sweep_seeds)
    for key, by_lr in group_by_lr(records).items():
        runs = by_lr[chosen[key]]
        summary[key] = {"lr": chosen[key], "accuracy": spread([r["accuracy"] for r in runs]),
                        "state_floats": runs[0]["state_floats"], "parameters": runs[0]["parameters"],
                        "all_lrs": {str(l): spread([r["accuracy"] for r in rs]) for l, rs in by_lr.items()}}
    return summary


def markdown_table(summary: dict) -> str:
    tasks = sorted({(k[0], k[1]) for k in summary})
    mixers = list(dict.fromkeys(k[2] for k in summary))
    widths = sorted({k[3] for k in summary})
    head = "| mixer | width | " + " | ".join(f"{n} pairs, T={t}: accuracy (lr)" for n, t in tasks) + " |"
    lines = [head, "|" + "---|" * (2 + len(tasks))]
    for mixer, width in product(mixers, widths):
        cells = []
        for n, t in tasks:
            s = summary.get((n, t, mixer, width))
            cells.append("-" if s is None else f"{format_spread(s['accuracy'])} ({s['lr']:g})")
        lines.append(f"| {mixer} | {width} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, plt):
    """The figure of the table (``plt`` is matplotlib.pyplot)."""
    tasks = sorted({(k[0], k[1]) for k in summary})
    mixers = list(dict.fromkeys(k[2] for k in summary))
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for axis, (n, t) in zip(axes[0], tasks):
        for mixer in mixers:
            points = sorted((s["state_floats"], s["accuracy"]) for k, s in summary.items()
                            if k[:3] == (n, t, mixer))
            if not points:
                continue
            x = [p[0] for p in points]
            y = [p[1]["mean"] for p in points]
            error = [[p[1]["mean"] - p[1]["min"] for p in points], [p[1]["max"] - p[1]["mean"] for p in points]]
            axis.errorbar(x, y, yerr=error, marker="o", capsize=3, label=mixer)
        axis.set_xscale("log")
        axis.set_ylim(0, 1.02)
        axis.set_title(f"MQAR: {n} pairs, T={t}")
        axis.set_xlabel("state size (floats per sequence, all layers)")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    return figure


@click.command()
@click.option("--tasks", default="4x32,8x64,16x128", show_default=True, help="PAIRSxLENGTH, comma-separated")
@click.option("--mixers", default="softmax,softmax:conv_size=4,p1,p2,p4",
              show_default=True,
              help="softmax or pN, each optionally with :field=value settings (benchmarks/harness.py)")
@click.option("--widths", default="64", show_default=True, help="model widths, comma-separated")
@click.option("--lrs", default="1e-3,3e-3", show_default=True, help="learning rates swept per cell")
@click.option("--seeds", default="0,1", show_default=True)
@click.option("--sweep-seeds", default=0, show_default=True,
              help="sweep the learning rates on the first N seeds only, then train the other "
                   "seeds at the best rate of each cell (0: every seed at every rate)")
@click.option("--steps", default=2000, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--vocab", default=256, show_default=True)
@click.option("--layers", default=2, show_default=True)
@click.option("--head-dim", default=16, show_default=True)
@click.option("--weight-decay", default=0.1, show_default=True)
@click.option("--test-size", default=1000, show_default=True, help="held-out sequences")
@click.option("--eval-every", default=500, show_default=True)
@grid_options("mqar")
def main(tasks, mixers, widths, lrs, seeds, sweep_seeds, steps, batch_size, vocab, layers,
         head_dim, weight_decay, test_size, eval_every, jobs, out, report, cell):
    """Train and score every (task, mixer, width, learning rate, seed) cell."""
    tune_process()
    if cell:
        print(json.dumps(train_cell(json.loads(cell))))
        return
    started = now()
    settings = dict(steps=steps, batch_size=batch_size, vocab=vocab, layers=layers, head_dim=head_dim,
                    weight_decay=weight_decay, test_size=test_size, eval_every=eval_every)
    seed_list = [int(x) for x in seeds.split(",")]
    sweep = seed_list[:sweep_seeds] if 0 < sweep_seeds < len(seed_list) else seed_list
    shapes = list(product([parse_task(x) for x in tasks.split(",")], mixers.split(","),
                          [int(w) for w in widths.split(",")]))
    lr_list = [float(lr) for lr in lrs.split(",")]
    models = {}
    for (n, t), mixer, width in shapes:  # every mixer and shape is checked before anything trains
        models[(t, mixer, width)] = cell_model(mixer, vocab_size=vocab, width=width, layers=layers,
                                               head_dim=head_dim, seq_len=t)
        MQAR(vocab, t, n)

    def cell_of(n, t, mixer, width, lr, seed):
        return dict(settings, pairs=n, seq_len=t, mixer=mixer, width=width, lr=lr, seed=seed,
                    model=models[(t, mixer, width)])

    path = out or f"{RESULTS}/mqar-{started:%Y%m%d-%H%M}.json"
    results = Results(path, settings)

    def describe(r):
        c = r["cell"]
        return (f"{c['pairs']}x{c['seq_len']} {c['mixer']} width {c['width']} lr {c['lr']:g} seed "
                f"{c['seed']}: accuracy {r['accuracy']:.3f} ({r['seconds']:.0f} s)")

    grid = [cell_of(n, t, m, w, lr, seed) for (n, t), m, w in shapes for lr in lr_list for seed in sweep]
    run_cells(__file__, grid, results, jobs, describe)
    if sweep != seed_list:  # the other seeds at each cell's best rate
        best = best_lrs(results.records(grid), sweep)
        confirm = [cell_of(n, t, m, w, best[(n, t, m, w)], seed) for (n, t), m, w in shapes
                   for seed in seed_list if seed not in sweep]
        run_cells(__file__, confirm, results, jobs, describe)
        grid += confirm

    records = results.records(grid)
    summary = summarize(records, sweep)
    machine = results.data["machine"]
    hours = sum(r["seconds"] for r in records) / 3600
    protocol = (f"lr swept over {lrs} on seed{'s' if len(sweep) > 1 else ''} "
                f"{','.join(map(str, sweep))} (best by mean accuracy), seeds {seeds} at that lr"
                if sweep != seed_list else f"lr swept over {lrs} (best by mean accuracy over seeds "
                                           f"{seeds})")
    table = (f"MQAR, {layers} layers, heads of {head_dim}, vocab {vocab}, {steps} steps x batch "
             f"{batch_size}, {protocol}; accuracy on {test_size} held-out sequences, mean (min-max) "
             f"over seeds; {hours:.1f} h of training on {machine_line(machine)}\n\n"
             + markdown_table(summary))
    publish(table, path, report, lambda plt: plot(summary, plt))


if __name__ == "__main__":
    main()
