"""Our model directories in mlx-lm, and mlx-lm's back here: generate, tokenizer files, 4-bit
conversion, prompt caches, LoRA and fuse. Real mlx-lm, in real subprocesses where a user would
run its commands."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlx.core as mx
import pytest

from llm import (ByteTokenizer, RetentionLLM, create_model_config, load, load_tokenizer, stream_generate,
                 train_tokenizer)
from tests.test_tokenizer import SAMPLES, VOCAB_SIZE, make_corpus
from tests.test_train import ROOT, TRAIN, corpus

mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is the optional extra 'mlx-lm' (pip install -e '.[dev]')")


def run_mlx_lm(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "mlx_lm", *map(str, args), "--trust-remote-code"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def generated_text(stdout: str) -> str:
    """What ``mlx_lm generate`` printed between its rulers (it adds one newline)."""
    text = stdout.split("==========\n", 1)[1].rsplit("\n==========", 1)[0]
    return text


def our_text(model, tokenizer, prompt, max_tokens) -> str:
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, temperature=0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """ultra-tiny trained for 150 steps on a small code corpus: a model whose greedy text is
    not one repeated byte."""
    tmp = tmp_path_factory.mktemp("trained")
    result = subprocess.run([*TRAIN, "--model", "ultra-tiny", "--data", str(corpus(tmp / "corpus")),
                             "--tokenizer", "byte", "--steps", "150", "--batch-size", "8",
                             "--seq-len", "64", "--eval-every", "150", "--out", str(tmp / "run"),
                             "--cache-dir", str(tmp / "cache")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run" / "checkpoints" / "last" / "model"


PROMPT = "def function_3(x3):\n    value_0 = compute("


@pytest.mark.parametrize("prefill_step", [0, 16], ids=["one-prefill", "prefill-in-steps-of-16"])
def test_mlx_lm_generate_writes_what_ours_writes(trained, prefill_step):
    """Greedy text from ``mlx_lm generate`` equals ours; in steps of 16 the 40-token prompt's
    state is carried across three prefill calls."""
    model, tokenizer = load(trained)
    extra = ["--prefill-step-size", prefill_step] if prefill_step else []
    stdout = run_mlx_lm("generate", "--model", trained, "--temp", "0", "--max-tokens", "48",
                        "--prompt", PROMPT, *extra)
    ours = our_text(model, tokenizer, PROMPT, 48)
    assert len(set(ours)) > 3, ours  # a model that has learned something
    assert generated_text(stdout) == ours


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_hugging_face_tokenizer_gives_our_ids_and_text(kind, tmp_path):
    """AutoTokenizer on the saved files (what mlx-lm loads): the ids ours gives, bos first, and
    the same text back, on every sample of the tokenizer tests; after Hugging Face writes the
    files again (as mlx-lm's convert and fuse do), ours still loads them."""
    from transformers import AutoTokenizer

    ours = ByteTokenizer() if kind == "byte" else train_tokenizer(make_corpus(), VOCAB_SIZE)
    ours.save(tmp_path / "saved")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    for name, text in SAMPLES.items():
        ids = ours.encode(text, add_bos=True)
        assert theirs.encode(text) == ids, name
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids), name
    theirs.save_pretrained(str(tmp_path / "rewritten"))
    again = load_tokenizer(tmp_path / "rewritten")
    assert all(again.encode(text) == ours.encode(text) for text in SAMPLES.values())


def test_a_4_bit_conversion_loads_here_with_the_gate_in_full_precision(trained, tmp_path):
    run_mlx_lm("convert", "--hf-path", trained, "--mlx-path", tmp_path / "q4", "-q", "--q-bits", "4",
               "--q-group-size", "32")
    model, tokenizer = load(tmp_path / "q4")
    mixer = model.layers[0].mixer
    assert type(mixer.q_proj).__name__ == "QuantizedLinear" and mixer.q_proj.bits == 4
    assert type(mixer.gate_proj).__name__ == "Linear"  # the decay gate is not quantized
    theirs, _ = mlx_lm.load(str(tmp_path / "q4"), trust_remote_code=True)
    tokens = mx.array([tokenizer.encode(PROMPT, add_bos=True)])
    assert mx.array_equal(model(tokens), theirs(tokens)).item()
    stdout = run_mlx_lm("generate", "--model", tmp_path / "q4", "--temp", "0", "--max-tokens", "24",
                        "--prompt", PROMPT)
    assert generated_text(stdout) == our_text(model, tokenizer, PROMPT, 24)
    # Saved again here, it stays quantized (config.json records how) and loads the same.
    model.save_pretrained(tmp_path / "again", tokenizer)
    again, _ = load(tmp_path / "again")
    assert type(again.layers[0].mixer.q_proj).__name__ == "QuantizedLinear"
    assert mx.array_equal(again(tokens), model(tokens)).item()


@pytest.mark.parametrize("mixer,conv_size", [("power", 4), ("power", 0), ("softmax", 0), ("softmax", 3)],
                         ids=["power", "power-conv0", "softmax", "softmax-conv3"])
def test_a_prompt_cache_saved_by_mlx_lm_continues_exactly(mixer, conv_size, tmp_path):
    """Our caches through mlx-lm's save_prompt_cache / load_prompt_cache (which rebuild
    mlx-lm's own cache classes by name): the next logits equal those of the cache never saved."""
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    mx.random.seed(0)
    model = RetentionLLM(create_model_config("ultra-tiny", mixer=mixer, conv_size=conv_size, rope=True))
    prompt, more = mx.random.randint(0, 1000, (1, 37)), mx.random.randint(0, 1000, (1, 5))
    cache = model.make_cache()
    model(prompt, cache=cache)
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    assert [type(c).__name__ for c in loaded] == [type(c).__name__ for c in cache]
    assert type(loaded[0]).__module__ == "mlx_lm.models.cache"
    expected = model(more, cache=cache)
    assert mx.array_equal(model(more, cache=loaded), expected).item()


def test_cache_prompt_then_generate_in_mlx_lm(trained, tmp_path):
    """``mlx_lm cache_prompt`` then ``mlx_lm generate --prompt-cache-file``: the text our model
    writes after the same tokens (mlx-lm puts bos in front of the second prompt too)."""
    model, tokenizer = load(trained)
    first, second = PROMPT[:20], PROMPT[20:]
    run_mlx_lm("cache_prompt", "--model", trained, "--prompt", first,
               "--prompt-cache-file", tmp_path / "prompt.safetensors")
    stdout = run_mlx_lm("generate", "--model", trained, "--prompt-cache-file", tmp_path / "prompt.safetensors",
                        "--prompt", second, "--temp", "0", "--max-tokens", "24")
    tokens = tokenizer.encode(first, add_bos=True) + tokenizer.encode(second, add_bos=True)
    assert generated_text(stdout) == our_text(model, tokenizer, tokens, 24)


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora-4-bit"])
def test_lora_then_fuse_in_mlx_lm_loads_here(trained, tmp_path, quantized):
    """``mlx_lm lora`` for a few steps (over a 4-bit base: QLoRA), ``mlx_lm fuse``, then our
    load() of the fused directory gives the logits mlx-lm gives."""
    base = trained
    if quantized:
        base = tmp_path / "q4"
        run_mlx_lm("convert", "--hf-path", trained, "--mlx-path", base, "-q", "--q-bits", "4",
                   "--q-group-size", "32")
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"text": f"def function_{i}(x):\n    return x * {i}\n"}) for i in range(40)]
    (data / "train.jsonl").write_text("\n".join(lines[:32]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(lines[32:]) + "\n")
    run_mlx_lm("lora", "--model", base, "--train", "--data", data, "--iters", "4", "--batch-size", "2",
               "--num-layers", "2", "--steps-per-eval", "100", "--val-batches", "1",
               "--adapter-path", tmp_path / "adapters")
    run_mlx_lm("fuse", "--model", base, "--adapter-path", tmp_path / "adapters",
               "--save-path", tmp_path / "fused")
    model, tokenizer = load(tmp_path / "fused")
    theirs, _ = mlx_lm.load(str(tmp_path / "fused"), trust_remote_code=True)
    tokens = mx.array([tokenizer.encode(PROMPT, add_bos=True)])
    assert mx.array_equal(model(tokens), theirs(tokens)).item()
    base_model, _ = load(base)
    assert not mx.array_equal(model(tokens), base_model(tokens)).item()  # the adapter changed it


def test_mlx_lm_server_completes_as_ours(trained):
    """``mlx_lm server`` on our directory: a greedy completion over HTTP is our text."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(trained),
                               "--trust-remote-code", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"prompt": PROMPT, "max_tokens": 24, "temperature": 0}).encode())
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    completion = json.loads(response.read())
                break
            except (ConnectionError, urllib.error.URLError):
                assert server.poll() is None and time.time() < deadline, server.stderr.read()[-3000:]
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
    model, tokenizer = load(trained)
    assert completion["choices"][0]["text"] == our_text(model, tokenizer, PROMPT, 24)


def test_adapters_trained_here_load_in_mlx_lm(trained, tmp_path):
    """LoRA on the last two blocks, 30 steps on one text: the loss falls, the base weights
    stay bit for bit, the directory holds the adapters only, and ``mlx_lm generate
    --adapter-path`` writes the text our model with the adapters writes."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from llm.adapters import add_adapters, load_adapters, save_adapters

    model, tokenizer = load(trained)
    base = dict(tree_flatten(model.parameters()))
    config = add_adapters(model, "lora", rank=4, layers=2)
    tokens = mx.array([tokenizer.encode("class Adapter:\n    name = 'tuned'\n" * 3, add_bos=True)])
    loss_and_grad = nn.value_and_grad(model, lambda m: nn.losses.cross_entropy(
        m(tokens[:, :-1]), tokens[:, 1:], reduction="mean"))
    optimizer = optim.Adam(learning_rate=1e-2)
    losses = []
    for _ in range(30):
        loss, grads = loss_and_grad(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # The base's tensors, under the names they have inside the adapter layers.
    frozen = {name.replace(".linear.", "."): value for name, value in tree_flatten(model.parameters())
              if name.rsplit(".", 1)[-1] not in ("lora_a", "lora_b")}
    assert frozen.keys() == base.keys()
    assert all(mx.array_equal(frozen[name], value).item() for name, value in base.items())
    save_adapters(model, tmp_path / "adapters", config)
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [
        "adapter_config.json", "adapters.safetensors", "checksums.json"]
    prompt = "class Adapter:\n"
    stdout = run_mlx_lm("generate", "--model", trained, "--adapter-path", tmp_path / "adapters",
                        "--temp", "0", "--max-tokens", "24", "--prompt", prompt)
    assert generated_text(stdout) == our_text(model, tokenizer, prompt, 24)
    fresh, _ = load(trained)
    load_adapters(fresh, tmp_path / "adapters")
    assert mx.array_equal(fresh(tokens), model(tokens)).item()
