"""Prefill layouts over prompt lengths: tokens per scan step, per compiled call, per tail step.

Run:  python -m experiments.layout_sweep [--layouts 128/256/16 256/256/16 512/512/128]
          [--lengths 64 200 300 512 700 1024] [--rounds 4] [--preset 0.1b --type Q4_K_M]

A layout STEP/CALL/TAIL (tokens; multiples of the chunk, 16) sets `Model.chunks_per_step`,
`chunks_per_call` and `tail_chunks` (TAIL 0: a prompt shorter than a step runs as one padded
step; otherwise in TAIL-token steps, a second program). One model is loaded; each layout is a
copy of it with those fields replaced (the weights are shared). Every layout runs every length
once per round (layouts in a rotating order, best of 2 calls each), after a warm-up call per
length and layout (compiles); the table gives the median tok/s over rounds, prompt tokens drawn
at random (numpy seed 0), from a zero state, logits to the host. One pp figure (`bench`) cannot
pick a layout: a step is computed whole, so a prompt shorter than a step is padded or runs in
tail steps (generate.default_layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import numpy as np

import rwkv_jax
from rwkv_jax import synth
from rwkv_jax.errors import InputError
from rwkv_jax.generate import Model


def parse_layout(text: str, chunk: int) -> tuple[int, int, int]:
    """'STEP/CALL/TAIL' tokens -> (chunks_per_step, chunks_per_call, tail_chunks)."""
    parts = text.split("/")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise InputError(f"a layout is STEP/CALL/TAIL in tokens, e.g. 128/256/16; got {text!r}")
    step, call, tail = (int(p) for p in parts)
    if step < chunk or call < step or any(v % chunk for v in (step, call, tail)):
        raise InputError(
            f"layout {text!r}: STEP >= {chunk}, CALL >= STEP, all multiples of the {chunk}-token "
            "chunk"
        )
    if call % step or tail > step or (tail and step % tail):
        raise InputError(f"layout {text!r}: CALL a multiple of STEP, TAIL dividing STEP")
    return step // chunk, call // chunk, tail // chunk


def variants(model: Model, layouts: list[str]) -> dict[str, Model]:
    """One copy of `model` per layout (shared weights)."""
    out = {}
    for text in layouts:
        step, call, tail = parse_layout(text, model.chunk_size)
        out[text] = dataclasses.replace(
            model, chunks_per_step=step, chunks_per_call=call, tail_chunks=tail
        )
    return out


def seconds(model: Model, tokens: np.ndarray) -> float:
    """One prefill from a zero state, logits on the host."""
    t0 = time.perf_counter()
    logits, _ = model.forward(tokens)
    np.asarray(logits)
    return time.perf_counter() - t0


def sweep(models: dict[str, Model], lengths: list[int], rounds: int, timer=seconds) -> dict:
    """{(layout, length): [tok/s per round]} (warm-up first; best of 2 per round)."""
    rng = np.random.default_rng(0)
    vocab = next(iter(models.values())).config.vocab_size
    prompts = {n: rng.integers(1, vocab, n).astype(np.int32) for n in lengths}
    for m in models.values():
        for n in lengths:
            timer(m, prompts[n])
    names = list(models)
    tps: dict[tuple[str, int], list[float]] = {(k, n): [] for k in names for n in lengths}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in lengths:
            for k in order:
                best = min(timer(models[k], prompts[n]) for _ in range(2))
                tps[(k, n)].append(n / best)
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return tps


def table(tps: dict, layouts: list[str], lengths: list[int]) -> str:
    """Markdown: one row per length, the median tok/s of each layout."""
    lines = ["| prompt tokens | " + " | ".join(layouts) + " |"]
    lines.append("|---|" + "---|" * len(layouts))
    for n in lengths:
        cells = [f"{statistics.median(tps[(k, n)]):.1f}" for k in layouts]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=["128/256/16", "256/256/16", "512/512/128"])
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 200, 300, 512, 700, 1024])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--preset", default="0.1b")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--model", default=None, help="a .gguf file instead of the synthetic one")
    a = p.parse_args(argv)
    try:
        if a.rounds < 1 or not a.lengths or min(a.lengths) < 1:
            raise InputError("--rounds and every --lengths value must be at least 1")
        model = rwkv_jax.load(a.model or str(synth.ensure(a.preset, a.type, 0)))
        models = variants(model, a.layouts)
    except InputError as e:
        print(f"layout_sweep: {e}", file=sys.stderr)
        return 2
    tps = sweep(models, a.lengths, a.rounds)
    print(table(tps, a.layouts, a.lengths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
