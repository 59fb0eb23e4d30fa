"""Config-driven benchmarks of rwkv_jax: the seed's protocol exactly, plus llama-bench style
tests, compile time, decode bandwidth, peak memory, fidelity and an optional llama.cpp run.

    python -m experiments.bench configs/default.yaml                      # what `make bench` runs
    python -m experiments.bench configs/default.yaml model.preset=tiny repeats=1
    python -m experiments.bench configs/cpu.yaml --title "T" --change "what changed"
    python -m experiments.bench --plot --title "T"                        # history PNG only
    python -m experiments.bench --schema                                  # every config key

Each run prints a table, appends one JSON line to results/bench.jsonl, and with --title/--change
appends the seed's markdown entry to BENCHMARKS.md (see BENCHMARKS.md for how to read it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform as pyplatform
import re
import subprocess
import sys
from typing import Any

from experiments import config as cfgmod
from experiments import report
from rwkv_jax.errors import ConfigError, InputError, RwkvJaxError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_PLATFORM = {"cpu": "cpu", "cuda": "cuda"}  # config platform -> JAX_PLATFORMS value
DEVICE_PLATFORMS = {"cpu": ("cpu",), "cuda": ("gpu", "cuda"), "metal": ("metal", "mps")}


def log(msg: str) -> None:
    """Progress to stderr (stdout carries the result table)."""
    print(msg, file=sys.stderr, flush=True)


# ---- platform and model ----------------------------------------------------------------------


def _backends_started() -> bool:
    """True once JAX has created its backends (then the platform can no longer change)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API; the CLI sets the platform first anyway
        return False


def select_platform(name: str) -> None:
    """Point JAX at the configured platform before any device is used, then check it took."""
    import jax

    old = (os.environ.get("JAX_PLATFORMS"), jax.config.jax_platforms)
    if name in JAX_PLATFORM and not _backends_started():
        # changing jax_platforms after the backends exist breaks JAX's state: only before
        os.environ["JAX_PLATFORMS"] = JAX_PLATFORM[name]
        jax.config.update("jax_platforms", JAX_PLATFORM[name])
    try:
        dev = jax.devices()[0]
    except (RuntimeError, AssertionError) as exc:  # jax 0.10 asserts when no backend started
        # put the previous setting back, so this process can still use JAX
        if old[0] is None:
            os.environ.pop("JAX_PLATFORMS", None)
        else:
            os.environ["JAX_PLATFORMS"] = old[0]
        jax.config.update("jax_platforms", old[1])
        why = str(exc) or "no backend could be initialized"
        raise ConfigError(f"platform: {name}: JAX cannot start it here ({why})") from None
    if name == "auto":
        return
    if dev.platform.lower() not in DEVICE_PLATFORMS[name]:
        hint = {
            "metal": "on a Mac, install a Metal PJRT plugin (jax-metal with jax 0.4.38, or "
            "jax-mps) and leave JAX_PLATFORMS unset",
            "cuda": "install jax[cuda13] (pip install -e '.[cuda]') on a machine with a GPU",
            "cpu": "JAX was started on another platform earlier in this process",
        }[name]
        raise ConfigError(
            f"platform: {name} was asked for but JAX runs on '{dev.platform}' ({hint})"
        )


def resolve_model(m: cfgmod.ModelSpec) -> str:
    """Path of the model file; a synthetic model is generated on first use (progress shown)."""
    if m.file is not None:
        path = os.path.expanduser(m.file)
        if not os.path.isfile(path):
            raise InputError(
                f"model.file: {path}: no such file (this config needs that model file; put it "
                f"there, or run with model.file=null model.preset=0.1b model.type=Q4_K_M "
                f"model.seed=0 for a synthetic one)"
            )
        return path
    from rwkv_jax import synth

    assert m.preset is not None and m.type is not None and m.seed is not None
    path = synth.default_path(m.preset, m.type, m.seed, m.cache_dir)
    if not os.path.exists(path):
        log(f"synthesizing {m.preset} {m.type} (seed {m.seed}) into {path}, once")
    return synth.ensure(m.preset, m.type, m.seed, m.cache_dir, progress=True)


def git_info() -> dict:
    """HEAD commit of the repository and whether tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()

    try:
        return {
            "sha": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"sha": "unknown", "dirty": False}


def versions() -> dict:
    """Versions of what produced the numbers."""
    import jax
    import jaxlib
    import numpy

    import rwkv_jax

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": numpy.__version__,
        "python": pyplatform.python_version(),
        "rwkv_jax": rwkv_jax.__version__,
    }


def seed_deviations(p: cfgmod.SeedProtocol) -> dict:
    """Parameters that differ from the seed's constants (empty: the seed protocol exactly)."""
    base = cfgmod.SEED_DEFAULTS
    return {
        f.name: getattr(p, f.name)
        for f in dataclasses.fields(p)
        if getattr(p, f.name) != getattr(base, f.name)
    }


def fidelity_tokens(tokenizer, n: int) -> list[int]:
    """The first n tokens of the fixed fidelity text (repeated if it is shorter)."""
    from experiments.metrics import FIDELITY_TEXT

    ids = tokenizer.encode(FIDELITY_TEXT)
    while len(ids) < n:
        ids = ids + tokenizer.encode(" " + FIDELITY_TEXT)
    return ids[:n]


# ---- the run ---------------------------------------------------------------------------------


def run_benchmark(cfg: cfgmod.BenchConfig, title: str = "", change: str = "") -> dict:
    """Measure everything the config asks for; returns the result record."""
    # other work on the host distorts CPU timings: record the load before ours starts (later
    # samples would count this process too)
    load_start = os.getloadavg()[0]
    from experiments.metrics import cpu_snapshot, others_cpu_share

    cpu_start = cpu_snapshot()
    select_platform(cfg.platform)
    if cfg.platform == "cpu" and load_start > 0.5 * (os.cpu_count() or 1):
        log(
            f"warning: the host is busy (1-min load average {load_start:.2f} on "
            f"{os.cpu_count()} cores): CPU timings will be distorted"
        )
    path = resolve_model(cfg.model)

    from experiments import llama_bench, metrics, seed_protocol
    from experiments.engine_jax import JaxEngine

    dev = metrics.device_info()
    log(f"model {os.path.basename(path)} on {dev['name']}")
    options = dataclasses.asdict(cfg.engine)
    engine = JaxEngine(path, options)
    r: dict[str, Any] = {
        "title": title,
        "change": change,
        "config": cfgmod.to_dict(cfg),
        "git": git_info(),
        "versions": versions(),
        "device": dev,
        "engine": options,
    }
    p = cfg.protocols
    compile_chunk = p.seed.chunk if p.seed else 32

    def measure_compile() -> None:
        log("compile (first call minus a repeat)")
        r["compile"] = engine.compile_times(compile_chunk)
        log(f"  prefill {r['compile']['prefill_s']:.2f} s, decode {r['compile']['decode_s']:.2f} s")

    if p.seed:
        log("seed protocol (bench-protocol.md §1)")
        r["seed"] = seed_protocol.run(engine, p.seed, log, after_load=measure_compile)
        r["seed"]["deviations"] = seed_deviations(p.seed)
    else:
        r["load_ms"] = engine.load_once() * 1e3
        measure_compile()
    c = engine.config
    weight_bytes, per_token = engine.weight_bytes()
    r["model"] = {
        "name": os.path.basename(path),
        "path": os.path.abspath(path),
        "version": "V7",
        "n_layer": c.n_layer,
        "n_embd": c.n_embd,
        "vocab_size": c.vocab_size,
        "file_bytes": os.path.getsize(path),
        "weight_bytes": weight_bytes,
        "bytes_per_token": per_token,
    }

    if p.llama_bench:
        log(f"llama-bench tests ({cfg.repeats} runs each)")
        r["llama_bench"] = llama_bench.run(engine, p.llama_bench, cfg.repeats, log)

    # peak memory before the fidelity reference (a second, float32 copy) and the probe exist
    r["memory"] = metrics.peak_memory()
    r["bandwidth"] = _bandwidth(r, per_token)
    if cfg.bandwidth_probe_mb:
        probe = metrics.copy_bandwidth(cfg.bandwidth_probe_mb)
        r["bandwidth"].update(copy_gbps=probe["gbps"], copy_mb=probe["mb"])
        log(f"measured copy: {probe['gbps']:.1f} GB/s")

    if p.fidelity:
        log("fidelity against dense float32")
        ids = fidelity_tokens(engine.active().tokenizer, p.fidelity.prompt_tokens)
        run_logits = engine.all_logits(ids)
        ref = JaxEngine(path, {**options, "mode": "dense", "dtype": "float32"})
        ref.load_once(engine.header)  # the same parsed file
        ref_logits = ref.all_logits(ids)
        ref.close()
        r["fidelity"] = {**metrics.fidelity(ref_logits, run_logits), "reference": "dense float32"}
        f = r["fidelity"]
        log(f"  mean KL {f['mean_kl']:.3g}, top-1 {100 * f['top1']:.1f}%")
    engine.close()

    if cfg.compare == "llama.cpp":
        r["compare"] = _compare_llamacpp(path, cfg, r)
    r["host"] = {
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_start,
        # CPU time other processes took during the run, as a share of the whole machine
        "others_cpu_share": others_cpu_share(cpu_start, cpu_snapshot()),
    }
    r["timestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return r


def _bandwidth(r: dict, per_token: int) -> dict:
    """Achieved decode bandwidth: weight bytes read per token × tokens per second (batch 1)."""
    if "seed" in r:
        tps, source = r["seed"]["generation_tps"], "seed generation"
    else:
        tgs = [t for t in r.get("llama_bench", {}).get("tests", []) if t["name"].startswith("tg")]
        if not tgs:
            return {"bytes_per_token": per_token, "decode_gbps": 0.0, "source": "none"}
        tps, source = tgs[0]["tps_mean"], tgs[0]["name"]
    return {"bytes_per_token": per_token, "decode_gbps": per_token * tps / 1e9, "source": source}


def _compare_llamacpp(path: str, cfg: cfgmod.BenchConfig, r: dict) -> dict:
    """The same protocols with llama.cpp on the same file, and rwkv_jax / llama.cpp ratios."""
    from experiments import llama_bench, llamacpp, seed_protocol

    if not llamacpp.available():
        log("compare: llama.cpp skipped: llama-cpp-python is not installed")
        return {"engine": "llama.cpp", "skipped": "llama-cpp-python is not installed"}
    if r["device"]["platform"] != "cpu" and not llamacpp.gpu_offload():
        why = "llama-cpp-python has no GPU backend here (a CPU run would not compare)"
        log(f"compare: llama.cpp skipped: {why}")
        return {"engine": "llama.cpp", "skipped": why}
    eng = llamacpp.LlamaCppEngine(path)
    out: dict[str, Any] = {"engine": "llama.cpp", "version": llamacpp.version(), **eng.info()}
    p = cfg.protocols
    if p.seed:
        log("llama.cpp: seed protocol")
        out["seed"] = seed_protocol.run(eng, p.seed, log)
    if p.llama_bench:
        log("llama.cpp: llama-bench tests")
        out["llama_bench"] = llama_bench.run(eng, p.llama_bench, cfg.repeats, log, batched=False)
    eng.close()
    ratios = {}
    if "seed" in out and "seed" in r:
        # load: llama.cpp time / ours (higher is better for us, like the speed ratios)
        ratios["load"] = out["seed"]["load_ms"] / r["seed"]["load_ms"]
        ratios["prefill"] = r["seed"]["prefill_tps"] / out["seed"]["prefill_tps"]
        ratios["generation"] = r["seed"]["generation_tps"] / out["seed"]["generation_tps"]
    if "llama_bench" in out and "llama_bench" in r:
        theirs = {t["name"]: t for t in out["llama_bench"]["tests"]}
        for t in r["llama_bench"]["tests"]:
            if t["name"] in theirs:
                ratios[t["name"]] = t["tps_mean"] / theirs[t["name"]]["tps_mean"]
    out["ratios"] = ratios
    log("rwkv_jax / llama.cpp: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return out


# ---- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `python -m experiments.bench` arguments."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description="Benchmark rwkv_jax from a YAML config (see BENCHMARKS.md).",
    )
    p.add_argument("config", nargs="?", help="a YAML config, e.g. configs/default.yaml")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides, e.g. model.preset=tiny")
    p.add_argument("--title", help="markdown section to append to (with --change)")
    p.add_argument("--change", help="what changed, the entry's heading (with --title)")
    p.add_argument("--out", help="markdown log to append to (default: output.markdown)")
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        metavar="PNG",
        help="write a PNG of the --title section's history (default results/bench-<title>.png)",
    )
    p.add_argument("--schema", action="store_true", help="print every config key and exit")
    return p


def _slug(text: str) -> str:
    """A file-name-safe form of a title."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "bench"


def run_cli(args: argparse.Namespace) -> int:
    """Everything after argument parsing (raises RwkvJaxError on bad input)."""
    if args.schema:
        print("\n".join(cfgmod.schema_lines()))
        return 0
    png = None
    if args.plot is not None:
        if not args.title:
            raise InputError("--plot needs --title: the section whose history to draw")
        png = args.plot or os.path.join("results", f"bench-{_slug(args.title)}.png")
    if args.config is None:
        if png is None:
            raise InputError(
                "give a config file, e.g. python -m experiments.bench configs/default.yaml"
            )
        log(f"wrote {report.plot_history(args.out or 'BENCHMARKS.md', args.title, png)}")
        return 0
    if (args.title is None) != (args.change is None):
        raise InputError("--title and --change go together (the entry needs both)")
    if "=" in args.config:
        raise InputError(f"'{args.config}' looks like an override; the config file comes first")
    cfg = cfgmod.load(args.config, args.overrides)
    writes_entry = args.title is not None
    if writes_entry and cfg.protocols.seed is None:
        raise ConfigError(
            f"{args.config}: protocols.seed: is null, but --title/--change append the seed's "
            f"markdown entry, which needs the seed protocol"
        )
    markdown = args.out or cfg.output.markdown

    r = run_benchmark(cfg, args.title or "", args.change or "")
    print(report.console_table(r))
    if cfg.output.results_dir:
        log(f"appended a JSON line to {report.append_jsonl(cfg.output.results_dir, r)}")
    if writes_entry:
        report.append_markdown(markdown, args.title, report.markdown_entry(r))
        log(f"appended an entry to '## {args.title.strip()}' in {markdown}")
    if png is not None:
        log(f"wrote {report.plot_history(markdown, args.title, png)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input prints one line and exits 1, without a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return run_cli(args)
    except RwkvJaxError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
