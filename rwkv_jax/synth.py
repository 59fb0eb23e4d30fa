"""Synthetic RWKV-7 models written in exactly llama.cpp's GGUF layout (the embedded default).

No real weights can be downloaded where this project is built and tested, so it writes its own:
random weights with the names, dims, tensor types and metadata of llama.cpp's converter (plus
`llama-quantize` for the quantized presets) and the real RWKV World vocabulary. Weights are drawn
per tensor from a generator seeded by (seed, tensor name, row chunk), so a file depends only on
(preset, type, seed) and tensors can be produced in parallel and streamed to disk.

Distributions (chosen so the model behaves numerically like a trained one: LayerNorm'd
activations of order 1, logits with a standard deviation of about 3, varied decays):

| tensor | distribution |
|---|---|
| token_embd | N(0, 1) |
| layer norms (ln0, ln1, ln2, ln_out) | weight 1 + N(0, 0.05), bias N(0, 0.05) |
| lerp coefficients x_r..x_g, ffn x_k | U(0.05, 0.95) |
| w0 (decay bias) | BlinkDL's init ramp over channels, -6.5..-1.5, + N(0, 0.1) |
| w1, a1, v1, g1 (C -> rank) | N(0, 1/sqrt(C)) |
| w2, a2, v2 (rank -> C) | N(0, 0.5/sqrt(rank)) |
| g2 (rank -> C) | N(0, 1/sqrt(rank)) |
| a0 | N(0, 0.5); v0: 0.5 + N(0, 0.5) |
| k_k | 0.85 + N(0, 0.05); k_a: 1 + N(0, 0.05); r_k: N(0, 0.2) |
| receptance, key, value | N(0, 1/sqrt(C)) |
| output, ffn value | N(0, 1/sqrt(in) / sqrt(2 * n_layer)) (residual growth stays O(1)) |
| ffn key | N(0, 1/sqrt(C)) |
| ln_x | weight ((1 + layer) / n_layer)^0.7 + N(0, 0.05), bias N(0, 0.05) |
| output (head) | N(0, 3/sqrt(C)) |
"""

from __future__ import annotations

import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import gguf
import numpy as np

from rwkv_jax import quantize, tokenizer
from rwkv_jax.errors import InputError
from rwkv_jax.gguf import (
    ARCH,
    GLOBAL_TENSORS,
    KEY,
    LAYER_TENSORS,
    TensorSpec,
    add_packed_tensor_info,
    atomic_writer,
    lora_rank,
)

T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Preset:
    """Shape of one synthetic model (llama.cpp's size table; ranks as released models)."""

    n_layer: int
    n_embd: int
    rank_w: int
    rank_a: int
    rank_v: int
    rank_g: int


def _formula_preset(n_layer: int, n_embd: int) -> Preset:
    """Ranks from the converter's default formula (spec §2.1)."""
    return Preset(
        n_layer,
        n_embd,
        lora_rank(n_embd, 0.5, 1.8),
        lora_rank(n_embd, 0.5, 1.8),
        lora_rank(n_embd, 0.5, 1.3),
        lora_rank(n_embd, 0.8, 0.6),
    )


PRESETS: dict[str, Preset] = {
    # tiny: a test shape whose rows are multiples of 256 (so every K-quant applies unchanged)
    "tiny": Preset(2, 256, 32, 32, 32, 64),
    "0.1b": Preset(12, 768, 64, 64, 32, 128),
    "0.4b": Preset(24, 1024, 64, 64, 32, 128),
    "1.5b": Preset(24, 2048, 96, 96, 64, 256),
    "2.9b": Preset(32, 2560, 96, 96, 64, 320),
    "7.2b": _formula_preset(32, 4096),
}

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")
HEAD_SIZE = 64
VOCAB = tokenizer.VOCAB_SIZE
CHUNK_ELEMS = 1 << 22  # rows are generated and quantized in pieces of about 4M values

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def tensor_plan(preset: Preset) -> list[tuple[str, TensorSpec, int, tuple[int, ...]]]:
    """Every tensor in llama.cpp's file order: (name, spec, layer or -1, ne)."""
    c = preset.n_embd
    dims = {
        "C": c,
        "V": VOCAB,
        "F": 4 * c,
        "Dw": preset.rank_w,
        "Da": preset.rank_a,
        "Dv": preset.rank_v,
        "Dg": preset.rank_g,
        "1": 1,
        "6": 6,
    }
    head = [s for s in GLOBAL_TENSORS if not s.gguf_name.startswith("output")]
    tail = [s for s in GLOBAL_TENSORS if s.gguf_name.startswith("output")]
    plan = [(s.gguf_name, s, -1, tuple(dims[d] for d in s.ne)) for s in head]
    for layer in range(preset.n_layer):
        for s in LAYER_TENSORS:
            names = s.ne
            if layer == 0 and s.field in ("v1", "v2"):  # converter copies a1/a2 here (iclr rank)
                names = tuple("Da" if d == "Dv" else d for d in names)
            plan.append((f"blk.{layer}.{s.gguf_name}", s, layer, tuple(dims[d] for d in names)))
    plan += [(s.gguf_name, s, -1, tuple(dims[d] for d in s.ne)) for s in tail]
    return plan


def _rng(seed: int, name: str, chunk: int) -> np.random.Generator:
    """Independent stream per (seed, tensor, chunk): order- and thread-independent output."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), chunk])


def _sampler(
    field: str, layer: int, preset: Preset, ne: tuple[int, ...]
) -> Callable[[np.random.Generator, int, int], np.ndarray]:
    """A function (rng, row0, n_rows) -> float32 rows [n_rows, ne[0]] for one tensor."""
    c, n_layer = preset.n_embd, preset.n_layer
    n_in = ne[0]

    def normal(std: float, mean: float = 0.0):
        def draw(rng, row0, n):
            x = rng.standard_normal((n, n_in), dtype=np.float32)
            x *= np.float32(std)
            if mean:
                x += np.float32(mean)
            return x

        return draw

    def uniform(lo: float, hi: float):
        def draw(rng, row0, n):
            return rng.random((n, n_in), dtype=np.float32) * np.float32(hi - lo) + np.float32(lo)

        return draw

    if field in ("ln0_w", "ln1_w", "ln2_w", "ln_out_w"):
        return normal(0.05, 1.0)
    if field.endswith("_b"):
        return normal(0.05)
    if field in ("x_rwkvag", "ffn_x_k"):
        return uniform(0.05, 0.95)
    if field == "w0":
        ratio = layer / max(n_layer - 1, 1)
        ramp = (np.arange(c, dtype=np.float64) / max(c - 1, 1)) ** (0.85 + ratio**0.5)
        base = (-7.0 + 5.0 * ramp + 0.5).astype(np.float32)[None, :]
        return lambda rng, row0, n: base + normal(0.1)(rng, row0, n)
    if field == "ln_x_w":
        return normal(0.05, ((1 + layer) / n_layer) ** 0.7)
    if field == "a0":
        return normal(0.5)
    if field == "v0":
        return normal(0.5, 0.5)
    if field == "k_k":
        return normal(0.05, 0.85)
    if field == "k_a":
        return normal(0.05, 1.0)
    if field == "r_k":
        return normal(0.2)
    if field in ("w1", "a1", "v1", "g1", "receptance", "key", "value", "ffn_key"):
        return normal(1.0 / math.sqrt(n_in))
    if field in ("w2", "a2", "v2"):
        return normal(0.5 / math.sqrt(n_in))
    if field == "g2":
        return normal(1.0 / math.sqrt(n_in))
    if field in ("output", "ffn_value"):
        return normal(1.0 / math.sqrt(n_in) / math.sqrt(2 * n_layer))
    if field == "emb":
        return normal(1.0)
    if field == "head":
        return normal(3.0 / math.sqrt(n_in))
    raise AssertionError(f"no distribution for field {field}")  # the name table grew


def _tensor_type(name: str, ne: tuple[int, ...], ftype: str) -> int:
    """The type llama.cpp's converter (F32/F16/BF16) or converter + llama-quantize would give."""
    if ftype in ("F32", "F16", "BF16"):
        return quantize.tensor_type(name, ne, ftype, source_type=T[ftype])
    converted = quantize.tensor_type(name, ne, "F16", source_type=T.F16)
    return quantize.tensor_type(name, ne, ftype, source_type=converted)


def _produce(
    name: str,
    spec: TensorSpec,
    layer: int,
    ne: tuple[int, ...],
    qtype: int,
    preset: Preset,
    seed: int,
    pool: ThreadPoolExecutor,
) -> np.ndarray:
    """Draw and encode one tensor, chunked over rows across the thread pool."""
    n_rows = int(np.prod(ne[1:], dtype=np.int64))
    n_in = ne[0]
    # layer 0's v0/v1/v2 are copies of a0/a1/a2 in converter output (spec §2.2)
    source = name
    field = spec.field
    if layer == 0 and field in ("v0", "v1", "v2"):
        field = {"v0": "a0", "v1": "a1", "v2": "a2"}[field]
        source = name.replace("time_mix_v", "time_mix_a")
    sampler = _sampler(field, layer, preset, ne)
    rows_per_chunk = max(1, CHUNK_ELEMS // n_in)
    starts = list(range(0, n_rows, rows_per_chunk))

    def job(i: int) -> np.ndarray:
        row0 = starts[i]
        n = min(rows_per_chunk, n_rows - row0)
        x = sampler(_rng(seed, source, i), row0, n)
        # fast quantizer path: the weights are random anyway, the layout is what matters
        return quantize.quantize_array(x, qtype, search=False)

    parts = list(pool.map(job, range(len(starts))))
    return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def synth(preset: str, qtype: str, seed: int, out_path: str, *, progress: bool = True) -> str:
    """Write a random-weight RWKV-7 GGUF of the given preset and type to out_path."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    if qtype not in TYPES:
        raise InputError(f"unknown type '{qtype}'; choose one of {', '.join(TYPES)}")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise InputError(f"cannot write {out_path}: directory {out_dir} does not exist")
    p = PRESETS[preset]
    plan = tensor_plan(p)
    types = {name: _tensor_type(name, ne, qtype) for name, _, _, ne in plan}

    t0 = time.perf_counter()
    done = decile = 0
    with atomic_writer(out_path, ARCH) as writer:
        _add_metadata(writer, p, preset, qtype, seed)
        total = sum(add_packed_tensor_info(writer, n, ne, types[n]) for n, _, _, ne in plan)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            for i, (name, spec, layer, ne) in enumerate(plan):
                data = _produce(name, spec, layer, ne, types[name], p, seed, pool)
                writer.write_tensor_data(data.reshape(-1))
                done += data.nbytes
                decile, last_decile = done * 10 // max(total, 1), decile
                tty = sys.stderr.isatty()
                if progress and (
                    i == len(plan) - 1 or (i % 16 == 0 if tty else decile > last_decile)
                ):
                    rate = done / max(time.perf_counter() - t0, 1e-9) / 1e6
                    end = "" if tty else "\n"  # one line per ~10% in logs
                    print(
                        f"\rsynth {preset} {qtype}: {done / 1e6:8.1f} / {total / 1e6:.1f} MB "
                        f"({rate:.0f} MB/s)",
                        end=end,
                        file=sys.stderr,
                        flush=True,
                    )
    if progress:
        print(f"\nwrote {out_path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out_path


def _add_metadata(writer: gguf.GGUFWriter, p: Preset, preset: str, qtype: str, seed: int) -> None:
    """The converter's rwkv7 metadata keys (spec §2.1) plus the tokenizer arrays."""
    writer.add_name(f"rwkv7-synthetic-{preset}-seed{seed}")
    writer.add_uint32(KEY["context_length"], 1048576)
    writer.add_uint32(KEY["n_embd"], p.n_embd)
    writer.add_uint32(KEY["n_layer"], p.n_layer)
    writer.add_float32(KEY["eps"], 1e-5)
    writer.add_uint32(KEY["head_size"], HEAD_SIZE)
    writer.add_uint32(KEY["rank_w"], p.rank_w)
    writer.add_uint32(KEY["rank_a"], p.rank_a)
    writer.add_uint32(KEY["rank_v"], p.rank_v)
    writer.add_uint32(KEY["rank_g"], p.rank_g)
    writer.add_uint32(KEY["ffn"], 4 * p.n_embd)
    writer.add_uint32(KEY["head_count"], 0)
    writer.add_file_type(int(quantize.FTYPES[qtype]))
    if qtype not in ("F32", "F16", "BF16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, token_types = tokenizer.world_gguf_tokens()
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_eot_token_id(tokenizer.DOUBLE_NEWLINE_ID)
    writer.add_chat_template(CHAT_TEMPLATE)


def iter_presets() -> Iterator[str]:
    """Preset names, smallest first."""
    return iter(PRESETS)


def default_path(preset: str, qtype: str, seed: int, cache_dir: str | None = None) -> str:
    """Where the cached synthetic model for (preset, type, seed) lives."""
    base = (
        cache_dir
        or os.environ.get("RWKV_JAX_CACHE")
        or os.path.join(os.path.expanduser("~"), ".cache", "rwkv_jax")
    )
    return os.path.join(base, f"rwkv7-synth-{preset}-{qtype}-seed{seed}.gguf")


def ensure(
    preset: str, qtype: str, seed: int = 0, cache_dir: str | None = None, *, progress: bool = True
) -> str:
    """Path of the cached synthetic model, writing it first if needed."""
    path = default_path(preset, qtype, seed, cache_dir)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        synth(preset, qtype, seed, path, progress=progress)
    return path
