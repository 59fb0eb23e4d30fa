"""One call, one card: load time, device memory, compile time, prefill and decode speed.

    python -m experiments.gpu_suite --preset 2.9b --type Q4_K_M --out results/gpu.json

Synthesizes the model if needed (on the machine that runs this), then for each weight mode and
prefill variant measures: header parse, upload (to ready weights on the device), device memory
(bytes in use after load; peak), compile time of prefill and decode, ppN (random tokens, one
`forward` of N tokens, last logits to the host) and tgN (greedy feedback on the device: argmax of
each step's logits is the next token; one host read at the end). Median of `--repeats` runs.
Prints a table; writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import rwkv_jax
from rwkv_jax import synth
from rwkv_jax.generate import decode_step
from rwkv_jax.gguf import GGUFFile
from rwkv_jax.params import nbytes


def _mem() -> dict[str, int]:
    """Device memory statistics (empty on backends without them)."""
    stats = jax.devices()[0].memory_stats() or {}
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def _time(fn, repeats: int) -> list[float]:
    """Wall seconds of fn() (which must block) over `repeats` runs."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(
    path: str,
    *,
    mode: str,
    dtype: str,
    chunk: int,
    cps: int,
    cpc: int,
    impl: str,
    pp: list[int],
    tg: int,
    repeats: int,
    layers: str = "scan",
) -> dict:
    """All figures for one configuration of one file."""
    r: dict = {
        "mode": mode,
        "dtype": dtype,
        "chunk": chunk,
        "chunks_per_step": cps,
        "chunks_per_call": cpc,
        "impl": impl,
        "layers": layers,
    }
    t0 = time.perf_counter()
    f = GGUFFile(path)
    r["header_s"] = time.perf_counter() - t0
    r["file_bytes"] = os.path.getsize(path)
    t0 = time.perf_counter()
    model = rwkv_jax.from_gguf(
        f,
        mode=mode,
        dtype=dtype,
        chunk_size=chunk,
        chunks_per_call=cpc,
        chunks_per_step=cps,
        wkv_impl=impl,
        stack_layers=layers == "scan",
    )
    jax.block_until_ready(model.params)
    r["load_s"] = time.perf_counter() - t0
    r["weight_bytes"] = nbytes(model.params)
    r["mem_after_load"] = _mem()
    rng = np.random.default_rng(0)

    # compile (first call) of prefill and decode
    toks = rng.integers(1, 65530, size=max(pp)).astype(np.int32)
    t0 = time.perf_counter()
    logits, state = model.forward(toks[:16])
    jax.block_until_ready(logits)
    r["compile_prefill_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, state = model.step([1], state)
    jax.block_until_ready(logits)
    r["compile_decode_s"] = time.perf_counter() - t0

    for n in pp:

        def run(n=n):
            lg, _ = model.forward(toks[:n])
            np.asarray(lg)

        run()
        ts = _time(run, repeats)
        r[f"pp{n}_tok_s"] = n / statistics.median(ts)

    params, cfg, dt = model.params, model.config, model.dtype

    def gen():
        lg, st = model.forward(toks[:32])
        tok = jnp.argmax(lg, axis=-1).astype(jnp.int32)
        out = []
        t0 = time.perf_counter()
        for _ in range(tg):
            lg, st = decode_step(params, tok, st, cfg=cfg, dtype=dt)
            tok = jnp.argmax(lg, axis=-1).astype(jnp.int32)
            out.append(tok)
        np.asarray(jnp.stack(out))
        return time.perf_counter() - t0

    gen()
    ts = [gen() for _ in range(repeats)]
    r[f"tg{tg}_tok_s"] = tg / statistics.median(ts)
    r["decode_ms"] = 1e3 * statistics.median(ts) / tg
    r["decode_GBps"] = (r["weight_bytes"] - _emb_bytes(model)) / (r["decode_ms"] / 1e3) / 1e9
    r["mem_end"] = _mem()
    return r


def _emb_bytes(model) -> int:
    """Bytes of the embedding table (one row is read per token, not the table)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(model.params.emb))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="2.9b")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--model", help="a .gguf file instead of a synthetic preset")
    p.add_argument("--pp", default="512,4096")
    p.add_argument("--tg", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--variants",
        default="packed:float32:16:32:256:chunked",
        help="comma list of mode:dtype:chunk:chunks_per_step:chunks_per_call:impl",
    )
    p.add_argument("--out", default="")
    a = p.parse_args()
    path = a.model or synth.ensure(a.preset, a.type, 0)
    dev = jax.devices()[0]
    results = {
        "device": dev.device_kind,
        "platform": dev.platform,
        "jax": jax.__version__,
        "model": os.path.basename(path),
        "runs": [],
    }
    print(f"{results['device']} ({dev.platform}), jax {jax.__version__}, {path}", flush=True)
    for v in a.variants.split(","):
        mode, dtype, chunk, cps, cpc, impl, *layers = v.split(":")
        r = measure(
            path,
            mode=mode,
            dtype=dtype,
            chunk=int(chunk),
            cps=int(cps),
            cpc=int(cpc),
            impl=impl,
            layers=(layers or ["scan"])[0],
            pp=[int(x) for x in a.pp.split(",")],
            tg=a.tg,
            repeats=a.repeats,
        )
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as fh:
            json.dump(results, fh, indent=1)
    keys = [
        "load_s",
        "weight_bytes",
        "compile_prefill_s",
        "compile_decode_s",
        *[k for k in results["runs"][0] if k.startswith(("pp", "tg"))],
        "decode_GBps",
    ]
    print("variant".ljust(40) + "".join(k[:16].rjust(17) for k in keys))
    for r in results["runs"]:
        name = ":".join(
            str(r[k])
            for k in (
                "mode",
                "dtype",
                "chunk",
                "chunks_per_step",
                "chunks_per_call",
                "impl",
                "layers",
            )
        )
        print(name.ljust(40) + "".join(f"{r[k]:17.4g}" for k in keys))
        print("   memory after load:", r["mem_after_load"], " end:", r["mem_end"])


if __name__ == "__main__":
    main()
