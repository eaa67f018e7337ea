"""What the mixer evaluations share: mixers by name, grids of cells run in worker processes
and kept in a resumable results file, and spreads over seeds.

A mixer is named ``softmax`` (attention with rotary embeddings, the baseline) or ``pN``
(power retention of degree N with the layer's defaults), optionally followed by ModelConfig
fields, each after a colon: ``p2:conv_size=0:gate_init=0.99``. Lists of mixers are
comma-separated. The name is also the label in tables.

A cell is one training run (a dict of JSON values, the model its mixer's name builds
included: ``cell_model``), identified by what it trains, not by its label: after a change of
defaults, ``p2`` finds the records of ``p2:gate_init=0.999`` when that is what ``p2`` now
builds, and the older records under the name that still builds their model. Each runs in its
own process (so a crash
or a leak cannot touch the others, and ``--jobs 2`` uses both cores of a small machine), and
its record is added to the results file as soon as it ends: an interrupted grid resumes
where it stopped when run again with the same results file.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

import click
from common import machine_description

from llm.atomic import write_atomic
from llm.config import ModelConfig, saved_config, state_floats_per_layer


def grid_options(name: str):
    """The options every grid's command has: --jobs, --out, --report and the hidden --cell
    (one cell in a worker process)."""
    options = [
        click.option("--jobs", default=1, show_default=True, help="cells run at once (one process each)"),
        click.option("--out", default="", help=f"results JSON (default benchmarks/results/{name}-DATE.json); "
                                               "an existing one with the same settings is resumed"),
        click.option("--report", default="", help="path of the table (.md) and plot (.png), without the "
                                                  "suffix (default: --out's); tables of several grids "
                                                  "can draw on one results file"),
        click.option("--cell", default="", hidden=True, help="run one cell (JSON) and print its record"),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def parse_mixer(name: str) -> dict:
    """ModelConfig fields of the mixer ``name`` (see the module docstring)."""
    base, *settings = name.split(":")
    if base == "softmax":
        fields = {"mixer": "softmax"}
    elif base[:1] == "p" and base[1:].isdigit() and int(base[1:]) >= 1:
        fields = {"mixer": "power", "deg": int(base[1:])}
    else:
        raise ValueError(f"mixer {name!r}: expected softmax or pN (N >= 1), optionally with "
                         f"':field=value' settings")
    for assignment in settings:
        field, equals, text = assignment.partition("=")
        if not equals or field not in ModelConfig.__dataclass_fields__:
            raise ValueError(f"mixer {name!r}: {assignment!r} is not FIELD=VALUE with a "
                             f"ModelConfig field")
        try:
            fields[field] = json.loads(text)
        except json.JSONDecodeError:
            fields[field] = text
    return fields


def small_config(mixer: str, *, vocab_size: int, width: int, layers: int, head_dim: int,
                 seq_len: int, mlp_ratio: float = 2.0) -> ModelConfig:
    """A small model with ``width // head_dim`` heads of ``head_dim`` and the mixer's fields."""
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
    heads = width // head_dim
    values = dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
                  intermediate_size=int(mlp_ratio * width), max_position_embeddings=seq_len)
    values.update(parse_mixer(mixer))
    return ModelConfig.from_dict(values, source=f"mixer {mixer!r}")


def cell_model(mixer: str, **shape) -> dict:
    """The model a mixer's name builds today, as JSON. Part of every cell, so that a results
    file never takes a cell trained under older defaults for one of today's."""
    return json.loads(json.dumps(small_config(mixer, **shape).to_dict()))


def as_today(cell: dict) -> dict:
    """A saved cell with its model read as a saved config.json is: a field added since, whose
    default leaves the model as it was, does not make an old cell another one (a field whose
    absence meant another model, such as an older default, still does)."""
    if "model" not in cell:
        return cell
    return {**cell, "model": json.loads(json.dumps(saved_config(cell["model"]).to_dict()))}


# ModelConfig fields only the power mixer reads: attention is the same model whatever they hold.
POWER_ONLY_FIELDS = ("deg", "gating", "gate_init", "output_norm")
# Fields that say how a model is computed, not what it computes (the chunk size changes the
# speed and the rounding only): a cell trained with another value is the same cell.
COMPUTATION_FIELDS = ("chunk_size",)


def unlabelled(cell: dict) -> dict:
    """What a cell trains: the cell without its mixer's name (its model says what it is), its
    model without the fields of how it is computed and, for attention, without the power
    mixer's fields (so a new power default keeps its cells)."""
    if "model" not in cell:
        return cell
    ignored = COMPUTATION_FIELDS + (POWER_ONLY_FIELDS if cell["model"].get("mixer") == "softmax" else ())
    model = {key: value for key, value in cell["model"].items() if key not in ignored}
    return {**{key: value for key, value in cell.items() if key != "mixer"}, "model": model}


def state_floats(config: ModelConfig, seq_len: int) -> int:
    """Floats a model keeps per sequence to continue it after ``seq_len`` tokens: recurrent
    states (power) or the KV cache (softmax), all layers: Zoology's 'state size'."""
    return config.num_hidden_layers * state_floats_per_layer(config, seq_len)


class Results:
    """A JSON file of the training settings every cell shares and one record per finished
    cell, rewritten atomically after each cell. Grids with the same settings can share a
    file: each table is made from the cells of its own grid."""

    def __init__(self, path: str, settings: dict):
        self.path = path
        if os.path.exists(path):
            with open(path) as file:
                saved = json.load(file)
            if saved.get("settings") != settings:
                changed = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                                 if settings.get(k) != saved.get("settings", {}).get(k))
                raise SystemExit(f"{path} holds cells trained with other settings ({', '.join(changed)}): "
                                 f"choose another --out, or rerun with the same settings to add to it")
            self.data = saved
        else:
            self.data = {"settings": settings, "machine": machine_description(), "cells": []}
        # What each record trained, in today's terms (``unlabelled``), worked out once.
        self.trained = [unlabelled(as_today(record["cell"])) for record in self.data["cells"]]

    def find(self, cell: dict):
        """The first record that trained ``cell`` (whatever its mixer was called), or None."""
        wanted = unlabelled(cell)
        return next((record for record, trained in zip(self.data["cells"], self.trained)
                     if trained == wanted), None)

    def done(self, cell: dict) -> bool:
        return self.find(cell) is not None

    def records(self, cells: list) -> list:
        """The records of ``cells``, in their order and under their labels (the file may hold
        other grids' cells too)."""
        found = [(cell, self.find(cell)) for cell in cells]
        return [{**record, "cell": {**record["cell"], "mixer": cell["mixer"]}}
                for cell, record in found if record is not None]

    def add(self, record: dict):
        self.data["cells"].append(record)
        self.trained.append(unlabelled(as_today(record["cell"])))
        self.write()

    def write(self):
        write_atomic(self.path, json.dumps(self.data, indent=1))


def run_cells(script: str, cells: list, results: Results, jobs: int, describe) -> None:
    """Run each cell not yet in ``results`` as ``python script --cell JSON`` (its last stdout
    line is its record), ``jobs`` at a time; add each record as it arrives."""
    todo, queued = [], []
    for cell in cells:  # two names for one model train once
        if not results.done(cell) and unlabelled(cell) not in queued:
            todo.append(cell)
            queued.append(unlabelled(cell))
    print(f"{len(cells) - len(todo)} of {len(cells)} cells already in {results.path}; "
          f"running {len(todo)}, {jobs} at a time", flush=True)
    env = dict(os.environ)
    if jobs > 1:  # the small products of these models gain nothing from a second BLAS thread
        env.setdefault("OPENBLAS_NUM_THREADS", "1")

    def run(cell):
        process = subprocess.run([sys.executable, script, "--cell", json.dumps(cell)],
                                 capture_output=True, text=True, env=env)
        if process.returncode != 0:
            raise RuntimeError(f"cell {cell} failed:\n{process.stderr[-3000:]}")
        return json.loads(process.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run, cell) for cell in todo]
        for index, future in enumerate(as_completed(futures), 1):
            record = future.result()
            results.add(record)
            print(f"[{index}/{len(todo)}] {describe(record)}", flush=True)


def publish(table: str, path: str, report: str, plot) -> None:
    """Print a grid's table and write it (.md) and its figure (``plot(matplotlib.pyplot)``,
    as .png, when matplotlib is installed) at ``report``, or beside the results file ``path``."""
    base = report.removesuffix(".md") or path.removesuffix(".json")
    with open(base + ".md", "w") as file:
        file.write(table + "\n")
    print(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nresults: {path}, {base}.md (matplotlib is not installed: no plot)")
        return
    figure = plot(plt)
    figure.tight_layout()
    figure.savefig(base + ".png", dpi=110)
    print(f"\nresults: {path}, {base}.md, {base}.png")


def spread(values: list) -> dict:
    """Mean, min, max and count of a metric over seeds."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "n": len(values)}


def format_spread(s: dict, digits: int = 3) -> str:
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (1 seed)"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"
