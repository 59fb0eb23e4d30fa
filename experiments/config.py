"""The benchmark config: frozen dataclasses read from YAML by a strict loader.

Every key must be present (no silent defaults), unknown keys are errors, and every value is
type-checked; each error names the key's dotted path and where it came from (the YAML file or a
`key=value` override). A section typed `X | None` may be `null` to switch it off (a protocol, the
synthetic-model fields when `model.file` is given). `python -m experiments.bench --schema` prints
every key with its comment.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from rwkv_jax.errors import ConfigError

PLATFORMS = ("auto", "cpu", "cuda", "metal")
MODES = ("packed", "dense")
DTYPES = ("float32", "bfloat16", "float16")
WKV_IMPLS = ("chunked", "sequential", "auto")  # auto: generate.default_wkv
# names of rwkv_jax.synth.PRESETS / TYPES, repeated here so a config is checked before any model
# code runs; tests/test_bench.py asserts they stay equal
PRESETS = ("tiny", "0.1b", "0.4b", "1.5b", "2.9b", "7.2b")
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")
COMPARE = ("llama.cpp",)


def _key(doc: str, *, choices: tuple[Any, ...] | None = None, minimum: int | None = None) -> Any:
    """A required dataclass field with its comment and value constraints as metadata."""
    return field(metadata={"doc": doc, "choices": choices, "min": minimum})


@dataclass(frozen=True)
class ModelSpec:
    """Which model: a GGUF file, or a synthetic one generated (and cached) on first use."""

    file: str | None = _key("a .gguf path (relative to the working directory); null: synthetic")
    preset: str | None = _key("synthetic model shape (null when file is set)", choices=PRESETS)
    type: str | None = _key("synthetic model tensor type (null when file is set)", choices=QTYPES)
    seed: int | None = _key("synthetic weight seed (null when file is set)", minimum=0)
    cache_dir: str | None = _key(
        "where synthetic models are cached; null: $RWKV_JAX_CACHE or ~/.cache/rwkv_jax"
    )


@dataclass(frozen=True)
class EngineSpec:
    """How rwkv_jax runs the model (rwkv_jax.from_gguf options)."""

    mode: str = _key("packed: dequantize inside jit; dense: dequantize once at load", choices=MODES)
    dtype: str = _key("compute dtype of the matrix products", choices=DTYPES)
    chunk_size: int = _key("prefill chunk length inside one compiled call", choices=(16, 32, 64))
    chunks_per_call: int = _key("chunks per compiled prefill call", minimum=1)
    wkv_impl: str = _key("WKV-7 kernel inside a prefill chunk", choices=WKV_IMPLS)


@dataclass(frozen=True)
class SeedProtocol:
    """bench-protocol.md §1 (web-rwkv-gguf's examples/benchmark.rs); the values below are its
    constants, and any other value is reported as a deviation from the seed protocol."""

    load_runs: int = _key("model loads timed; load time = their mean (seed: 3)", minimum=1)
    warmup_runs: int = _key("warm-up prompts (seed: 2)", minimum=0)
    warmup_len: int = _key("tokens per warm-up prompt (seed: 16)", minimum=1)
    runs: int = _key("timed prefill runs and generation runs (seed: 3)", minimum=1)
    prefill_len: int = _key("random tokens per prefill run (seed: 128)", minimum=1)
    gen_prefill_len: int = _key("untimed prompt before each generation run (seed: 32)", minimum=1)
    gen_len: int = _key("timed single-token calls per generation run (seed: 64)", minimum=1)
    chunk: int = _key("tokens per model call when feeding a prompt (seed: 32)", minimum=1)
    token_seed: int = _key("WyRand seed of warm-up, prefill and generation (seed: 42)", minimum=0)
    quality_seed: int = _key("WyRand seed of the quality prompt (seed: 12345)", minimum=0)
    quality_prompt_len: int = _key("random quality-prompt tokens (seed: 16)", minimum=1)
    quality_gen_len: int = _key("greedy tokens hashed (seed: 32)", minimum=1)


# the seed's constants: a run with other values is labelled as not the seed protocol
SEED_DEFAULTS = SeedProtocol(
    load_runs=3,
    warmup_runs=2,
    warmup_len=16,
    runs=3,
    prefill_len=128,
    gen_prefill_len=32,
    gen_len=64,
    chunk=32,
    token_seed=42,
    quality_seed=12345,
    quality_prompt_len=16,
    quality_gen_len=32,
)


@dataclass(frozen=True)
class LlamaBench:
    """llama-bench style tests: ppN (one prefill of N random tokens from a fresh state) and tgN
    (N greedy single-token steps from a fresh state), `repeats` timed runs after one warm-up."""

    pp: tuple[int, ...] = _key("prompt lengths N of the ppN tests ([] for none)", minimum=1)
    tg: tuple[int, ...] = _key("generation lengths N of the tgN tests ([] for none)", minimum=1)
    batch: tuple[int, ...] = _key("batched decode: stream counts B ([] for none)", minimum=1)
    batch_steps: int = _key("greedy steps per batched-decode run", minimum=1)


@dataclass(frozen=True)
class Fidelity:
    """The configured run against a dense float32 run of the same weights on a fixed text."""

    prompt_tokens: int = _key("tokens of the fixed English prompt compared", minimum=2)


@dataclass(frozen=True)
class Protocols:
    """What to measure; null switches a protocol off."""

    seed: SeedProtocol | None = _key("the seed's protocol (bench-protocol.md §1)")
    llama_bench: LlamaBench | None = _key("ppN / tgN / batched decode (bench-protocol.md §2)")
    fidelity: Fidelity | None = _key("mean KL and top-1 agreement against float32")


@dataclass(frozen=True)
class Output:
    """Where results go."""

    results_dir: str | None = _key("each run appends one JSON line to DIR/bench.jsonl; null: none")
    markdown: str = _key("the log that --title/--change append to (--out overrides)")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark invocation."""

    model: ModelSpec = _key("the model")
    platform: str = _key("JAX platform; auto: JAX's default device", choices=PLATFORMS)
    engine: EngineSpec = _key("rwkv_jax options")
    protocols: Protocols = _key("what to measure")
    repeats: int = _key("timed runs per llama_bench test (mean ± sd)", minimum=1)
    bandwidth_probe_mb: int = _key("MB copied by the bandwidth probe; 0: skip", minimum=0)
    compare: str | None = _key("also run llama.cpp on the same file", choices=COMPARE)
    output: Output = _key("output options")


# ---- loading ---------------------------------------------------------------------------------


class _Src:
    """Names the origin of a value in error messages: the file, or an override for some keys."""

    def __init__(self, file: str, overridden: set[str]):
        self.file = file
        self.overridden = overridden

    def err(self, path: str, msg: str) -> ConfigError:
        """A ConfigError naming the origin and the dotted key path."""
        from_cli = any(path == k or path.startswith(k + ".") for k in self.overridden)
        origin = "command-line override" if from_cli else self.file
        return ConfigError(f"{origin}: {path or '<top level>'}: {msg}")


def _join(path: str, key: str) -> str:
    """Dotted path of a child key."""
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    """Readable name of a schema type."""
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str, meta: dict, src: _Src) -> Any:
    """Check `value` against the schema type `tp` (and the field's choices/minimum)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return None if value is None else _convert(inner, value, path, meta, src)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, src)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list):
            raise src.err(path, f"expected {_type_name(tp)}, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_convert(item, v, f"{path}[{i}]", meta, src) for i, v in enumerate(value))
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is bool:
        ok = isinstance(value, bool)
    else:  # pragma: no cover - schema bug
        raise TypeError(f"unsupported schema type {tp!r} at {path}")
    if not ok:
        raise src.err(path, f"expected {_type_name(tp)}, got {value!r}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        opts = ", ".join(str(c) for c in meta["choices"])
        raise src.err(path, f"{value!r} is not one of: {opts}")
    if meta.get("min") is not None and value < meta["min"]:
        raise src.err(path, f"must be at least {meta['min']}, got {value!r}")
    return value


def _build(cls: type, data: Any, path: str, src: _Src) -> Any:
    """Construct dataclass `cls` from a mapping: no unknown, missing or mistyped keys."""
    if not isinstance(data, dict):
        raise src.err(path, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            raise src.err(_join(path, str(key)), f"unknown key (expected one of: {known})")
    values = {}
    for name, f in fields.items():
        p = _join(path, name)
        if name not in data:
            raise src.err(p, f"missing key ({f.metadata.get('doc', '')})")
        values[name] = _convert(hints[name], data[name], p, dict(f.metadata), src)
    return cls(**values)


def _check(cfg: BenchConfig, src: _Src) -> None:
    """Rules across keys: a model is either a file or a full synthetic spec."""
    m = cfg.model
    synth = {"preset": m.preset, "type": m.type, "seed": m.seed}
    if m.file is not None:
        for k, v in synth.items():
            if v is not None:
                raise src.err(f"model.{k}", "must be null when model.file is given")
    else:
        for k, v in synth.items():
            if v is None:
                raise src.err(f"model.{k}", "required for a synthetic model (model.file is null)")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", YAML value of the right-hand side)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. repeats=1")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': the key must be a dotted path like model.preset")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
    return key, value


def apply_overrides(data: dict, overrides: list[str]) -> set[str]:
    """Set each `key=value` in the raw mapping; returns the dotted paths set."""
    done = set()
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            here = ".".join(parts[: i + 1])
            if part not in node:
                node[part] = {}
            if node[part] is None:
                raise ConfigError(
                    f"override {key}: {here} is null in the config; set the whole section "
                    f"in the YAML file instead"
                )
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {key}: {here} is not a section")
            node = node[part]
        node[parts[-1]] = value
        done.add(key)
    return done


def load(path: str | os.PathLike[str], overrides: list[str] | None = None) -> BenchConfig:
    """Read a YAML config, apply `key=value` overrides, validate strictly."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file (see configs/*.yaml)")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return from_dict(data, path, overrides)


def from_dict(
    data: Any, source: str = "<config>", overrides: list[str] | None = None
) -> BenchConfig:
    """Validate a parsed mapping (plus overrides) into a BenchConfig."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {data!r}")
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain YAML data
    overridden = apply_overrides(data, list(overrides or []))
    src = _Src(source, overridden)
    cfg = _build(BenchConfig, data, "", src)
    _check(cfg, src)
    return cfg


def to_dict(cfg: BenchConfig) -> dict:
    """Plain nested dict of a config (tuples as lists), for JSON results."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(x: Any) -> Any:
    """Tuples to lists, recursively (safe_dump writes tuples as Python tags)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def schema_lines(cls: type = BenchConfig, path: str = "") -> list[str]:
    """One line per key: dotted path, type, constraint and comment (for --schema and docs)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        p = _join(path, f.name)
        tp = hints[f.name]
        inner = tp
        nullable = typing.get_origin(tp) in (typing.Union, types.UnionType)
        if nullable:
            inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        extra = []
        if f.metadata.get("choices") is not None:
            extra.append("one of " + "|".join(str(c) for c in f.metadata["choices"]))
        if f.metadata.get("min") is not None:
            extra.append(f">= {f.metadata['min']}")
        kind = _type_name(inner) + (" or null" if nullable else "")
        cons = f" [{', '.join(extra)}]" if extra else ""
        out.append(f"{p}: {kind}{cons} — {f.metadata.get('doc', '')}")
        if dataclasses.is_dataclass(inner):
            out.extend(schema_lines(inner, p))  # type: ignore[arg-type]
    return out
