"""Two adapters over one base, and a router between them: does each adapter learn its task,
does the router send each prompt to the right adapter, and what memory does one base with
two adapters take against two fine-tuned models?

    python benchmarks/eval_adapters.py                       # pretrain a base, then everything
    python benchmarks/eval_adapters.py --base runs/X/checkpoints/best/model --seeds 0

Two string transformations with different answer formats, on random lowercase words (train,
validation and test words disjoint): "upper abc =" -> " ABC." and "spell abc =" -> " a-b-c!".
For each seed, `train.py finetune` trains one LoRA adapter per task (completion-only loss,
early stopping on the validation file); then, over one base (``llm.route.AdapterSet``):
held-out exact match (greedy) of the base, of each adapter on both tasks, and of the routed
setup on the mixed test prompts; routing accuracy by keyword rules and by the nearest
centroid of each adapter's training prompts; and, in fresh processes, the peak memory of
answering every test prompt with the routed setup against two fused models.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
from common import RESULTS, machine_description, machine_line, now
from harness import format_spread, spread

ROOT = Path(__file__).resolve().parent.parent
TASKS = {
    "upper": (lambda word: f"upper {word} =", lambda word: f" {word.upper()}."),
    "spell": (lambda word: f"spell {word} =", lambda word: " " + "-".join(word) + "!"),
}
RULES = [{"adapter": "upper", "keywords": ["upper"]}, {"adapter": "spell", "keywords": ["spell"]}]
SPLITS = {"train": 800, "val": 100, "test": 200}  # words per task


def python(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result


def write_tasks(directory: Path, seed: int) -> dict:
    """{task: {split: jsonl path}}, every word used once across tasks and splits."""
    rng = random.Random(seed)
    needed = len(TASKS) * sum(SPLITS.values())
    words = set()
    while len(words) < needed:
        words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5))))
    words = sorted(words)
    rng.shuffle(words)
    files = {}
    for task, (prompt, completion) in TASKS.items():
        files[task] = {}
        for split, count in SPLITS.items():
            chosen, words = words[:count], words[count:]
            path = directory / f"{task}-{split}.jsonl"
            path.write_text("".join(json.dumps({"prompt": prompt(w), "completion": completion(w)}) + "\n"
                                    for w in chosen))
            files[task][split] = path
    return files


def read_pairs(path: Path) -> list[tuple[str, str]]:
    return [(r["prompt"], r["completion"]) for r in map(json.loads, path.read_text().splitlines())]


def exact_match(adapter_set, name, pairs) -> float:
    from llm import generate

    adapter_set.use(name)
    hits = sum(generate(adapter_set.model, adapter_set.tokenizer, prompt, len(answer) + 4).strip()
               == answer.strip() for prompt, answer in pairs)
    return hits / len(pairs)


def evaluate_seed(base: Path, runs: dict, files: dict) -> dict:
    """Exact match and routing of one seed's adapters."""
    from llm.route import AdapterSet, Router

    adapter_set = AdapterSet(base, runs)
    tests = {task: read_pairs(files[task]["test"]) for task in TASKS}
    result = {"exact_match": {}, "routing": {}}
    for name in [None, *TASKS]:
        result["exact_match"][name or "base"] = {task: exact_match(adapter_set, name, tests[task])
                                                for task in TASKS}
    mixed = [(prompt, answer, task) for task in TASKS for prompt, answer in tests[task]]
    by_rules = Router(adapter_set, RULES)
    by_centroid = Router(adapter_set)
    by_centroid.fit_centroids()
    for label, router in (("rules", by_rules), ("centroid", by_centroid)):
        result["routing"][label] = float(np.mean([router.route(p).adapter == t for p, _, t in mixed]))
    hits = 0
    for prompt, answer, _ in mixed:
        text, _ = by_centroid.generate(prompt, len(answer) + 4)
        hits += text.strip() == answer.strip()
    result["exact_match"]["routed (centroid)"] = {"mixed": hits / len(mixed)}
    result["memory_bytes"] = adapter_set.memory()
    return result


def measure(setup: str, base: Path, runs: dict, fused: dict, files: dict) -> dict:
    """Peak memory of answering every test prompt, in this (fresh) process."""
    import mlx.core as mx

    from llm import generate, load
    from llm.route import AdapterSet, Router

    mx.reset_peak_memory()
    pairs = [(p, a, task) for task in TASKS for p, a in read_pairs(files[task]["test"])]
    if setup == "routed":
        router = Router(AdapterSet(base, runs), RULES)
        for prompt, answer, _ in pairs:
            router.generate(prompt, len(answer) + 4)
    else:
        models = {task: load(path) for task, path in fused.items()}  # both held, as two servers would
        for prompt, answer, task in pairs:
            generate(*models[task], prompt, len(answer) + 4)
    return {"setup": setup, "peak_bytes": mx.get_peak_memory()}


def markdown(report: dict) -> str:
    seeds = report["seeds"]
    rows = ["| model | " + " | ".join(f"{task}: exact match" for task in TASKS) + " |", "|---|---|---|"]
    for name in ["base", *TASKS]:
        cells = [format_spread(spread([seeds[s]["exact_match"][name][t] for s in seeds])) for t in TASKS]
        rows.append(f"| {name if name == 'base' else name + ' adapter'} | " + " | ".join(cells) + " |")
    routed = spread([seeds[s]["exact_match"]["routed (centroid)"]["mixed"] for s in seeds])
    rows.append(f"| routed by nearest centroid (both tasks mixed) | {format_spread(routed)} | |")
    lines = ["\n".join(rows), "",
             "| router | routing accuracy (held-out prompts, both tasks) |", "|---|---|"]
    for label in ("rules", "centroid"):
        lines.append(f"| {label} | {format_spread(spread([seeds[s]['routing'][label] for s in seeds]))} |")
    memory = report["memory"]
    first = seeds[next(iter(seeds))]["memory_bytes"]
    lines += ["", "| setup | weights held | peak memory answering every test prompt |", "|---|---|---|",
              f"| one base + {len(TASKS)} adapters (routed) | {first['total'] / 1e6:.3f} MB "
              f"| {memory['routed']['peak_bytes'] / 1e6:.1f} MB |",
              f"| {len(TASKS)} fused models | {first['separate_models'] / 1e6:.3f} MB "
              f"| {memory['fused']['peak_bytes'] / 1e6:.1f} MB |"]
    return "\n".join(lines)


@click.command()
@click.option("--base", type=click.Path(exists=True, file_okay=False), default=None,
              help="base model directory (default: pretrain ultra-tiny on byte-level stdlib source)")
@click.option("--base-steps", default=1500, show_default=True)
@click.option("--steps", default=800, show_default=True, help="fine-tuning steps per adapter")
@click.option("--rank", default=16, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seeds", default="0,1", show_default=True)
@click.option("--workdir", default="", help="where runs go (default runs/eval-adapters-DATE)")
@click.option("--out", default="", help="results JSON (default benchmarks/results/adapters-DATE.json)")
@click.option("--measure", "measure_setup", type=click.Choice(["routed", "fused"]), default=None, hidden=True)
@click.option("--context", default="", hidden=True, help="JSON of a measurement's inputs")
def main(base, base_steps, steps, rank, lr, seeds, workdir, out, measure_setup, context):
    from power_retention.cpu_tuning import tune_process

    tune_process()
    if measure_setup:
        values = json.loads(context)
        print(json.dumps(measure(measure_setup, Path(values["base"]), values["runs"], values["fused"],
                                 {t: {k: Path(v) for k, v in f.items()} for t, f in values["files"].items()})))
        return
    started = now()
    workdir = Path(workdir or ROOT / "runs" / f"eval-adapters-{started:%Y%m%d-%H%M}")
    workdir.mkdir(parents=True, exist_ok=True)
    files = write_tasks(workdir, seed=0)
    clock = time.perf_counter()
    if base is None:
        print(f"pretraining the base: ultra-tiny, byte tokens, {base_steps} steps", flush=True)
        python("train.py", "--model", "ultra-tiny", "--tokenizer", "byte", "--steps", base_steps,
               "--patience", "0", "--out", workdir / "base")
        base = workdir / "base" / "checkpoints" / "best" / "model"
    base = Path(base).resolve()
    report = {"base": str(base), "steps": steps, "rank": rank, "lr": lr, "seeds": {}, "tasks": list(TASKS)}
    for seed in [int(s) for s in seeds.split(",")]:
        runs = {}
        for task in TASKS:
            runs[task] = workdir / f"{task}-seed{seed}"
            if not (runs[task] / "summary.json").is_file():
                print(f"fine-tuning {task}, seed {seed}", flush=True)
                python("train.py", "finetune", base, "--data", files[task]["train"], "--val-data",
                       files[task]["val"], "--steps", steps, "--rank", rank, "--lr", lr, "--seed", seed,
                       "--batch-size", 16, "--seq-len", 64, "--eval-every", 100, "--out", runs[task])
        report["seeds"][str(seed)] = evaluate_seed(base, {t: str(r) for t, r in runs.items()}, files)
        print(json.dumps(report["seeds"][str(seed)]), flush=True)
    first = next(iter(report["seeds"]))
    runs = {task: str(workdir / f"{task}-seed{first}") for task in TASKS}
    fused = {}
    for task, run in runs.items():
        fused[task] = str(workdir / f"fused-{task}-seed{first}")
        python("train.py", "fuse", run, "--out", fused[task])
    context = json.dumps({"base": str(base), "runs": runs, "fused": fused,
                          "files": {t: {k: str(v) for k, v in f.items()} for t, f in files.items()}})
    report["memory"] = {setup: json.loads(python(__file__, "--measure", setup, "--context", context)
                                          .stdout.strip().splitlines()[-1]) for setup in ("routed", "fused")}
    report["hours"] = (time.perf_counter() - clock) / 3600
    machine = machine_description()
    table = markdown(report)
    out = out or os.path.join(RESULTS, f"adapters-{started:%Y%m%d-%H%M}.json")
    with open(out, "w") as file:
        json.dump({"date": started.isoformat(timespec="seconds"), "machine": machine, **report}, file, indent=1)
    with open(out.removesuffix(".json") + ".md", "w") as file:
        file.write(f"{machine_line(machine)}; {report['hours'] * 60:.0f} min\n\n{table}\n")
    print(table)
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
