"""Several adapters on one base model, and a router that chooses one for each prompt.

    from llm.route import AdapterSet, Router
    adapters = AdapterSet("runs/base", {"reverse": "runs/finetune-reverse", "spell": "runs/finetune-spell"})
    router = Router(adapters, rules=[{"adapter": "reverse", "keywords": ["reverse"]}], default="spell")
    router.fit_centroids()                   # nearest centroid of each adapter's training prompts
    route = router.route("reverse abc =")    # Route(adapter="reverse", reason="rule 1: keyword 'reverse'")
    text, route = router.generate("spell abc =", max_new_tokens=20)

    python -m llm.route --base runs/base --adapter reverse=runs/finetune-reverse \\
        --adapter spell=runs/finetune-spell --rules rules.json --classify --prompt "reverse abc ="
    python -m llm.route ... --interactive

The base is loaded once. Switching adapters swaps the adapter tensors held in memory (and,
between adapters of different shapes, the small adapter layers around the base's own): the
base's weights are never read again. An adapter is an adapter directory (mlx-lm's:
adapters.safetensors + adapter_config.json) or a fine-tuning run of ``train.py finetune``
(its best checkpoint's adapters); one trained over a quantized base is served over the same
quantization, and all must share it.

Routing, in order: rules (keywords or regular expressions, the first that matches wins), then
the classifier (nearest centroid: the prompt's mean hidden state under the base alone, less
the mean over every adapter's training prompts, against each adapter's mean direction, by
cosine), then the default. Every
choice says which adapter answered and why.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten

from . import load
from .adapters import (ADAPTER_CONFIG, ADAPTER_FILE, add_adapters, files_fingerprint,
                       first_mismatch, quantize_base, remove_adapters)
from .atomic import verify_directory
from .data import read_documents
from .generate import generate


def adapter_directory(path) -> Path:
    """An adapter directory, or a fine-tuning run's best (else last) checkpoint's adapters."""
    path = Path(path)
    for candidate in (path, path / "checkpoints" / "best" / "adapters",
                      path / "checkpoints" / "last" / "adapters"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG} there or in a run's checkpoints: not an "
                            f"adapter directory nor a fine-tuning run")


def _training_prompts(directory: Path) -> list[str]:
    """The prompts an adapter was trained on, read from its fine-tuning run's --data."""
    run = directory.parent.parent.parent
    options = run / "train_config.json"
    if not options.is_file():
        raise ValueError(f"{directory}: not inside a fine-tuning run, so its training prompts are "
                         f"unknown: give them with examples={{name: file}}")
    return [doc.text[:doc.prompt_chars] or doc.text
            for doc in read_documents(json.loads(options.read_text())["data"])]


@dataclass
class Adapter:
    name: str
    directory: Path
    config: dict
    weights: dict              # name -> array, held in memory

    @property
    def shape(self) -> tuple:
        """What the adapter layers look like: adapters of one shape swap tensors only."""
        parameters = self.config.get("lora_parameters", {})
        return (self.config.get("fine_tune_type", "lora"), self.config["num_layers"],
                parameters.get("rank"), parameters.get("scale"), parameters.get("dropout", 0.0))

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.weights.values())


class AdapterSet:
    """One base model and several named adapters, any one of them active at a time."""

    def __init__(self, base, adapters: dict):
        if not adapters:
            raise ValueError("adapters is empty: give at least one name=directory")
        self.model, self.tokenizer = load(base)
        base_fingerprint = files_fingerprint(Path(base))
        self.adapters: dict[str, Adapter] = {}
        for name, path in adapters.items():
            directory = adapter_directory(path)
            verify_directory(directory)
            config = json.loads((directory / ADAPTER_CONFIG).read_text())
            if config.get("fine_tune_type", "lora") == "full":
                raise ValueError(f"adapter {name!r} ({directory}) is a full fine-tune, not an "
                                 f"adapter: serve its fused model on its own")
            trained_on = config.get("base_fingerprint")
            if trained_on and trained_on != base_fingerprint:
                raise ValueError(f"adapter {name!r} ({directory}) was trained on another base "
                                 f"({config.get('model')}), not on {base}")
            self.adapters[name] = Adapter(name, directory, config, mx.load(str(directory / ADAPTER_FILE)))
        quantized = {a.config.get("quantize_base", "none") for a in self.adapters.values()}
        if len(quantized) > 1:
            raise ValueError(f"the adapters were trained over differently quantized bases "
                             f"({', '.join(sorted(quantized))}): serve each group apart")
        self.quantization = quantized.pop()
        if self.quantization != "none":
            quantize_base(self.model, int(self.quantization))
        self.base_bytes = sum(array.nbytes for _, array in tree_flatten(self.model.parameters()))
        self.active: str | None = None
        self._layers: tuple | None = None  # the shape of the adapter layers in place
        for adapter in self.adapters.values():  # every adapter fits this base, checked up front
            self.use(adapter.name)
        self.use(None)

    def use(self, name: str | None):
        """Make adapter ``name`` active (None: the base alone)."""
        if name == self.active:
            return
        if name is None:
            remove_adapters(self.model)
            self.active, self._layers = None, None
            return
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; known: {', '.join(self.adapters)}")
        adapter = self.adapters[name]
        if self._layers != adapter.shape:
            remove_adapters(self.model)
            kind, layers, rank, scale, dropout = adapter.shape
            add_adapters(self.model, kind, rank, layers, scale=scale, dropout=dropout)
            self._layers = adapter.shape
        mismatch = first_mismatch(adapter.weights, self.model)
        if mismatch:
            remove_adapters(self.model)
            self.active, self._layers = None, None
            raise ValueError(f"adapter {name!r} ({adapter.directory / ADAPTER_FILE}) does not fit "
                             f"this base (first mismatch: {mismatch!r}): it was trained on another model")
        self.model.load_weights(list(adapter.weights.items()), strict=False)
        self.model.eval()
        self.active = name

    def memory(self) -> dict:
        """Bytes held: the base once, each adapter, and what one model per adapter would hold."""
        adapters = {name: adapter.nbytes for name, adapter in self.adapters.items()}
        return {"base": self.base_bytes, "adapters": adapters,
                "total": self.base_bytes + sum(adapters.values()),
                "separate_models": len(adapters) * self.base_bytes}


@dataclass
class Route:
    adapter: str | None
    reason: str


class Router:
    """Chooses an adapter of ``adapters`` for a prompt: ``rules`` (a list of {"adapter",
    "keywords": [...] and/or "regex": "..."}), then the nearest centroid once fitted, then
    ``default`` (an adapter's name, or None for the base alone)."""

    def __init__(self, adapters: AdapterSet, rules=(), default: str | None = None,
                 min_similarity: float = 0.0):
        self.adapters = adapters
        self.rules = [self._checked_rule(k, rule) for k, rule in enumerate(rules, 1)]
        if default is not None and default not in adapters.adapters:
            raise ValueError(f"default {default!r} is not an adapter; known: {', '.join(adapters.adapters)}")
        self.default, self.min_similarity = default, min_similarity
        self.centroids: dict[str, mx.array] = {}
        self.center: mx.array | None = None

    @classmethod
    def from_rules_file(cls, adapters: AdapterSet, path, **options) -> "Router":
        """Rules from a JSON file: {"rules": [...], "default": NAME}."""
        try:
            values = json.loads(Path(path).read_text())
            rules, default = values.get("rules", []), values.get("default")
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(f"{path}: not a rules file ({{\"rules\": [...], \"default\": NAME}}): "
                             f"{error}") from None
        return cls(adapters, rules, options.pop("default", None) or default, **options)

    def _checked_rule(self, number: int, rule) -> dict:
        where = f"rule {number}"
        if not isinstance(rule, dict) or rule.get("adapter") not in self.adapters.adapters:
            raise ValueError(f"{where} must be an object whose \"adapter\" is one of "
                             f"{', '.join(self.adapters.adapters)}, got {rule!r}")
        keywords = rule.get("keywords", [])
        if not isinstance(keywords, list) or not all(isinstance(k, str) and k for k in keywords):
            raise ValueError(f"{where}: \"keywords\" must be a list of non-empty strings, got {keywords!r}")
        try:
            pattern = re.compile(rule["regex"]) if "regex" in rule else None
        except (re.error, TypeError) as error:
            raise ValueError(f"{where}: \"regex\" {rule['regex']!r} is not a regular expression: {error}") from None
        if not keywords and pattern is None:
            raise ValueError(f"{where} has neither \"keywords\" nor \"regex\": it would never match")
        return {"adapter": rule["adapter"], "keywords": [k.lower() for k in keywords], "regex": pattern}

    def embed(self, prompts: list[str]) -> mx.array:
        """(N, hidden) mean final hidden state of each prompt under the base alone."""
        active = self.adapters.active
        self.adapters.use(None)
        tokenizer, model = self.adapters.tokenizer, self.adapters.model
        vectors = []
        for prompt in prompts:
            ids = tokenizer.encode(prompt, add_bos=True)
            vectors.append(model.hidden_states(mx.array([ids]))[0].mean(axis=0))
        self.adapters.use(active)
        return mx.stack(vectors)

    def _direction(self, vectors: mx.array) -> mx.array:
        """Unit vectors from the mean of all training prompts: what every prompt shares (the
        bulk of a mean hidden state) would otherwise make every centroid look alike."""
        vectors = vectors - self.center
        return vectors / mx.maximum(mx.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)

    def fit_centroids(self, examples: dict | None = None):
        """The classifier: each adapter's centroid over its training prompts (``examples``:
        {name: prompts or a data file}; default: each adapter's fine-tuning run's --data)."""
        examples = examples or {}
        embedded = {}
        for name, adapter in self.adapters.adapters.items():
            prompts = examples.get(name)
            if isinstance(prompts, (str, Path)):
                prompts = [doc.text[:doc.prompt_chars] or doc.text for doc in read_documents(str(prompts))]
            prompts = prompts if prompts is not None else _training_prompts(adapter.directory)
            if not prompts:
                raise ValueError(f"adapter {name!r}: no training prompts to learn its centroid from")
            embedded[name] = self.embed(list(prompts))
        self.center = mx.concatenate(list(embedded.values())).mean(axis=0)
        for name, vectors in embedded.items():
            centroid = self._direction(vectors).mean(axis=0)
            self.centroids[name] = centroid / mx.maximum(mx.linalg.norm(centroid), 1e-12)
        mx.eval(self.center, self.centroids)

    def route(self, prompt: str) -> Route:
        lowered = prompt.lower()
        for number, rule in enumerate(self.rules, 1):
            keyword = next((k for k in rule["keywords"] if k in lowered), None)
            if keyword is not None:
                return Route(rule["adapter"], f"rule {number}: keyword {keyword!r}")
            if rule["regex"] is not None and rule["regex"].search(prompt):
                return Route(rule["adapter"], f"rule {number}: regex {rule['regex'].pattern!r}")
        if self.centroids:
            names = list(self.centroids)
            direction = self._direction(self.embed([prompt]))[0]
            similarity = (mx.stack([self.centroids[n] for n in names]) @ direction).tolist()
            ranked = sorted(zip(similarity, names), reverse=True)
            (best, name), runner_up = ranked[0], ranked[1:2]
            if best >= self.min_similarity:
                after = f"; next {runner_up[0][1]} {runner_up[0][0]:.3f}" if runner_up else ""
                return Route(name, f"nearest centroid (cosine {best:.3f}{after})")
        return Route(self.default, "no rule matched" + (" and no centroid was near enough"
                                                        if self.centroids else "") + ": the default")

    def generate(self, prompt: str, max_new_tokens: int = 100, **sampling) -> tuple[str, Route]:
        """The routed adapter's continuation of ``prompt``, and the route."""
        chosen = self.route(prompt)
        self.adapters.use(chosen.adapter)
        return generate(self.adapters.model, self.adapters.tokenizer, prompt, max_new_tokens,
                        **sampling), chosen


def _named(values) -> dict:
    named = {}
    for value in values:
        name, equals, path = value.partition("=")
        if not equals or not name or not path:
            raise click.BadParameter(f"expected NAME=DIRECTORY, got {value!r}", param_hint="--adapter")
        if name in named:
            raise click.BadParameter(f"adapter {name!r} given twice", param_hint="--adapter")
        named[name] = path
    return named


@click.command()
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False),
              help="the base model directory")
@click.option("--adapter", "adapters", multiple=True, required=True, metavar="NAME=DIR",
              help="an adapter directory or fine-tuning run, repeatable")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False),
              help='JSON: {"rules": [{"adapter": NAME, "keywords": [...], "regex": "..."}], "default": NAME}')
@click.option("--classify/--no-classify", default=False,
              help="nearest centroid of each adapter's training prompts after the rules")
@click.option("--default", "default", default=None, help="the adapter when nothing matches (default: the base alone)")
@click.option("--prompt", "prompts", multiple=True, help="a prompt, repeatable")
@click.option("--interactive", is_flag=True, help="read prompts from standard input, one per line")
@click.option("--max-new-tokens", type=int, default=100, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
def main(base, adapters, rules, classify, default, prompts, interactive, max_new_tokens, temperature):
    """Answer prompts with the adapter a router chooses for each, over one base model."""
    from power_retention.cpu_tuning import tune_process

    tune_process()
    try:
        adapter_set = AdapterSet(base, _named(adapters))
        options = {"default": default}
        router = (Router.from_rules_file(adapter_set, rules, **options) if rules
                  else Router(adapter_set, **options))
        if classify:
            router.fit_centroids()
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    memory = adapter_set.memory()
    print(f"base {base}: {memory['base'] / 1e6:.2f} MB once; adapters " + ", ".join(
        f"{n} {b / 1e6:.3f} MB" for n, b in memory["adapters"].items())
          + f"; {memory['total'] / 1e6:.2f} MB in all, against {memory['separate_models'] / 1e6:.2f} MB "
            f"for one model per adapter")

    def answer(prompt):
        text, chosen = router.generate(prompt, max_new_tokens, temperature=temperature)
        print(f"[{chosen.adapter or 'base'}: {chosen.reason}] {prompt}{text}", flush=True)

    for prompt in prompts:
        answer(prompt)
    if interactive:
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if line.strip():
                answer(line)


if __name__ == "__main__":
    main()
