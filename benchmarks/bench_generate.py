"""Decode step time against context length: power retention's recurrent state against
softmax attention's KV cache, on the same model otherwise.

    python benchmarks/bench_generate.py                    # tiny preset, contexts 128, 1k, 8k

For each mixer the prompt cache is filled to each context in turn (prefill in pieces of
2048 tokens), then single decode steps (one token in, logits out) are timed: median of
--steps after a warm-up step. Each timed step appends its token, so a context point's steps
run at context .. context + steps (128 .. 149 by default), and later points start that much
further on. Target: the power mixer's step at 8k within 1.3x of its step at 128.
"""

from __future__ import annotations

import time

import click
import mlx.core as mx
from common import machine_description, machine_line, median_seconds, now, write_report

from llm import RetentionLLM, create_model_config
from power_retention.cpu_tuning import tune_process

PREFILL_PIECE = 2048


def fill(model, cache, tokens):
    for start in range(0, tokens.shape[1], PREFILL_PIECE):
        model(tokens[:, start:start + PREFILL_PIECE], cache=cache)
        mx.eval([c.state for c in cache])


@click.command()
@click.option("--model", "preset", default="tiny", show_default=True)
@click.option("--contexts", default="128,1024,8192", show_default=True)
@click.option("--steps", default=20, show_default=True, help="timed decode steps (median)")
@click.option("--out", default=None, help="JSON path (default benchmarks/results/generate-DATE.json)")
def main(preset, contexts, steps, out):
    tune_process()
    contexts = sorted(int(c) for c in contexts.split(","))
    started = now()
    machine = machine_description()
    print(f"# decode step benchmark, {started:%Y-%m-%d %H:%M %Z}; model {preset}, batch 1, fp32")
    print(f"# machine: {machine_line(machine)}")
    print(f"# median of {steps} single-token steps after a warm-up step, at each context")
    header = f"{'mixer':>8} {'context':>8} {'step ms':>9} {'tokens/s':>9} {'cache MB':>9} {'vs first':>9}"
    print(header)
    print("-" * len(header))
    results = []
    for mixer in ("power", "softmax"):
        mx.random.seed(0)
        model = RetentionLLM(create_model_config(preset, mixer=mixer))
        mx.eval(model.parameters())
        vocab = model.config.vocab_size
        cache, filled, first = model.make_cache(), 0, None
        prompt = mx.random.randint(0, vocab, (1, contexts[-1]))
        token = mx.array([[1]])
        for context in contexts:
            start = time.perf_counter()
            fill(model, cache, prompt[:, filled:context])
            prefill_s = time.perf_counter() - start
            filled = context

            def step():
                return model(token, cache=cache)

            seconds = median_seconds(step, steps)
            first = first or seconds
            cache_bytes = sum(c.nbytes for c in cache)
            results.append({"mixer": mixer, "context": context, "step_s": seconds,
                            "tokens_per_s": 1 / seconds, "cache_bytes": cache_bytes,
                            "prefill_s": prefill_s, "ratio_to_first": seconds / first})
            print(f"{mixer:>8} {context:>8} {1e3 * seconds:>9.2f} {1 / seconds:>9.1f} "
                  f"{cache_bytes / 1e6:>9.2f} {seconds / first:>8.2f}x", flush=True)
    out = write_report("bench_generate", started,
                       {"config": {"model": preset, "batch": 1, "dtype": "float32", "steps": steps},
                        "results": results}, out)
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
