"""The generation loop's two forms, interleaved in one process: a scan of a fixed length against
a while loop with a traced step count (session.sample_steps without / with `count`).

    python -m experiments.decode_loop --preset 0.1b --batch 1 --steps 128 --rounds 12

Each round times both forms once (order alternating), `--steps` greedy steps of `--batch`
streams from a zero state, the way the bench's tg does (one decode step, then steps - 1 sampled
and fed back on the device); the report is each form's times and the median of the per-round
ratios scan / while (above 1: the while loop is faster). session.traced_count_loop picks the
form generation uses per backend from this comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import rwkv_jax
from experiments.engine_jax import greedy_loop_args
from rwkv_jax import synth
from rwkv_jax.generate import decode_fn
from rwkv_jax.session import sample_steps


def timed_loop(model, batch: int, steps: int, traced: bool) -> float:
    """Seconds for `steps` greedy steps of `batch` streams, tokens back on the host."""
    V = model.config.vocab_size
    state = model.new_state(batch)
    first = jnp.arange(1, batch + 1, dtype=jnp.int32)
    args = (*greedy_loop_args(batch, V, steps), jnp.int32(steps - 1) if traced else None)
    jax.block_until_ready((state, first))
    t0 = time.perf_counter()
    logits, state = decode_fn()(model.params, first, state, cfg=model.config, dtype=model.dtype)
    out = sample_steps(
        model.params, logits, state, *args, n=steps - 1, cfg=model.config, dtype=model.dtype
    )
    np.asarray(out[0])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the synthetic preset)")
    p.add_argument("--preset", default="0.1b")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--rounds", type=int, default=12)
    a = p.parse_args(argv)
    if a.steps < 3 or a.batch < 1 or a.rounds < 1:
        p.error("--steps must be >= 3, --batch and --rounds >= 1")
    path = a.model or str(synth.ensure(a.preset, a.type, 0))
    model = rwkv_jax.load(path, dtype=a.dtype)
    for traced in (False, True, False, True):  # compile and warm both
        timed_loop(model, a.batch, a.steps, traced)
    scan, loop = [], []
    for r in range(a.rounds):
        for traced in (False, True) if r % 2 == 0 else (True, False):
            (loop if traced else scan).append(timed_loop(model, a.batch, a.steps, traced))
    ratios = [s / w for s, w in zip(scan, loop, strict=True)]
    print(jax.devices()[0].device_kind, os.path.basename(path), f"B={a.batch} steps={a.steps}")
    print("scan  ms", [round(1e3 * t, 1) for t in scan])
    print("while ms", [round(1e3 * t, 1) for t in loop])
    print(
        f"median scan/while {statistics.median(ratios):.4f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f}, {a.rounds} rounds)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
