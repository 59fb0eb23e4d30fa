"""rwkv_jax against llama.cpp in interleaved pairs: per-pair ratios on a noisy machine.

    python -m experiments.paired configs/default.yaml --pairs 15
    python -m experiments.paired configs/default.yaml --dtypes float32 bfloat16 --pairs 15
    python -m experiments.paired configs/default.yaml --no-llama --pairs 8 \
        --variants chunked:engine.wkv_impl=chunked seq:engine.wkv_impl=sequential

The bench (experiments.bench) runs every rwkv_jax test, then every llama.cpp test: on a shared
2-core machine whose speed drifts by tens of per cent over minutes, the two blocks see different
machines and one ratio of their means moves from run to run (BENCHMARKS.md's CPU entries: tg128
0.63-1.15x over 13 bench runs). Here every engine runs each test once per pair, back to back, in
an order that rotates from pair to pair, with a short pause before each run (a pool's threads
spin for a while after their work and would tax whoever runs next). Each pair gives one ratio
per test; the report is the median ratio, its range, and how many pairs came out >= 1, with
each engine's median tok/s.

Tests are the config's llama_bench ppN / tgN (one stream; tokens drawn as the bench draws them),
each engine warmed up on each test first (compiles, page faults). rwkv_jax engines: the
config's engine settings, once per `--dtypes` entry (default: the config's dtype), or one per
`--variants NAME:OVERRIDE[,OVERRIDE...]` (config overrides on top of the command line's, e.g.
`bf16:engine.dtype=bfloat16`). The ratios are to llama.cpp, or with `--no-llama` to the first
engine (`--reference NAME` picks another).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from experiments import config as cfgmod
from experiments.llama_bench import TOKEN_SEED, BenchEngine
from experiments.seed_protocol import WyRand, draw_tokens
from rwkv_jax.errors import InputError, RwkvJaxError

REFERENCE = "llama.cpp"


def log(msg: str) -> None:
    """Progress to stderr (stdout carries the table)."""
    print(msg, file=sys.stderr, flush=True)


def tests_of(p, vocab_size: int) -> list[tuple[str, int, Callable[[BenchEngine], float]]]:
    """(name, tokens, run) for the config's ppN and tgN (config.LlamaBench); run(engine) ->
    seconds."""
    out = []
    for n in p.pp:
        toks = draw_tokens(WyRand(TOKEN_SEED), n, vocab_size)
        out.append((f"pp{n}", n, lambda e, toks=toks: e.pp(toks)))
    first = draw_tokens(WyRand(TOKEN_SEED), 1, vocab_size)
    for n in p.tg:
        out.append((f"tg{n}", n, lambda e, n=n: e.tg(first, n)))
    return out


def interleave(
    engines: dict[str, BenchEngine],
    tests: Sequence[tuple[str, int, Callable[[BenchEngine], float]]],
    pairs: int,
    pause: float = 0.25,
    reference: str = REFERENCE,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Warm every engine up on every test, then `pairs` rounds in which each engine runs each
    test once (engine order rotated by the round). Returns per test: each engine's tok/s per
    round, and for every other engine its per-round ratio to `reference` with a summary."""
    if pairs < 1:
        raise InputError(f"--pairs must be at least 1, got {pairs}")
    if reference not in engines or len(engines) < 2:
        raise InputError(f"interleave needs '{reference}' and at least one engine to compare")
    names = list(engines)
    for name in names:
        for _, _, run in tests:
            run(engines[name])
    tps: dict[str, dict[str, list[float]]] = {t: {n: [] for n in names} for t, _, _ in tests}
    for i in range(pairs):
        order = names[i % len(names) :] + names[: i % len(names)]
        for test, tokens, run in tests:
            for name in order:
                sleep(pause)
                tps[test][name].append(tokens / run(engines[name]))
        log(f"  pair {i + 1}/{pairs}: " + ", ".join(_pair_line(tps, i, reference)))
    out = {}
    for test, by in tps.items():
        rows = {n: {"tps": v, "median_tps": statistics.median(v)} for n, v in by.items()}
        for name in names:
            if name == reference:
                continue
            ratios = [a / b for a, b in zip(by[name], by[reference], strict=True)]
            rows[name]["ratios"] = ratios
            rows[name]["median_ratio"] = statistics.median(ratios)
            rows[name]["wins"] = sum(r >= 1.0 for r in ratios)
        out[test] = rows
    return out


def _pair_line(tps: dict, i: int, reference: str) -> list[str]:
    """One round's ratios, for the progress log."""
    parts = []
    for test, by in tps.items():
        for name, v in by.items():
            if name != reference:
                parts.append(f"{test} {name} {v[i] / by[reference][i]:.2f}x")
    return parts


def table(result: dict, reference: str = REFERENCE) -> str:
    """The markdown table of an `interleave` result."""
    lines = [
        f"| test | engine | median tok/s | {reference} median tok/s | median ratio | range | "
        f"pairs >= 1x |",
        "|---|---|---|---|---|---|---|",
    ]
    for test, rows in result.items():
        ref = rows[reference]["median_tps"]
        for name, row in rows.items():
            if name == reference:
                continue
            r = row["ratios"]
            lines.append(
                f"| {test} | {name} | {row['median_tps']:.1f} | {ref:.1f} | "
                f"{row['median_ratio']:.2f}x | {min(r):.2f}-{max(r):.2f}x | "
                f"{row['wins']} of {len(r)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input prints one line and exits 1."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.paired", description=__doc__.split("\n")[0]
    )
    p.add_argument("config", help="a YAML config, e.g. configs/default.yaml")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides, as for experiments.bench")
    p.add_argument("--pairs", type=int, default=15, help="interleaved rounds")
    p.add_argument("--dtypes", nargs="+", default=None, help="one rwkv_jax engine per dtype")
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME:OVERRIDES",
        help="one rwkv_jax engine per variant: NAME:KEY=VALUE[,KEY=VALUE...] config overrides",
    )
    p.add_argument("--no-llama", action="store_true", help="rwkv_jax engines only")
    p.add_argument("--reference", default=None, help="the engine ratios are taken against")
    p.add_argument("--pause", type=float, default=0.25, help="seconds before each run")
    p.add_argument("--out", default=None, help="append the result as a JSON line here")
    a = p.parse_args(argv)
    try:
        return _run(a)
    except RwkvJaxError as exc:
        print(f"paired: error: {exc}", file=sys.stderr)
        return 1


def variant_configs(a: argparse.Namespace, cfg) -> dict:
    """The rwkv_jax engines to build, name -> config: one per --variants entry (its overrides on
    top of the command line's), else one per --dtypes entry, else the config as it is."""
    if a.variants and a.dtypes:
        raise InputError("--variants and --dtypes do not go together (a variant can set dtype)")
    if a.variants:
        out = {}
        for spec in a.variants:
            name, sep, overrides = spec.partition(":")
            if not sep or not name or name in out:
                raise InputError(
                    f"--variants {spec!r}: give NAME:KEY=VALUE[,KEY=VALUE...], names distinct, "
                    f"e.g. bf16:engine.dtype=bfloat16"
                )
            extra = [o for o in overrides.split(",") if o]
            out[name] = cfgmod.load(a.config, [*a.overrides, *extra])
        if len(out) < 2 and a.no_llama:
            raise InputError("--no-llama needs at least two --variants to pair")
        return out
    if a.no_llama and len(a.dtypes or []) < 2:
        raise InputError("--no-llama needs at least two engines: --dtypes A B or --variants")
    return {
        f"rwkv_jax {d}": cfgmod.load(a.config, [*a.overrides, f"engine.dtype={d}"])
        for d in a.dtypes or [cfg.engine.dtype]
    }


def _run(a: argparse.Namespace) -> int:
    from experiments import bench, llamacpp

    cfg = cfgmod.load(a.config, a.overrides)
    if cfg.protocols.llama_bench is None:
        raise InputError(f"{a.config}: protocols.llama_bench is null: no tests to pair")
    variants = variant_configs(a, cfg)
    if not a.no_llama and not llamacpp.available():
        raise InputError(
            "llama-cpp-python is not installed: pip install 'llama-cpp-python==0.3.36' (or "
            "compare rwkv_jax variants alone: --no-llama)"
        )
    bench.select_platform(cfg.platform)
    path = bench.resolve_model(cfg.model)
    from experiments.engine_jax import JaxEngine

    engines: dict[str, BenchEngine] = {}
    for name, vcfg in variants.items():
        eng = JaxEngine(path, dataclasses.asdict(vcfg.engine))
        eng.load_once()
        engines[name] = eng
    if not a.no_llama:
        engines[REFERENCE] = llamacpp.LlamaCppEngine(path)
    reference = a.reference or (next(iter(engines)) if a.no_llama else REFERENCE)
    vocab = next(iter(engines.values())).vocab_size
    tests = tests_of(cfg.protocols.llama_bench, vocab)
    log(f"{os.path.basename(path)}: {len(engines)} engines, {a.pairs} pairs of {len(tests)} tests")
    result = interleave(engines, tests, a.pairs, a.pause, reference=reference)
    print(table(result, reference=reference))
    if a.out:
        rec = {"model": os.path.basename(path), "config": cfgmod.to_dict(cfg), "pairs": a.pairs}
        with open(a.out, "a") as f:
            f.write(json.dumps(rec | {"result": result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
