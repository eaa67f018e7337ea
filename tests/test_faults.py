"""Damaged files and failed writes, in real train.py subprocesses: a run never continues from a
damaged checkpoint, says what it lost, and a write that fails is one line naming the file."""

import os
import resource
import shutil
import subprocess

import pytest

from tests.helpers import bound_by_file_permissions
from tests.test_train import ROOT, TRAIN, kill_after, losses, run, small_run


def _trained(tmp_path, steps=30):
    """A run of ``steps`` steps, checkpointed every 5 (last at ``steps``, previous 5 before)."""
    out = tmp_path / "run"
    result = run(small_run(tmp_path, out, steps=steps))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def _resume(out, steps=30, limit=None, preexec_fn=None):
    """``train.py --resume``; ``limit``: writes past that many bytes per file fail (EFBIG), a
    full disk without root (Python ignores SIGXFSZ, so the write returns an error)."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([*TRAIN, "--resume", str(out), "--steps", str(steps)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size if limit else preexec_fn)


def _flip_bytes(path, count=16):
    """Invert ``count`` bytes in the middle of the file (inside the tensor data, past the header)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def _assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


DAMAGE = {
    "flipped-weights": (lambda last: _flip_bytes(last / "model" / "model.safetensors"),
                        "model.safetensors is damaged"),
    "truncated-optimizer": (lambda last: os.truncate(last / "optimizer.safetensors", 100),
                            "optimizer.safetensors is damaged"),
    "missing-trainer-state": (lambda last: (last / "trainer_state.json").unlink(),
                              "trainer_state.json is missing"),
    "flipped-trainer-state": (lambda last: _flip_bytes(last / "trainer_state.json", count=1),
                              "trainer_state.json is damaged"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_never_resumed_from(tmp_path, damage):
    """Damage to the last and best checkpoints (both at step 30): the resume says so, continues
    from the previous one at step 25 and trains steps 26-30 again, to the same losses."""
    out = _trained(tmp_path)
    original = losses(out)
    harm, message = DAMAGE[damage]
    for name in ("last", "best"):
        harm(out / "checkpoints" / name)
    result = _resume(out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert message in result.stdout
    assert "resuming from checkpoints/previous at step 25" in result.stdout
    assert losses(out) == original


def test_the_newest_intact_checkpoint_is_resumed_from(tmp_path):
    """Only the last checkpoint damaged: the best one holds the same step 30, and is used."""
    out = _trained(tmp_path)
    _flip_bytes(out / "checkpoints" / "last" / "optimizer.safetensors")
    result = _resume(out, steps=35)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "optimizer.safetensors is damaged" in result.stdout
    assert "resuming from checkpoints/best at step 30" in result.stdout


def test_flipped_weights_are_refused_by_load(tmp_path):
    from llm import load
    from llm.atomic import DamagedFileError

    out = _trained(tmp_path, steps=10)
    _flip_bytes(out / "checkpoints" / "last" / "model" / "model.safetensors")
    with pytest.raises(DamagedFileError, match=r"model\.safetensors is damaged"):
        load(out / "checkpoints" / "last" / "model")


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    out = _trained(tmp_path)
    for name in ("last", "previous", "best"):
        (out / "checkpoints" / name / "trainer_state.json").unlink()
    result = _resume(out)
    _assert_one_line_error(result, "no intact checkpoint in", "trainer_state.json is missing")


def test_a_torn_last_metrics_line_is_repaired_with_a_message(tmp_path):
    out = _trained(tmp_path)
    original = losses(out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "lo')
    result = _resume(out, steps=35)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metrics.jsonl: dropped its last line, torn by an interrupted write" in result.stdout
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 36))
    assert all(resumed[s] == original[s] for s in range(1, 31))


def test_a_full_disk_is_one_line_and_the_run_resumes_exactly(tmp_path):
    """Killed after its checkpoint at step 10, resumed on a disk that fills at the next save:
    one line naming what could not be written, the checkpoint at step 10 intact, and a later
    resume ends with the losses of a run never interrupted."""
    reference = _trained(tmp_path / "reference", steps=20)
    out = tmp_path / "run"
    kill_after(small_run(tmp_path, out, steps=20), out, 12)
    result = _resume(out, steps=20, limit=64 * 1024)  # a checkpoint's files are larger
    _assert_one_line_error(result, "cannot write", "checkpoints/last:", "Unable to write")
    assert (out / "checkpoints" / "last" / "trainer_state.json").is_file()
    result = _resume(out, steps=20)
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(out) == losses(reference)


def test_a_read_only_run_directory_is_one_line(tmp_path):
    out = _trained(tmp_path, steps=10)
    for path in [out, *out.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    try:
        result = _resume(out, steps=15, preexec_fn=bound_by_file_permissions())
    finally:
        for path in [out, *out.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
    _assert_one_line_error(result, "cannot write", "Permission denied")
    shutil.rmtree(out)
