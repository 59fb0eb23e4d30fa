"""llama-bench style tests (bench-protocol.md §2): ppN, tgN and batched decode, mean ± sd.

As `llama-bench -p N -n M -r R`: every test first runs once untimed (the whole prompt for ppN,
2 steps for tgN; for rwkv_jax this also compiles), then R timed runs, each from a fresh zero
state; tok/s is computed per run and reported as mean ± sample standard deviation. ppN feeds N
random tokens in one prefill call and reads the last logits back; tgN runs N single-token steps
feeding back the greedy token (llama-bench feeds random tokens; greedy feedback is the loop a
user runs and costs the same per step). Batched decode runs B independent streams of greedy
steps; its figure is aggregate tok/s (B * steps / seconds).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Protocol

from experiments.seed_protocol import WyRand, draw_tokens

TOKEN_SEED = 42  # random prompt tokens, drawn as the seed protocol draws them


class BenchEngine(Protocol):
    """What the llama-bench tests need from an engine."""

    vocab_size: int

    def pp(self, tokens: Sequence[int]) -> float:
        """Seconds for one prefill from a zero state."""
        ...

    def tg(self, first: Sequence[int], n: int) -> float:
        """Seconds for n greedy steps of len(first) streams from a zero state."""
        ...


def stats(tps: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one run)."""
    return statistics.fmean(tps), (statistics.stdev(tps) if len(tps) > 1 else 0.0)


def _timed(fn: Callable[[], float], warmup: Callable[[], float], repeats: int, tokens: int) -> dict:
    """One warm-up call, then `repeats` timed calls; tok/s per run, mean and sd."""
    warmup()
    secs = [fn() for _ in range(repeats)]
    tps = [tokens / s for s in secs]
    mean, sd = stats(tps)
    return {"seconds": secs, "tps_runs": tps, "tps_mean": mean, "tps_sd": sd}


def run(
    engine: BenchEngine,
    p,
    repeats: int,
    log: Callable[[str], None] = print,
    batched: bool = True,
) -> dict:
    """Run the ppN, tgN and batched tests of `p` (config.LlamaBench)."""
    V = engine.vocab_size
    tests = []
    for n in p.pp:
        toks = draw_tokens(WyRand(TOKEN_SEED), n, V)
        fn = lambda toks=toks: engine.pp(toks)  # noqa: E731
        r = _timed(fn, fn, repeats, n)
        tests.append({"name": f"pp{n}", "tokens": n, **r})
        log(f"  pp{n}: {r['tps_mean']:.2f} ± {r['tps_sd']:.2f} tok/s")
    first = draw_tokens(WyRand(TOKEN_SEED), 1, V)
    for n in p.tg:
        # warm-up with the same n: an engine may compile its generation loop per length
        r = _timed(lambda n=n: engine.tg(first, n), lambda n=n: engine.tg(first, n), repeats, n)
        tests.append({"name": f"tg{n}", "tokens": n, **r})
        log(f"  tg{n}: {r['tps_mean']:.2f} ± {r['tps_sd']:.2f} tok/s")
    batch = []
    for b in p.batch if batched else ():
        starts = draw_tokens(WyRand(TOKEN_SEED), b, V)
        r = _timed(
            lambda s=starts: engine.tg(s, p.batch_steps),
            lambda s=starts: engine.tg(s, p.batch_steps),
            repeats,
            b * p.batch_steps,
        )
        batch.append({"name": f"decode B={b}", "streams": b, "steps": p.batch_steps, **r})
        log(f"  decode B={b}: {r['tps_mean']:.2f} ± {r['tps_sd']:.2f} tok/s aggregate")
    return {"repeats": repeats, "tests": tests, "batched": batch}
