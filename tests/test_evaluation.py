"""The evaluation harness end to end, in real subprocesses: tiny MQAR and language-modelling
grids write their results, tables and plots, resume without rerunning a cell, and name bad
mixers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import parse_mixer  # noqa: E402


def run(script, *args, cwd=ROOT):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                            capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_mqar_grid_writes_table_plot_and_resumes(tmp_path):
    out = tmp_path / "mqar.json"
    args = ["--tasks", "2x16", "--mixers", "softmax,p2:gate_init=0.9", "--lrs", "1e-3,3e-3",
            "--seeds", "0,1", "--sweep-seeds", "1", "--steps", "4", "--batch-size", "8",
            "--test-size", "20", "--eval-every", "2", "--out", str(out)]
    first = run("eval_mqar.py", *args)
    records = json.loads(out.read_text())["cells"]
    # Two rates on seed 0 for each mixer, then seed 1 at each mixer's best rate.
    assert len(records) == 6
    for mixer in ("softmax", "p2:gate_init=0.9"):
        mine = [r for r in records if r["cell"]["mixer"] == mixer]
        assert sorted((r["cell"]["seed"], r["cell"]["lr"]) for r in mine)[:2] == [(0, 1e-3), (0, 3e-3)]
        assert [r["cell"]["seed"] for r in mine].count(1) == 1
        assert all(0 <= r["accuracy"] <= 1 and len(r["curve"]) == 2 for r in mine)
        # The power mixer trains in the form train.py would take (16 tokens: one chunk).
        assert {r["form"] for r in mine} == ({None} if mixer == "softmax" else {"attention (one chunk)"})
    assert "| p2:gate_init=0.9 | 64 |" in first
    assert out.with_suffix(".md").read_text().startswith("MQAR, 2 layers")
    assert out.with_suffix(".png").stat().st_size > 1000
    again = run("eval_mqar.py", *args)
    assert "4 of 4 cells already" in again and "2 of 2 cells already" in again
    assert len(json.loads(out.read_text())["cells"]) == 6
    # Another name for the same model finds its cells and labels the table with that name;
    # a cell computed with another chunk size is the same cell.
    saved = json.loads(out.read_text())
    for record in saved["cells"]:
        record["cell"]["model"]["chunk_size"] = 128
    out.write_text(json.dumps(saved))
    renamed = [arg.replace("p2:gate_init=0.9", "p2:conv_size=4:gate_init=0.9") for arg in args]
    relabelled = run("eval_mqar.py", *renamed, "--report", str(tmp_path / "renamed"))
    assert "4 of 4 cells already" in relabelled and "| p2:conv_size=4:gate_init=0.9 | 64 |" in relabelled
    assert len(json.loads(out.read_text())["cells"]) == 6
    # A cell trained when its mixer's name meant another model (older defaults) is not one of
    # today's: it trains again; attention does not read the power mixer's fields, so it does
    # not. Another grid's table can go elsewhere (--report).
    saved = json.loads(out.read_text())
    for mixer in ("power", "softmax"):
        first_cell = next(r["cell"] for r in saved["cells"] if r["cell"]["model"]["mixer"] == mixer
                          and r["cell"]["seed"] == 0)
        first_cell["model"]["gate_init"] = 0.5
    out.write_text(json.dumps(saved))
    third = run("eval_mqar.py", *args, "--report", str(tmp_path / "table"))
    assert "3 of 4 cells already" in third and len(json.loads(out.read_text())["cells"]) >= 7
    assert (tmp_path / "table.md").read_text().startswith("MQAR, 2 layers")
    assert (tmp_path / "table.png").is_file()


def test_lm_grid_trains_through_train_py(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                              for i in range(400)))
    out = tmp_path / "lm.json"
    printed = run("eval_lm.py", "--data", str(corpus), "--mixers", "p2:conv_size=0", "--seeds", "0",
                  "--steps", "6", "--width", "32", "--layers", "1", "--head-dim", "16",
                  "--seq-len", "16", "--batch-size", "2", "--eval-every", "3", "--eval-batches", "2",
                  "--out", str(out))
    [record] = json.loads(out.read_text())["cells"]
    assert [point["step"] for point in record["curve"]] == [0, 3, 6]
    assert record["val_loss"] < record["curve"][0]["val_loss"]
    assert "| p2:conv_size=0 |" in printed and out.with_suffix(".png").is_file()


@pytest.mark.parametrize("name,message", [
    ("p", "expected softmax or pN"), ("p0", "expected softmax or pN"), ("mamba", "expected softmax"),
    ("p2:conv_size", "not FIELD=VALUE"), ("p2:width=3", "not FIELD=VALUE with a ModelConfig field"),
], ids=["no-degree", "degree-0", "unknown", "no-value", "unknown-field"])
def test_bad_mixer_names(name, message):
    with pytest.raises(ValueError, match=message):
        parse_mixer(name)


def test_mixer_names():
    assert parse_mixer("softmax:conv_size=4") == {"mixer": "softmax", "conv_size": 4}
    assert parse_mixer("p4:rope=true:gate_init=0.9") == {"mixer": "power", "deg": 4, "rope": True,
                                                         "gate_init": 0.9}


def test_a_cell_saved_before_a_field_was_added_is_still_found():
    """A results file's cell whose model predates a field: the same cell when the field's
    default leaves the model as it was (document_start_id), another one when the missing
    field meant another model (conv_size, whose older default was 0)."""
    from harness import as_today, cell_model

    shape = dict(vocab_size=256, width=64, layers=2, head_dim=16, seq_len=64)
    today = {"mixer": "p2", "model": cell_model("p2", **shape)}
    older = {**today, "model": {k: v for k, v in today["model"].items() if k != "document_start_id"}}
    assert as_today(older) == today
    oldest = {**today, "model": {k: v for k, v in today["model"].items() if k != "conv_size"}}
    assert as_today(oldest) != today
