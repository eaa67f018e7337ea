"""Every bad input, on every surface, gets an error of the documented type whose message names
the argument, field, file or variable and says what was expected.

One table: each case is (call, error, message); ``call(ctx)`` does what a user would do, and
the test asserts that it raises ``error`` matching ``message``. The surfaces, in order: the op
and its one-token step, the layer, the model, generation and sampling, model configs,
tokenizers, corpora and the token cache, weights on disk, adapters, routing, environment variables,
and the trainer's command line (in real subprocesses, where a Python traceback counts as a
failure).
``python -m tests.battery`` runs the same table case by case in fresh processes and counts
clear errors, unclear ones, silent results and crashes, for this tree or another.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
import pytest

from tests.helpers import bound_by_file_permissions, write

ROOT = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT = 300  # seconds; a command still running then has accepted its input


@dataclass(frozen=True)
class Case:
    call: Callable          # call(ctx): the bad input, as a user would give it
    error: type             # the exception it must raise
    message: str            # a regex its message must match (it names the argument)


class Context:
    """What a case may need: a fresh directory, and (made once) a finished 5-step run."""

    shared: dict = {}

    def __init__(self, tmp: Path, shared_tmp: Path):
        self.tmp, self._shared_tmp = tmp, shared_tmp

    def trained_run(self) -> Path:
        if "run" not in self.shared:
            run_dir = self._shared_tmp / "run"
            train_cli(self, *small_run_options(self._shared_tmp, run_dir), check=True)
            self.shared["run"] = run_dir
        return self.shared["run"]


# ----------------------------------------------------------------------------- processes

class CommandFailed(Exception):
    """The command exited non-zero with an error message and no traceback: its stderr."""


class CommandTraceback(Exception):
    """The command printed a Python traceback: what a user must never see."""


class CommandCrashed(Exception):
    """The command was killed by a signal (a segfault, an abort)."""


def finished(result: subprocess.CompletedProcess, check: bool = False) -> str:
    if result.returncode < 0:
        raise CommandCrashed(f"killed by signal {-result.returncode}: {result.stderr[-2000:]}")
    if "Traceback" in result.stderr:
        raise CommandTraceback(result.stderr[-3000:])
    if result.returncode != 0:
        if check:
            raise AssertionError(result.stderr[-3000:])
        raise CommandFailed(result.stderr.strip())
    return result.stdout


def python_process(ctx, code: str, preexec_fn=None) -> str:
    """Run ``code`` in a fresh interpreter; it reports a refused input by exiting with the
    error's message (``sys.exit(str(error))``)."""
    return finished(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   timeout=COMMAND_TIMEOUT, cwd=ROOT, preexec_fn=preexec_fn))



# ----------------------------------------------------------------------------- the op

B, T, Hq, H, d, e = 2, 10, 4, 2, 8, 6
D = (d + 1) * d // 2  # features of degree 2


def op_inputs(step=False, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(q=rng.standard_normal((B, T, Hq, d)), k=rng.standard_normal((B, T, H, d)),
                  v=rng.standard_normal((B, T, H, e)), log_g=-0.2 * rng.random((B, T, H)))
    arrays = {name: mx.array(x, dtype=mx.float32) for name, x in arrays.items()}
    if step:
        arrays = {name: x[:, 0] for name, x in arrays.items()}
    return {**arrays, **overrides}


def op(overrides=None, **options):
    def call(ctx):
        from power_retention import power_retention
        a = op_inputs(**(overrides or {}))
        return power_retention(a["q"], a["k"], a["v"], a["log_g"], **options)
    return call


def step(overrides=None, state=None, **options):
    def call(ctx):
        from power_retention import power_retention_step
        a = op_inputs(step=True, **(overrides or {}))
        return power_retention_step(a["q"], a["k"], a["v"], a["log_g"],
                                    None if state is None else state(), **options)
    return call


def state(S_shape=(B, H, D, e), z_shape=(B, H, D), dtype=mx.float32):
    def make():
        from power_retention import RetentionState
        return RetentionState(mx.zeros(S_shape, dtype=dtype), mx.zeros(z_shape, dtype=dtype))
    return make


def zeros(*shape, dtype=mx.float32):
    return mx.zeros(shape, dtype=dtype)


OP = {
    "q-3d": Case(op(dict(q=zeros(B, T, d))), ValueError, r"q must have shape \(B, T, Hq, d\)"),
    "k-batch": Case(op(dict(k=zeros(B + 1, T, H, d))), ValueError, r"k must have shape .*B=2"),
    "k-length": Case(op(dict(k=zeros(B, T + 1, H, d))), ValueError, r"k must have shape .*T=10"),
    "k-head-dim": Case(op(dict(k=zeros(B, T, H, d + 1))), ValueError, r"k must have shape .*d=8"),
    "heads-not-multiple": Case(op(dict(k=zeros(B, T, 3, d), v=zeros(B, T, 3, e))), ValueError,
                               r"Hq=4 must be a multiple of .* H=3"),
    "v-heads": Case(op(dict(v=zeros(B, T, H + 1, e))), ValueError,
                    r"v must have shape \(B=2, T=10, H=2, e\)"),
    "v-length": Case(op(dict(v=zeros(B, T - 1, H, e))), ValueError, r"v must have shape"),
    "log_g-shape": Case(op(dict(log_g=zeros(B, T, Hq))), ValueError,
                        r"log_g must have shape \(2, 10, 2\)"),
    "log_g-integer": Case(op(dict(log_g=zeros(B, T, H, dtype=mx.int32))), ValueError, r"log_g must be"),
    "q-integer": Case(op(dict(q=zeros(B, T, Hq, d, dtype=mx.int32))), ValueError,
                      r"q must be floating point"),
    "v-bool": Case(op(dict(v=zeros(B, T, H, e, dtype=mx.bool_))), ValueError, r"v must be floating point"),
    "k-python-list": Case(op(dict(k=[[1.0]])), ValueError, r"k must be an mlx.core.array"),
    "deg-zero": Case(op(deg=0), ValueError, r"deg must be an integer >= 1"),
    "deg-float": Case(op(deg=2.0), ValueError, r"deg must be an integer >= 1"),
    "deg-string": Case(op(deg="2"), ValueError, r"deg must be an integer >= 1"),
    "deg-odd-normalized": Case(op(deg=3, normalize=True), ValueError,
                               r"normalize=True needs an even deg.*normalize=False"),
    "deg1-normalized": Case(op(deg=1, normalize=True), ValueError, r"use normalize=False"),
    "normalize-string": Case(op(normalize="yes"), ValueError, r"normalize must be True, False or None"),
    "batch-zero": Case(op(dict(q=zeros(0, T, Hq, d), k=zeros(0, T, H, d), v=zeros(0, T, H, e),
                               log_g=zeros(0, T, H))), ValueError, r"B >= 1.*got B=0"),
    "kv-heads-zero": Case(op(dict(k=zeros(B, T, 0, d), v=zeros(B, T, 0, e), log_g=zeros(B, T, 0))),
                          ValueError, r"H >= 1 \(k, v\); got B=2, Hq=4, H=0"),
    "log_g-positive": Case(op(dict(log_g=mx.full((B, T, H), 0.01))), ValueError,
                           r"log_g must be <= 0 .*0\.01"),
    "log_g-nan": Case(op(dict(log_g=mx.full((B, T, H), mx.nan))), ValueError,
                      r"log_g must be <= 0 .*got NaN"),
    "chunk-size-zero": Case(op(chunk_size=0), ValueError, r"chunk_size must be an integer >= 1"),
    "chunk-size-float": Case(op(chunk_size=16.0), ValueError, r"chunk_size must be an integer >= 1"),
    "method-unknown": Case(op(method="flash"), ValueError, r"method must be one of .*'chunked'"),
    "scale-negative": Case(op(scale=-1.0), ValueError, r"scale must be a positive finite number"),
    "scale-nan": Case(op(scale=float("nan")), ValueError, r"scale must be a positive finite number"),
    "state-not-a-pair": Case(op(initial_state=zeros(B, H, D, e)), ValueError,
                             r"initial_state must be a RetentionState"),
    "state-S-shape": Case(op(initial_state=state(S_shape=(B, H, D + 1, e))()), ValueError,
                          r"initial_state.S must have shape \(2, 2, 36, 6\)"),
    "state-z-shape": Case(op(initial_state=state(z_shape=(B, Hq, D))()), ValueError,
                          r"initial_state.z must have shape \(2, 2, 36\)"),
    "state-dtype": Case(op(initial_state=state(dtype=mx.float16)()), ValueError,
                        r"initial_state.S must be mlx.core.float32"),
    "deg8-state-too-large": Case(op(dict(q=zeros(1, 4, 1, 64), k=zeros(1, 4, 1, 64), v=zeros(1, 4, 1, 4),
                                         log_g=zeros(1, 4, 1)), deg=8, method="chunked"), ValueError,
                                 r"deg=8 with heads of d=64 has D=10,639,125,640 features .* GiB"),
}

STEP = {
    "q-with-time-axis": Case(step(dict(q=zeros(B, 1, Hq, d))), ValueError, r"q must have shape \(B, Hq, d\)"),
    "k-head-dim": Case(step(dict(k=zeros(B, H, d + 1))), ValueError, r"k must have shape \(B, H, d\)"),
    "v-heads": Case(step(dict(v=zeros(B, H + 1, e))), ValueError, r"v must have shape \(B=2, H=2, e\)"),
    "log_g-shape": Case(step(dict(log_g=zeros(B, Hq))), ValueError, r"log_g must have shape \(2, 2\)"),
    "deg-odd-normalized": Case(step(deg=3, normalize=True), ValueError, r"normalize=False"),
    "log_g-positive": Case(step(dict(log_g=mx.full((B, H), 0.5))), ValueError, r"log_g must be <= 0"),
    "state-S-shape": Case(step(state=state(S_shape=(B, H, D, e + 1))), ValueError,
                          r"initial_state.S must have shape"),
}


# ----------------------------------------------------------------------------- the layer

def layer(**kwargs):
    def call(ctx):
        from power_retention import PowerRetention
        return PowerRetention(**kwargs)
    return call


def layer_call(x_shape=(1, 4, 32), **kwargs):
    def call(ctx):
        from power_retention import PowerRetention
        return PowerRetention(dim=32)(mx.zeros(x_shape), **kwargs)
    return call


LAYER = {
    "dim-not-divisible-by-heads": Case(layer(dim=30, num_heads=4), ValueError, "divisible by num_heads"),
    "heads-not-multiple-of-kv-heads": Case(layer(dim=32, num_heads=4, num_kv_heads=3), ValueError,
                                           "multiple of num_kv_heads"),
    "odd-deg-normalized": Case(layer(dim=32, deg=3, normalize=True), ValueError, "even deg"),
    "deg-zero": Case(layer(dim=32, deg=0), ValueError, "deg must be an integer >= 1"),
    "dim-zero": Case(layer(dim=0), ValueError, "dim"),
    "chunk-size-zero": Case(layer(dim=32, chunk_size=0), ValueError, "chunk_size"),
    "method-unknown": Case(layer(dim=32, method="fast"), ValueError, "method must be one of"),
    "gate-init-one": Case(layer(dim=32, gate_init=1.0), ValueError, "gate_init"),
    "gate-init-zero": Case(layer(dim=32, gate_init=0), ValueError, "gate_init"),
    "conv-size-negative": Case(layer(dim=32, conv_size=-1), ValueError, "conv_size"),
    "conv-size-fractional": Case(layer(dim=32, conv_size=2.5), ValueError, "conv_size"),
    "rope-odd-head-dim": Case(layer(dim=30, num_heads=2, rope=True), ValueError, "even head_dim"),
    "x-wrong-width": Case(layer_call((1, 4, 16)), ValueError, r"x must have shape \(B, T, dim=32\)"),
    "x-2d": Case(layer_call((4, 32)), ValueError, r"x must have shape \(B, T, dim=32\)"),
    "reset-wrong-shape": Case(layer_call(reset=mx.zeros((1, 5), dtype=mx.bool_)), ValueError,
                              r"reset must be a bool mlx array of shape \(B, T\) = \(1, 4\)"),
    "reset-integer": Case(layer_call(reset=mx.zeros((1, 4), dtype=mx.int32)), ValueError,
                          r"reset must be a bool .* got mlx.core.int32 of shape \(1, 4\)"),
    "reset-list": Case(layer_call(reset=[[True, False, False, False]]), ValueError,
                       r"reset must be a bool mlx array .* got list"),
}


# ----------------------------------------------------------------------------- model, generation

@functools.cache
def tiny_model(mixer="power"):
    from llm import RetentionLLM, create_model_config
    return RetentionLLM(create_model_config("ultra-tiny", vocab_size=258, mixer=mixer))


def model(call):
    return lambda ctx: call(tiny_model())


def stream(prompt):
    def call(ctx):
        from llm import ByteTokenizer, stream_generate
        return list(stream_generate(tiny_model(), ByteTokenizer(), prompt, 2))
    return call


def sampler(**kwargs):
    def call(ctx):
        from llm import make_sampler
        return make_sampler(**kwargs)
    return call


MODEL = {
    "token-above-vocab": Case(model(lambda m: m(mx.array([[1, 300]]))), ValueError,
                              r"tokens holds the token id 300, outside \[0, 258\)"),
    "token-far-above-vocab": Case(model(lambda m: m(mx.array([[100000]]))), ValueError, r"token id 100000"),
    "token-negative": Case(model(lambda m: m(mx.array([[-1, 3]]))), ValueError, r"token id -1"),
    "tokens-float": Case(model(lambda m: m(mx.array([[1.0, 2.0]]))), ValueError,
                         r"tokens must hold integer token ids"),
    "tokens-1d": Case(model(lambda m: m(mx.array([1, 2]))), ValueError, r"tokens must be .* shape \(B, T\)"),
    "softmax-token-above-vocab": Case(lambda ctx: tiny_model("softmax")(mx.array([[258]])), ValueError,
                                      r"token id 258"),
    "cache-wrong-length": Case(model(lambda m: m(mx.array([[1]]), cache=m.make_cache()[:1])), ValueError,
                               r"cache must hold one entry per layer \(3\), got 1"),
    "reset-wrong-shape": Case(model(lambda m: m(mx.array([[1, 2]]), reset=mx.array([True]))), ValueError,
                              r"reset must be a bool mlx array of shape \(B, T\) = \(1, 2\)"),
    "generate-prompt-above-vocab": Case(model(lambda m: m.generate([5, 258])), ValueError,
                                        r"prompt holds the token id 258"),
    "generate-prompt-text": Case(model(lambda m: m.generate("hello")), ValueError,
                                 r"prompt_tokens must be token ids"),
    "generate-prompt-bytes": Case(model(lambda m: m.generate(b"hello")), ValueError,
                                  r"prompt_tokens must be token ids"),
    "generate-prompt-3d": Case(model(lambda m: m.generate([[[1]]])), ValueError,
                               r"prompt_tokens must have shape"),
    "stream-prompt-bytes": Case(stream(b"hello"), ValueError, r"prompt must be text .* got bytes"),
    "stream-prompt-ids-above-vocab": Case(stream([1, 999]), ValueError, r"prompt holds the token id 999"),
    "sampler-temperature-negative": Case(sampler(temperature=-1), ValueError, "temperature"),
    "sampler-top-p-zero": Case(sampler(top_p=0), ValueError, "top_p"),
    "sampler-top-k-negative": Case(sampler(top_k=-2), ValueError, "top_k"),
}


def config(name="ultra-tiny", **fields):
    def call(ctx):
        from llm import create_model_config
        return create_model_config(name, **fields)
    return call


CONFIG = {
    "unknown-preset": Case(config("huge"), ValueError, "known presets: ultra-tiny, tiny, small"),
    "unknown-field": Case(config(hidden_dim=3), ValueError, r"unknown field\(s\) \['hidden_dim'\]"),
    "mixer-unknown": Case(config(mixer="mamba"), ValueError, r"ModelConfig.mixer must be one of"),
    "layers-zero": Case(config(num_hidden_layers=0), ValueError,
                        r"ModelConfig.num_hidden_layers must be an integer >= 1"),
    "heads-do-not-divide-width": Case(config(hidden_size=64, num_attention_heads=3, num_key_value_heads=3),
                                      ValueError, r"hidden_size=64 is not divisible by num_attention_heads=3"),
    "gating-string": Case(config(gating="false"), ValueError,
                          r"ModelConfig.gating must be true or false, got 'false'"),
    "tie-embeddings-int": Case(config(tie_word_embeddings=1), ValueError,
                               r"ModelConfig.tie_word_embeddings must be true"),
    "rope-theta-negative": Case(config(rope_theta=-1.0), ValueError,
                                r"ModelConfig.rope_theta must be a positive finite"),
    "rms-norm-eps-zero": Case(config(rms_norm_eps=0.0), ValueError,
                              r"ModelConfig.rms_norm_eps must be a positive finite"),
    "rms-norm-eps-nan": Case(config(rms_norm_eps=float("nan")), ValueError, r"ModelConfig.rms_norm_eps"),
    "gate-init-above-one": Case(config(gate_init=1.5), ValueError, r"ModelConfig.gate_init"),
    "softmax-without-rope": Case(config(mixer="softmax", rope=False), ValueError,
                                 r"ModelConfig.rope=False applies to the power mixer only"),
    "document-start-id-above-vocab": Case(config(vocab_size=258, document_start_id=258), ValueError,
                                          r"ModelConfig.document_start_id must be a token id below "
                                          r"vocab_size=258"),
    "document-start-id-negative": Case(config(document_start_id=-1), ValueError,
                                       r"ModelConfig.document_start_id must be an integer >= 0"),
}


# ----------------------------------------------------------------------------- tokenizers

def tokenizer_directory(config_text=None, model_bytes=None):
    def call(ctx):
        from llm import load_tokenizer
        directory = ctx.tmp / "tokenizer"
        directory.mkdir()
        if config_text is not None:
            text = config_text if isinstance(config_text, str) else json.dumps(config_text)
            (directory / "tokenizer_config.json").write_text(text)
        if model_bytes is not None:
            (directory / "tokenizer.model").write_bytes(model_bytes)
        return load_tokenizer(directory)
    return call


def train_tokenizer_with(**change):
    def call(ctx):
        from llm import train_tokenizer
        return train_tokenizer(**{"inputs": ["some text to train on"], "vocab_size": 300, **change})
    return call


def train_tokenizer_on_paths(make_inputs):
    def call(ctx):
        from llm import train_tokenizer
        (ctx.tmp / "exists.txt").write_text("hello there\n")
        return train_tokenizer(make_inputs(ctx.tmp), 300)
    return call


TOKENIZER = {
    "directory-missing": Case(tokenizer_directory(), FileNotFoundError,
                              r"tokenizer_config\.json does not exist"),
    "config-not-json": Case(tokenizer_directory("{not json"), ValueError,
                            r"tokenizer_config\.json is not a tokenizer config"),
    "config-without-class": Case(tokenizer_directory({"vocab_size": 258}), ValueError,
                                 r"tokenizer_config\.json is not a tokenizer config"),
    "class-unknown": Case(tokenizer_directory({"tokenizer_class": "tiktoken"}), ValueError,
                          r"config\.json: unknown tokenizer 'tiktoken'"),
    "model-file-missing": Case(tokenizer_directory({"tokenizer_class": "sentencepiece"}),
                               FileNotFoundError, r"tokenizer\.model does not exist"),
    "model-file-garbage": Case(tokenizer_directory({"tokenizer_class": "sentencepiece"}, b"not a model"),
                               ValueError, r"tokenizer\.model is not a serialized SentencePiece"),
    "train-vocab-too-small": Case(train_tokenizer_with(vocab_size=259), ValueError,
                                  r"vocab_size must be an integer >= 260 .* got 259"),
    "train-vocab-float": Case(train_tokenizer_with(vocab_size=500.0), ValueError,
                              r"vocab_size must be an integer >= 260"),
    "train-vocab-bool": Case(train_tokenizer_with(vocab_size=True), ValueError,
                             r"vocab_size must be an integer >= 260"),
    "train-model-type": Case(train_tokenizer_with(model_type="word"), ValueError,
                             r"model_type must be 'bpe' or 'unigram', got 'word'"),
    "train-max-sentences-zero": Case(train_tokenizer_with(max_sentences=0), ValueError,
                                     r"max_sentences must be an integer >= 1, got 0"),
    "train-seed-negative": Case(train_tokenizer_with(seed=-1), ValueError,
                                r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    "train-inputs-empty": Case(train_tokenizer_with(inputs=[]), ValueError, r"inputs has no text to train on"),
    "train-inputs-blank-lines": Case(train_tokenizer_with(inputs=["", "\n\n", "\r\n"]), ValueError,
                                     r"inputs has no text to train on"),
    "train-inputs-one-str": Case(train_tokenizer_with(inputs="some text"), ValueError,
                                 r"inputs must be an iterable of .* got str"),
    "train-inputs-bytes": Case(train_tokenizer_with(inputs=b"some text"), ValueError,
                               r"inputs must be an iterable .* got bytes"),
    "train-inputs-int": Case(train_tokenizer_with(inputs=3), ValueError, r"inputs must be an iterable .* got int"),
    "train-inputs-item-bytes": Case(train_tokenizer_with(inputs=["text", b"x"]), ValueError,
                                    r"inputs\[1\] must be a str \(text\) or"),
    "train-inputs-missing-file": Case(train_tokenizer_on_paths(lambda d: [d / "exists.txt", d / "missing.txt"]),
                                      ValueError, r"inputs\[1\]: '.*missing\.txt' is not a file"),
    "train-inputs-directory": Case(train_tokenizer_on_paths(lambda d: [d]), ValueError,
                                   r"inputs\[0\]: '.*' is not a file"),
    "train-inputs-file-name-as-str": Case(train_tokenizer_on_paths(lambda d: [str(d / "exists.txt")]),
                                          ValueError, r"inputs\[0\] is the name of a file, .* as pathlib.Path"),
    "byte-decode-above-vocab": Case(lambda ctx: _byte().decode([1, 258]), ValueError,
                                    r"ids must be in \[0, 258\), got"),
    "byte-encode-bytes": Case(lambda ctx: _byte().encode(b"text"), ValueError, r"text must be a str, got bytes"),
}


def _byte():
    from llm import ByteTokenizer
    return ByteTokenizer()


# ----------------------------------------------------------------------------- corpora, token cache

def corpus(make_spec):
    def call(ctx):
        from llm.data import read_documents
        return read_documents(make_spec(ctx.tmp))
    return call


def unreadable_file(ctx):
    """A file the user may not read (mode 0), read in a process that file permissions bind."""
    path = write(ctx.tmp / "secret.txt", "text")
    path.chmod(0)
    code = ("import sys\nfrom llm.data import read_documents\n"
            f"try:\n    read_documents({str(path)!r})\n"
            "except ValueError as error:\n    sys.exit(str(error))\n")
    return python_process(ctx, code, preexec_fn=bound_by_file_permissions())


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def latin1_directory(path: Path) -> Path:
    write(path / "good.txt", "good")
    write(path / "bad.txt", "déjà".encode("latin-1"))
    return path


def tokenize(documents, **kwargs):
    def call(ctx):
        from llm.data import Document, tokenize_corpus
        docs = [Document(*doc) if isinstance(doc, tuple) else doc for doc in documents]
        return tokenize_corpus(docs, _byte(), ctx.tmp, **{"key": "k", **kwargs})
    return call


def synthetic(**kwargs):
    def call(ctx):
        from llm.data import synthetic_documents
        return synthetic_documents("copy", **kwargs)
    return call


CORPUS = {
    "missing-path": Case(corpus(lambda d: str(d / "nope.txt")), FileNotFoundError, r"nope\.txt.*no such file"),
    "glob-matches-nothing": Case(corpus(lambda d: str(d / "*.nothing")), FileNotFoundError,
                                 r"\*\.nothing.*matches no files"),
    "empty-file": Case(corpus(lambda d: str(write(d / "empty.txt", ""))), ValueError, r"empty\.txt: no text"),
    "whitespace-file": Case(corpus(lambda d: str(write(d / "blank.txt", " \n\t\n"))), ValueError,
                            r"blank\.txt: no text"),
    "empty-directory": Case(corpus(lambda d: str((d / "void").mkdir() or d / "void")), ValueError,
                            r"void.*has no files"),
    "directory-of-empty-files": Case(corpus(lambda d: str(write(d / "x" / "a.txt", "\n").parent)), ValueError,
                                     r"directory .*x.*: no text"),
    "non-utf8-file": Case(corpus(lambda d: str(write(d / "latin1.txt", "café".encode("latin-1")))),
                          ValueError, r"latin1\.txt: not UTF-8 text"),
    "non-utf8-file-in-directory": Case(corpus(lambda d: str(latin1_directory(d / "dir"))), ValueError,
                                       r"bad\.txt: not UTF-8 text"),
    "binary-file": Case(corpus(lambda d: str(write(d / "blob.dat", b"\0\1\2"))), ValueError,
                        r"blob\.dat: a binary file"),
    "unreadable-file": Case(unreadable_file, CommandFailed, r"secret\.txt: cannot read"),
    "fifo": Case(corpus(lambda d: (os.mkfifo(d / "pipe"), str(d / "pipe"))[1]), ValueError,
                 r"pipe.* not a regular file"),
    "jsonl-not-json": Case(corpus(lambda d: str(write(d / "a.jsonl", '{"text": "ok"}\n{"text": oops}\n'))),
                           ValueError, r"a\.jsonl, line 2: not valid JSON"),
    "jsonl-missing-fields": Case(
        corpus(lambda d: str(write(d / "b.jsonl", jsonl({"text": "ok"}, {"prompt": "only a prompt"})))),
        ValueError, r"b\.jsonl, line 2: expected .*\"text\".*\"prompt\" and \"completion\""),
    "jsonl-text-not-a-string": Case(corpus(lambda d: str(write(d / "c.jsonl", jsonl({"text": 5})))),
                                    ValueError, r"c\.jsonl, line 1: expected"),
    "jsonl-not-an-object": Case(corpus(lambda d: str(write(d / "d.jsonl", '["text"]\n'))), ValueError,
                                r"d\.jsonl, line 1: expected .* got a JSON list"),
    "jsonl-lone-surrogate": Case(corpus(lambda d: str(write(d / "e.jsonl", '{"text": "a\\ud800"}\n'))),
                                 ValueError, r"e\.jsonl, line 1: .*surrogate"),
    "jsonl-empty": Case(corpus(lambda d: str(write(d / "f.jsonl", "\n\n"))), ValueError, r"f\.jsonl: no text"),
    "synthetic-unknown": Case(corpus(lambda d: "synthetic:bogus"), ValueError,
                              r"'bogus'.*synthetic:mqar, synthetic:copy"),
    "spec-not-a-string": Case(corpus(lambda d: 42), ValueError, r"data must be a non-empty str"),
    "synthetic-no-documents": Case(synthetic(n_documents=0), ValueError, "n_documents must be an integer >= 1"),
    "synthetic-seed-negative": Case(synthetic(seed=-1), ValueError, "seed must be an integer >= 0"),
    "tokenize-no-documents": Case(tokenize([]), ValueError, "documents is empty"),
    "tokenize-prompt-longer-than-text": Case(tokenize([("abc", 4)]), ValueError,
                                             r"documents\[0\]\.prompt_chars .*\[0, 3\], got 4"),
    "tokenize-str-not-document": Case(tokenize(["text"]), ValueError, r"documents\[0\] must be a Document"),
    "tokenize-too-short-to-split": Case(tokenize([("x",)]), ValueError, "one document of 1 character"),
    "tokenize-val-fraction-zero": Case(tokenize([("ab",)], val_fraction=0.0), ValueError,
                                       r"val_fraction must be in \(0, 1\)"),
    "tokenize-val-fraction-one": Case(tokenize([("ab",)], val_fraction=1.0), ValueError,
                                      r"val_fraction must be in \(0, 1\)"),
    "tokenize-key-with-slash": Case(tokenize([("ab",)], key="../up"), ValueError,
                                    "key must be a directory name"),
}


# ----------------------------------------------------------------------------- weights on disk

def saved(edit):
    """Save the tiny model, damage its directory with ``edit(directory)``, load it back."""
    def call(ctx):
        from llm import RetentionLLM
        directory = ctx.tmp / "run"
        tiny_model().save_pretrained(directory)
        edit(directory)
        return RetentionLLM.from_pretrained(directory)
    return call


def without_checksums(edit):
    """``edit``, as another tool would make it: without this project's checksums, so that the
    loader's own checks of each file are what must catch it."""
    def apply(directory):
        edit(directory)
        (directory / "checksums.json").unlink(missing_ok=True)
    return apply


def tensors(change):
    def edit(directory):
        path = directory / "model.safetensors"
        weights = dict(mx.load(str(path)))
        change(weights)
        mx.save_safetensors(str(path), weights)
    return without_checksums(edit)


def config_json(change, checksums=False):
    def edit(directory):
        path = directory / "config.json"
        values = json.loads(path.read_text())
        change(values)
        path.write_text(json.dumps(values))
    return edit if checksums else without_checksums(edit)


def weights_bytes(change, checksums=False, name="model.safetensors"):
    def edit(directory):
        path = directory / name
        path.write_bytes(change(path.read_bytes()))
    return edit if checksums else without_checksums(edit)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x40])


WEIGHTS = {
    "tensor-missing": Case(saved(tensors(lambda w: w.pop("layers.1.mlp.up_proj.weight"))), ValueError,
                           r"missing tensor\(s\) \['layers.1.mlp.up_proj.weight'\]"),
    "tensor-unexpected": Case(saved(tensors(lambda w: w.update(extra=mx.zeros(3)))), ValueError,
                              r"unexpected tensor\(s\) \['extra'\]"),
    "tensor-mis-shaped": Case(saved(tensors(lambda w: w.update({"norm.weight": mx.zeros(65)}))), ValueError,
                              r"'norm.weight' .* shape \(65,\), the model expects \(64,\)"),
    "tensor-non-finite": Case(saved(tensors(lambda w: w.update({"norm.weight": mx.full((64,), mx.nan)}))),
                              ValueError, r"'norm.weight' .* holds NaN or inf"),
    "tensor-integer": Case(saved(tensors(lambda w: w.update({"norm.weight": mx.ones((64,), dtype=mx.int32)}))),
                           ValueError, r"'norm.weight' .* is mlx.core.int32; a model's weights are floating"),
    "file-truncated": Case(saved(weights_bytes(lambda b: b[:-1000])), ValueError,
                           r"model.safetensors is truncated"),
    "file-empty": Case(saved(weights_bytes(lambda b: b"")), ValueError,
                       r"model.safetensors (is truncated|is corrupt)"),
    "file-short": Case(saved(weights_bytes(lambda b: b"\x05\x00")), ValueError,
                       r"model.safetensors (is truncated|is corrupt)"),
    "file-bad-header": Case(saved(weights_bytes(lambda b: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!}")),
                            ValueError, r"model.safetensors (is truncated|is corrupt)"),
    "file-flipped-byte": Case(saved(weights_bytes(flip_last_byte, checksums=True)), ValueError,
                              r"model.safetensors is damaged"),
    "config-does-not-match-weights": Case(saved(config_json(lambda c: c.update(intermediate_size=96))),
                                          ValueError, r"mlp.down_proj.weight.*the config does not match"),
    "config-edited-under-checksums": Case(saved(config_json(lambda c: c.update(deg=4), checksums=True)),
                                          ValueError, r"config.json is damaged"),
    "config-unknown-field": Case(saved(config_json(lambda c: c.update(hidden_dim=3))), ValueError,
                                 r"config.json: unknown field\(s\) \['hidden_dim'\]"),
    "config-missing-field": Case(saved(config_json(lambda c: c.pop("vocab_size"))), ValueError,
                                 r"config.json: missing field\(s\) \['vocab_size'\]"),
    "config-bad-mixer": Case(saved(config_json(lambda c: c.update(mixer="rnn"))), ValueError,
                             r"ModelConfig.mixer must be one of"),
    "config-missing": Case(saved(lambda d: (d / "config.json").unlink()), FileNotFoundError,
                           "config.json not found"),
    "weights-missing": Case(saved(without_checksums(lambda d: (d / "model.safetensors").unlink())),
                            FileNotFoundError, "expected model.safetensors"),
}


# ----------------------------------------------------------------------------- adapters

def adapters(call):
    def run(ctx):
        from llm import adapters as module
        return call(ctx, module)
    return run


def saved_adapters(ctx, module, damage=None):
    """LoRA adapters of the tiny model, saved (and then damaged by ``damage(directory)``)."""
    model = fresh_model()
    config = module.add_adapters(model, rank=2, layers=1)
    module.save_adapters(model, ctx.tmp / "adapters", config)
    if damage:
        damage(ctx.tmp / "adapters")
    return ctx.tmp / "adapters"


def adapted(model, module, **options):
    module.add_adapters(model, layers=1, **options)
    return model


def fresh_model(**fields):
    """A model of its own (adapters change the model they are put on)."""
    from llm import RetentionLLM, create_model_config
    return RetentionLLM(create_model_config("ultra-tiny", vocab_size=258, **fields))


def other_base():
    return fresh_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=4)


ADAPTERS = {
    "kind-unknown": Case(adapters(lambda ctx, m: m.add_adapters(fresh_model(), "qlora")), ValueError,
                         r"kind must be one of 'lora', 'dora', got 'qlora'"),
    "rank-zero": Case(adapters(lambda ctx, m: m.add_adapters(fresh_model(), rank=0)), ValueError,
                      r"rank must be an integer >= 1, got 0"),
    "more-layers-than-blocks": Case(adapters(lambda ctx, m: m.add_adapters(fresh_model(), layers=9)),
                                    ValueError, r"layers=9 is more than the model's 3 blocks"),
    "directory-missing": Case(adapters(lambda ctx, m: m.load_adapters(fresh_model(), ctx.tmp / "none")),
                              FileNotFoundError, r"adapter_config.json does not exist"),
    "for-another-base": Case(adapters(lambda ctx, m: m.load_adapters(other_base(), saved_adapters(ctx, m))),
                             ValueError, r"adapters.safetensors does not fit this base model"),
    "of-another-rank": Case(adapters(lambda ctx, m: m.load_adapter_weights(
        adapted(fresh_model(), m, rank=4), saved_adapters(ctx, m))), ValueError,
        r"adapters.safetensors does not hold this run's adapters"),
    "quantize-3-bits": Case(adapters(lambda ctx, m: m.quantize_base(fresh_model(), 3)), ValueError,
                            r"bits must be one of 4, 8, got 3"),
    "fuse-without-adapters": Case(adapters(lambda ctx, m: m.fuse_adapters(fresh_model())), ValueError,
                                  r"the model has no adapters to fuse"),
    "file-flipped-byte": Case(adapters(lambda ctx, m: m.load_adapters(fresh_model(), saved_adapters(
        ctx, m, weights_bytes(flip_last_byte, checksums=True, name="adapters.safetensors")))), ValueError,
        r"adapters.safetensors is damaged"),
}


# ----------------------------------------------------------------------------- routing

def saved_base(ctx, model=None) -> Path:
    from llm import ByteTokenizer
    directory = ctx.tmp / ("other-base" if model is not None else "base")
    (model or fresh_model()).save_pretrained(directory, ByteTokenizer())
    return directory


def adapter_set(ctx, adapters_of=fresh_model):
    """A base and one adapter ("a") trained on ``adapters_of()``'s shape."""
    from llm import adapters as module
    from llm.route import AdapterSet
    model = adapters_of()
    config = module.add_adapters(model, rank=2, layers=1)
    module.save_adapters(model, ctx.tmp / "a", config)
    return AdapterSet(saved_base(ctx), {"a": ctx.tmp / "a"})


def router(ctx, rules=(), **options):
    from llm.route import Router
    return Router(adapter_set(ctx), rules, **options)


def route_command(ctx, *args) -> str:
    result = subprocess.run([sys.executable, "-m", "llm.route", "--base", saved_base(ctx), *args],
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, cwd=ROOT)
    return finished(result)


ROUTING = {
    "rule-unknown-adapter": Case(lambda ctx: router(ctx, [{"adapter": "b", "keywords": ["x"]}]), ValueError,
                                 r'rule 1 must be an object whose "adapter" is one of a, got'),
    "rule-bad-regex": Case(lambda ctx: router(ctx, [{"adapter": "a", "regex": "("}]), ValueError,
                           r"rule 1: \"regex\" '\(' is not a regular expression"),
    "rule-matching-nothing": Case(lambda ctx: router(ctx, [{"adapter": "a"}]), ValueError,
                                  r'rule 1 has neither "keywords" nor "regex"'),
    "default-unknown": Case(lambda ctx: router(ctx, default="b"), ValueError,
                            r"default 'b' is not an adapter; known: a"),
    "use-unknown": Case(lambda ctx: adapter_set(ctx).use("b"), ValueError, r"no adapter named 'b'; known: a"),
    "adapter-for-another-base": Case(lambda ctx: adapter_set(ctx, other_base), ValueError,
                                     r"adapter 'a' .* does not fit this base .* trained on another model"),
    "not-an-adapter-directory": Case(lambda ctx: route_command(ctx, "--adapter", f"a={ctx.tmp}"),
                                     CommandFailed, r"no adapter_config.json there .* nor a fine-tuning run"),
    "command-adapter-without-name": Case(lambda ctx: route_command(ctx, "--adapter", str(ctx.tmp)),
                                         CommandFailed, r"--adapter.*expected NAME=DIRECTORY"),
}


# ----------------------------------------------------------------------------- environment

@contextlib.contextmanager
def environment(**variables):
    saved_values = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved_values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def with_environment(read, **variables):
    def call(ctx):
        with environment(**variables):
            return read()
    return call


def no_fast_blas():
    from power_retention.cpu_tuning import fast_blas_environment
    return fast_blas_environment()


def keep_malloc():
    from power_retention.cpu_tuning import keep_freed_memory
    return keep_freed_memory()


def cpu_streams():
    from power_retention.cpu_tuning import parallel_cpu_streams
    return parallel_cpu_streams()


def emulator_cache(ctx):
    a_file = write(ctx.tmp / "a-file", "x")
    code = (f"import os; os.environ['POWER_RETENTION_EMULATOR_CACHE'] = {str(a_file)!r}\n"
            "import sys\n"
            "from metal_kernels import emulator\n"
            "try:\n"
            "    emulator._compile('k', 'int main() { return 0; }')\n"
            "except ValueError as error:\n"
            "    sys.exit(str(error))\n")
    return python_process(ctx, code)


ENVIRONMENT = {
    "no-fast-blas-yes": Case(with_environment(no_fast_blas, POWER_RETENTION_NO_FAST_BLAS="yes"), ValueError,
                             r"POWER_RETENTION_NO_FAST_BLAS must be 1 \(on\) or 0 \(off\), got 'yes'"),
    "keep-malloc-yes": Case(with_environment(keep_malloc, POWER_RETENTION_KEEP_MALLOC="yes"), ValueError,
                            r"POWER_RETENTION_KEEP_MALLOC must be 1 \(on\) or 0 \(off\), got 'yes'"),
    "cpu-streams-zero": Case(with_environment(cpu_streams, POWER_RETENTION_CPU_STREAMS="0"), ValueError,
                             r"POWER_RETENTION_CPU_STREAMS must be an integer >= 1, got '0'"),
    "cpu-streams-word": Case(with_environment(cpu_streams, POWER_RETENTION_CPU_STREAMS="two"), ValueError,
                             r"POWER_RETENTION_CPU_STREAMS must be an integer >= 1, got 'two'"),
    "emulator-cache-is-a-file": Case(emulator_cache, CommandFailed,
                                     r"POWER_RETENTION_EMULATOR_CACHE=.*a-file is a file"),
}


# ----------------------------------------------------------------------------- the command line

def train_cli(ctx, *args, check=False, env=None) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, cwd=ROOT,
                            env=None if env is None else {**os.environ, **env})
    return finished(result, check)


def code_corpus(directory: Path) -> Path:
    for i in range(30):
        write(directory / f"module_{i:02d}.py",
              f"def function_{i}(x):\n" + "".join(f"    y{j} = x * {i + j}\n" for j in range(8)))
    return directory


def small_run_options(tmp: Path, out: Path) -> list:
    return ["--model", "ultra-tiny", "--data", code_corpus(tmp / "corpus"), "--tokenizer", "byte",
            "--steps", "5", "--batch-size", "4", "--seq-len", "32", "--warmup", "1",
            "--eval-every", "5", "--eval-batches", "1", "--out", out, "--cache-dir", tmp / "cache"]


def train(*make_args, env=None):
    """train.py with the arguments ``make_args`` builds (strings, or callables of the case's
    directory), writing under that directory unless they name --out or --cache-dir."""
    def call(ctx):
        args = [arg(ctx.tmp) if callable(arg) else arg for arg in make_args]
        command = args[0] if args and args[0] in ("sample", "report", "plan", "fuse", "finetune") else ""
        defaults = [] if command in ("sample", "report", "plan", "fuse") or "--resume" in args else [
            *(["--tokenizer", "byte"] if not command else []),  # a fine-tuned base has its own
            *(part for name in ("--out", "--cache-dir") if name not in args
              for part in (name, ctx.tmp / name.strip("-")))]
        return train_cli(ctx, *args, *defaults, env=env)
    return call


def on_trained_run(*args):
    def call(ctx):
        return train_cli(ctx, *(ctx.trained_run() if arg == "RUN" else arg for arg in args))
    return call


def prompt_completion_file(directory: Path) -> Path:
    return write(directory / "task.jsonl", jsonl(*({"prompt": f"say {w} =", "completion": f" {w}"}
                                                  for w in ("one", "two", "three", "four"))))


def tiny_base(directory: Path) -> Path:
    from llm import ByteTokenizer
    fresh_model().save_pretrained(directory / "base", ByteTokenizer())
    return directory / "base"


def finetune_tiny(*args):
    """train.py finetune of an untrained tiny base on a four-line task, with ``args``."""
    return train("finetune", tiny_base, "--data", prompt_completion_file, "--steps", "2", *args)


def binary_directory(directory: Path) -> Path:
    for name in ("a.txt", "b.dat"):
        write(directory / name, b"text\x00with NUL bytes")
    return directory


def run_with_damaged_file(name: str, content: str):
    def make(tmp: Path) -> Path:
        return write(tmp / "old" / name, content).parent
    return make


COMMAND_LINE = {
    "data-missing-file": Case(train("--data", lambda d: d / "missing.txt"), CommandFailed, "missing.txt"),
    "data-empty-file": Case(train("--data", lambda d: write(d / "empty.txt", "  \n")), CommandFailed,
                            "empty.txt"),
    "data-bad-jsonl": Case(train("--data", lambda d: write(d / "bad.jsonl", '{"text": "a"}\nnot json\n')),
                           CommandFailed, "bad.jsonl, line 2"),
    "data-only-binary-files": Case(train("--data", lambda d: binary_directory(d / "binaries")), CommandFailed,
                                   "2 skipped as binary"),
    "warmup-longer-than-steps": Case(train("--warmup", "50", "--steps", "10"), CommandFailed, "--warmup"),
    "deg-with-softmax": Case(train("--mixer", "softmax", "--deg", "4"), CommandFailed, "--deg"),
    "model-unknown": Case(train("--model", "huge"), CommandFailed, "known presets"),
    "lr-nan": Case(train("--lr", "nan"), CommandFailed, "--lr: must be a finite number, got nan"),
    "lr-zero": Case(train("--lr", "0"), CommandFailed, "--lr: must be > 0"),
    "min-lr-above-lr": Case(train("--min-lr", "1"), CommandFailed, r"--min-lr: must be in \[0, --lr="),
    "grad-clip-nan": Case(train("--grad-clip", "nan"), CommandFailed, "--grad-clip: must be a finite number"),
    "weight-decay-inf": Case(train("--weight-decay", "inf"), CommandFailed,
                             "--weight-decay: must be a finite number"),
    "seed-negative": Case(train("--seed", "-1"), CommandFailed, r"--seed: must be in \[0, 2\^32\)"),
    "warmup-below-minus-one": Case(train("--warmup", "-2"), CommandFailed, "--warmup: must be >= 0, or -1"),
    "steps-zero": Case(train("--steps", "0"), CommandFailed, "--steps"),
    "batch-size-zero": Case(train("--batch-size", "0"), CommandFailed, "--batch-size"),
    "val-fraction-one": Case(train("--val-fraction", "1"), CommandFailed, "--val-fraction"),
    "set-unknown-field": Case(train("--set", "hidden_dim=3"), CommandFailed, "hidden_dim"),
    "set-without-value": Case(train("--set", "conv_size"), CommandFailed, "--set"),
    "out-is-a-file": Case(train("--out", lambda d: write(d / "a-file", "x")), CommandFailed, "--out: "),
    "cache-dir-is-a-file": Case(train("--cache-dir", lambda d: write(d / "a-file", "x")), CommandFailed,
                                "--cache-dir: "),
    "resume-malformed-config": Case(train("--resume", run_with_damaged_file("train_config.json", "{")),
                                    CommandFailed, "train_config.json cannot be read"),
    "resume-missing-run": Case(train("--resume", lambda d: d / "nowhere"), CommandFailed, "nowhere"),
    "cache-variable-is-a-file": Case(
        lambda ctx: train_cli(ctx, "--out", ctx.tmp / "run", env={"POWER_RETENTION_CACHE": str(
            write(ctx.tmp / "a-file", "x"))}), CommandFailed, r"POWER_RETENTION_CACHE=.*a-file is a file"),
    "sample-temperature-negative": Case(on_trained_run("sample", "RUN", "--temperature", "-1"), CommandFailed,
                                        "temperature must be a number >= 0"),
    "sample-top-p-above-one": Case(on_trained_run("sample", "RUN", "--top-p", "2"), CommandFailed,
                                   r"top_p must be in \(0, 1\]"),
    "sample-max-new-tokens-negative": Case(on_trained_run("sample", "RUN", "--max-new-tokens", "-5"),
                                           CommandFailed, "max_new_tokens must be an integer >= 0"),
    "report-incomplete-run": Case(train("report", run_with_damaged_file("metrics.jsonl", '{"step": 1}\n')),
                                  CommandFailed, "train_config.json is missing"),
    "finetune-rank-zero": Case(finetune_tiny("--rank", "0"), CommandFailed, "--rank: must be >= 1, got 0"),
    "finetune-quantized-base-trained-whole": Case(
        finetune_tiny("--adapter", "full", "--quantize-base", "4"), CommandFailed,
        "--quantize-base: a quantized base cannot be trained"),
    "finetune-base-not-a-model": Case(train("finetune", lambda d: (d / "empty").mkdir() or d / "empty",
                                            "--data", prompt_completion_file), CommandFailed,
                                      "empty: not a model directory"),
    "finetune-val-data-missing": Case(finetune_tiny("--val-data", lambda d: d / "none.jsonl"),
                                      CommandFailed, "--val-data: .*none.jsonl does not exist"),
    "finetune-epochs-negative": Case(finetune_tiny("--epochs", "-1"), CommandFailed,
                                     "--epochs: must be a finite number >= 0"),
    "fuse-pretraining-run": Case(on_trained_run("fuse", "RUN"), CommandFailed, "is a pretraining run"),
    "plan-deg-40-no-degrade": Case(train("plan", "--model", "tiny", "--power", "40", "--no-degrade"),
                                   CommandFailed, "the run does not fit in this machine"),
}

SURFACES = {"op": OP, "step": STEP, "layer": LAYER, "model": MODEL, "config": CONFIG,
            "tokenizer": TOKENIZER, "corpus": CORPUS, "weights": WEIGHTS, "adapters": ADAPTERS,
            "routing": ROUTING, "env": ENVIRONMENT,
            "cli": COMMAND_LINE}
CASES = {f"{surface}-{name}": case for surface, table in SURFACES.items() for name, case in table.items()}


@pytest.fixture(scope="module")
def shared_tmp(tmp_path_factory):
    Context.shared.clear()
    return tmp_path_factory.mktemp("shared")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_by_name(name, tmp_path, shared_tmp):
    case = CASES[name]
    with pytest.raises(case.error, match=case.message):
        case.call(Context(tmp_path, shared_tmp))


def test_the_table_covers_every_surface_with_120_cases():
    assert len(CASES) >= 120 and all(len(table) >= 4 for table in SURFACES.values())
