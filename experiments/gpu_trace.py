"""Where a benchmark call's device time goes: kernel counts and times from a JAX profiler trace.

    python -m experiments.gpu_trace --preset 2.9b --cases tg:1:128 tg:64:32 pp:4096 [--unrolled]

Each case is timed the way experiments.bench times it (engine_jax.JaxEngine: `tg:B:N` = N greedy
decode steps of B streams in the on-device generation loop, `pp:T` = one prefill of T tokens;
`gemm:ROWS` = one XLA bf16 matrix product of the FFN key's shape alone, `fgemm:ROWS` the same
with int8 weights scaled inside it, `trsm:BATCH` one batched 64 x 64 triangular solve alone,
`cond:N` / `big:MB` a program with a lax.cond / a large temporary: what in a prefill slows later
decode loops? BENCHMARKS.md, "after a prefill"),
then run once more under `jax.profiler.trace`. The trace's device plane gives every kernel that
ran: their number per token, their summed time, the time the device was busy (union of kernel
intervals) against the wall time, and the kernels that took the most time. Wall time far above
busy time means launch gaps and host round trips; busy time far above the memory floor means slow
or too many kernels. XLA_FLAGS from the environment apply (run once per flag set to compare).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.profiler import ProfileData

from experiments.engine_jax import JaxEngine
from rwkv_jax import gpu_dense, gpu_kernels, gpu_mix, gpu_time_mix, model, synth

_MMA_NAMES = ("MMA_ROWS", "MMA_SPLIT", "MMA_PROGRAMS", "MMA_WARPS", "MMA_STAGES")


def kernel_events(xplane: str) -> list[tuple[str, int, int]]:
    """(name, start_ns, duration_ns) of every event on the device planes' stream lines."""
    out = []
    for plane in ProfileData.from_file(xplane).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "Stream" not in line.name:  # skip the derived "XLA Ops"/"XLA Modules" lines
                continue
            out += [(e.name, int(e.start_ns), int(e.duration_ns)) for e in line.events]
    return out


def all_events(xplane: str) -> list[tuple[str, str, str, int, int]]:
    """(plane, line, name, start_ns, duration_ns) of every event of the trace, in start order:
    kernels on their streams and host events on their threads, to compare two calls' timelines."""
    out = []
    for plane in ProfileData.from_file(xplane).planes:
        for line in plane.lines:
            out += [
                (plane.name, line.name, e.name, int(e.start_ns), int(e.duration_ns))
                for e in line.events
            ]
    return sorted(out, key=lambda e: e[3])


def host_events(xplane: str) -> dict[str, list[int]]:
    """{"plane: event name": [count, summed ns]} over every host-side plane of the trace (XLA's
    thunk executors, the CUDA API calls CUPTI records, Python): where host time between kernels
    goes."""
    by: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for plane in ProfileData.from_file(xplane).planes:
        if plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            for e in line.events:
                key = f"{plane.name.rsplit('/', 1)[-1]}: {family(e.name)[:80]}"
                by[key][0] += 1
                by[key][1] += int(e.duration_ns)
    return by


def busy_ns(events: list[tuple[str, int, int]]) -> int:
    """Length of the union of the events' [start, start + duration) intervals."""
    total, end = 0, -1
    for _, s, d in sorted(events, key=lambda e: e[1]):
        if s >= end:
            total, end = total + d, s + d
        elif s + d > end:
            total, end = total + s + d - end, s + d
    return total


def family(name: str) -> str:
    """A kernel's name without XLA's numeric suffixes (fusion.123 -> fusion)."""
    return re.sub(r"[._]\d+$", "", re.sub(r"[._]\d+(?=[._])", "", name))


def profile(run, tokens: int, top: int, events_out: str | None = None, host_top: int = 0) -> dict:
    """Trace one call of run(); summarise its kernels (and write every event to events_out) and,
    with host_top, the host events that took the most time."""
    d = tempfile.mkdtemp(prefix="rwkv_trace_")
    with jax.profiler.trace(d):
        wall = run()
    files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    ev = kernel_events(files[0]) if files else []
    if not ev and files:  # say what the trace holds instead (no CUPTI, another plane name)
        for plane in ProfileData.from_file(files[0]).planes:
            lines = [(ln.name, len(list(ln.events))) for ln in plane.lines]
            print("  plane", plane.name, lines[:8])
    if events_out:  # the whole sequence, in start order: which kernels one token runs
        with gzip.open(events_out + ".gz", "wt") as f:
            json.dump(all_events(files[0]) if files else [], f)
    by = collections.defaultdict(lambda: [0, 0])
    for name, _, dur in ev:
        by[family(name)][0] += 1
        by[family(name)][1] += dur
    ranked = sorted(by.items(), key=lambda kv: -kv[1][1])[:top]
    kern = sum(e[2] for e in ev)
    host = host_events(files[0]) if files and host_top else {}
    host_ranked = sorted(host.items(), key=lambda kv: -kv[1][1])[:host_top]
    return {
        "host_top": [(k, n, v / 1e6) for k, (n, v) in host_ranked],
        "traced_wall_ms": 1e3 * wall,
        "kernels": len(ev),
        "kernels_per_token": len(ev) / tokens,
        "kernel_ms": kern / 1e6,
        "busy_ms": busy_ns(ev) / 1e6,
        "mean_kernel_us": kern / max(len(ev), 1) / 1e3,
        "top": [(k, n, v / 1e6) for k, (n, v) in ranked],
    }


def _gemm(rows: int, n_embd: int, fused: bool = False):
    """A timed call of one bfloat16 [rows, C] x [C, 4C] product (the FFN key's shape in a
    prefill step), result back on the host: for `gemm:ROWS` cases (a library GEMM on GPUs) and
    `fgemm:ROWS` (int8 weights scaled inside the product, as the prefill dequantizes before its
    dots; on an H200 XLA still chose the library GEMM for it)."""
    x = jnp.ones((rows, n_embd), jnp.bfloat16)
    if fused:
        w = jnp.ones((n_embd, 4 * n_embd), jnp.int8)

        def prod(x, w):
            return jnp.dot(x, w.astype(jnp.bfloat16) * 0.5, preferred_element_type=jnp.float32)
    else:
        w = jnp.ones((n_embd, 4 * n_embd), jnp.bfloat16)

        def prod(x, w):
            return jnp.dot(x, w, preferred_element_type=jnp.float32)

    f = jax.jit(lambda x, w: prod(x, w).sum())

    def run() -> float:
        t0 = time.perf_counter()
        float(f(x, w))
        return time.perf_counter() - t0

    return run


def _trsm(batch: int, size: int = 64):
    """A timed call of one batched float32 unit-lower triangular solve [batch, 64, 64] (the
    chunked WKV's solve in a prefill; cuBLAS trsm on CUDA), result back on the host: for
    `trsm:BATCH` cases."""
    m = jnp.tril(jnp.full((batch, size, size), 0.01, jnp.float32))
    b = jnp.ones((batch, size, size), jnp.float32)
    f = jax.jit(
        lambda m, b: jax.scipy.linalg.solve_triangular(m, b, lower=True, unit_diagonal=True).sum()
    )

    def run() -> float:
        t0 = time.perf_counter()
        float(f(m, b))
        return time.perf_counter() - t0

    return run


def _probe(kind: str, size: int):
    """A timed call of a small program with one feature of a prefill program, result back on the
    host, for telling which feature slows later decode loops: `cond:N` a lax.cond on a device
    predicate over [N] values, `big:MB` an elementwise program with a temporary of MB megabytes."""
    if kind == "cond":
        x = jnp.arange(size, dtype=jnp.float32)

        def fn(x):
            return lax.cond(x[0] >= 0, lambda v: jnp.sin(v) * 2, lambda v: v, x).sum()
    else:
        x = jnp.ones((size << 18,), jnp.float32)  # size MB as float32

        def fn(x):
            y = jnp.exp(x) * 3  # a temporary as large as x
            return (y + jnp.flip(y)).sum()

    f = jax.jit(fn)

    def run() -> float:
        t0 = time.perf_counter()
        float(f(x))
        return time.perf_counter() - t0

    return run


def run_case(eng: JaxEngine, case: str, rng, label: str, a, index: int = 0) -> None:
    """Time one case (`tg:B:N`, `pp:T`, `gemm:ROWS`, `fgemm:ROWS`, `trsm:BATCH`, `cond:N` or
    `big:MB`; the index-th of the run), trace it once more and print (and append) its record."""
    kind, *nums = case.split(":")
    if kind == "tg":
        B, n = map(int, nums)
        first = rng.integers(1, eng.vocab_size, B).tolist()
        run, tokens = functools.partial(eng.tg, first, n), B * n
    elif kind == "gemm":  # one XLA GEMM alone (cuBLAS on GPUs), as a prefill runs them
        run, tokens = _gemm(int(nums[0]), eng.config.n_embd), int(nums[0])
    elif kind == "fgemm":  # the same with a dequantizing operand
        run, tokens = _gemm(int(nums[0]), eng.config.n_embd, fused=True), int(nums[0])
    elif kind in ("cond", "big"):  # one feature of a prefill program alone
        run, tokens = _probe(kind, int(nums[0])), int(nums[0])
    elif kind == "trsm":  # one batched triangular solve alone, as the chunked WKV runs them
        run, tokens = _trsm(int(nums[0])), int(nums[0])
    else:
        T = int(nums[0])
        toks = rng.integers(1, eng.vocab_size, T).tolist()
        run, tokens = functools.partial(eng.pp, toks), T
    t0 = time.perf_counter()
    run()  # compile + warm-up
    first_s = time.perf_counter() - t0
    secs = sorted(run() for _ in range(a.reps))
    rec = {
        "case": case,
        "label": label,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "first_call_s": first_s,
        "median_s": secs[len(secs) // 2],
        "tok_s": tokens / secs[len(secs) // 2],
    }
    ev_out = f"{a.events}.{index}_{case.replace(':', '_')}.json" if a.events else None
    rec.update(profile(run, tokens, a.top, ev_out, a.host_top))
    print(
        f"\n== {case} [{label}] {rec['tok_s']:.1f} tok/s, median {1e3 * rec['median_s']:.2f}"
        f" ms (first call {first_s:.1f} s); traced {rec['traced_wall_ms']:.2f} ms, busy "
        f"{rec['busy_ms']:.2f} ms, {rec['kernels']} kernels ({rec['kernels_per_token']:.1f}"
        f"/token, mean {rec['mean_kernel_us']:.2f} us)"
    )
    for name, cnt, ms in rec["top"]:
        print(f"   {ms:9.3f} ms {cnt:7d}x  {name[:90]}")
    if rec["host_top"]:
        print("   host events (summed over threads):")
    for name, cnt, ms in rec["host_top"]:
        print(f"   {ms:9.3f} ms {cnt:7d}x  {name[:100]}")
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="2.9b")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--cases", nargs="+", default=["tg:1:128", "tg:64:32", "pp:4096"])
    p.add_argument("--unrolled", action="store_true", help="load with unrolled layers")
    p.add_argument("--chunks-per-call", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype to load with")
    p.add_argument("--wkv", default=None, help="wkv_impl to load with (default: the backend's)")
    p.add_argument("--chunks-per-step", type=int, default=None, help="default: the backend's")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--loads", type=int, default=1, help="load the model this many times first")
    p.add_argument("--top", type=int, default=12)
    p.add_argument(
        "--host-top", type=int, default=0, help="also list this many host events by summed time"
    )
    p.add_argument("--label", default="")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument(
        "--events",
        default=None,
        help="write each case's traced events (kernels and host) to PREFIX.INDEX_CASE.json.gz",
    )
    p.add_argument(
        "--pallas",
        default=None,
        metavar="MIN_ROWS:TILE:WARPS:SPLIT",
        help="override gpu_kernels' launch constants (0 = keep one), e.g. 1:16:4:1",
    )
    p.add_argument(
        "--int-split",
        type=int,
        default=None,
        help="gpu_kernels.INT_SPLIT and INT_SPLIT_ONE_ROW (integer dot path)",
    )
    p.add_argument(
        "--int-row-loop", type=int, default=None, help="gpu_kernels.INT_ROW_LOOP (integer path)"
    )
    p.add_argument(
        "--factored", action="store_true", help="gpu_kernels.FACTORED: scales out of the sums"
    )
    p.add_argument(
        "--no-time-mix",
        action="store_true",
        help="keep the XLA path for the per-head decode work (gpu_time_mix.ENABLED = False)",
    )
    p.add_argument(
        "--no-dense",
        action="store_true",
        help="keep XLA's GEMMs for the batched LoRA matmuls (gpu_dense.ENABLED = False)",
    )
    p.add_argument("--time-mix-warps", type=int, default=None, help="gpu_time_mix.NUM_WARPS")
    p.add_argument(
        "--time-mix-wide",
        default=None,
        metavar="ROWS:WARPS",
        help="gpu_time_mix.WIDE_ROWS and WIDE_WARPS (warps per program from that many rows)",
    )
    p.add_argument(
        "--no-mix",
        action="store_true",
        help="keep the XLA path for the decode prologues (gpu_mix.ENABLED = False)",
    )
    p.add_argument(
        "--mix", default=None, metavar="ROWS:WARPS", help="gpu_mix.DOWN_ROWS and NUM_WARPS"
    )
    p.add_argument("--mix-add-warps", type=int, default=None, help="gpu_mix.ADD_WARPS")
    p.add_argument(
        "--split-consumed",
        default=None,
        metavar="RKV:ADDEND",
        help="gpu_time_mix.RKV_SPLIT and gpu_mix.ADDEND_SPLIT (0 = the matvec's own)",
    )
    p.add_argument(
        "--layer-unroll", type=int, default=None, help="model.DECODE_LAYER_UNROLL (decode only)"
    )
    p.add_argument(
        "--wkv-min-rows",
        type=int,
        default=None,
        help="model.WKV_IN_PLACE_MIN_ROWS (0: the WKV state as the layer scan's outputs)",
    )
    p.add_argument(
        "--up-rows", type=int, default=None, help="gpu_time_mix.MAX_UP_ROWS (LoRA ups in-kernel)"
    )
    p.add_argument(
        "--mma",
        nargs="+",
        default=[""],
        metavar="TILE:SPLIT:PROGRAMS:WARPS:STAGES",
        help="the tensor-core kernel's gpu_kernels.MMA_ROWS, MMA_SPLIT, MMA_PROGRAMS, MMA_WARPS, "
        "MMA_STAGES (empty = keep one), e.g. 64::264::; several: each runs every case in turn, "
        "in one process (one model load; compiled programs dropped between them)",
    )
    a = p.parse_args()
    if a.up_rows is not None:
        gpu_time_mix.MAX_UP_ROWS = a.up_rows
    model.DECODE_LAYER_UNROLL = a.layer_unroll or model.DECODE_LAYER_UNROLL
    if a.wkv_min_rows is not None:
        model.WKV_IN_PLACE_MIN_ROWS = a.wkv_min_rows
    gpu_mix.ENABLED = gpu_mix.ENABLED and not a.no_mix
    gpu_dense.ENABLED = gpu_dense.ENABLED and not a.no_dense
    if a.mix:
        gpu_mix.DOWN_ROWS, gpu_mix.NUM_WARPS = map(int, a.mix.split(":"))
    gpu_mix.ADD_WARPS = a.mix_add_warps or gpu_mix.ADD_WARPS
    if a.split_consumed:
        rkv, add = (int(v) or None for v in a.split_consumed.split(":"))
        gpu_time_mix.RKV_SPLIT, gpu_mix.ADDEND_SPLIT = rkv, add
    gpu_time_mix.NUM_WARPS = a.time_mix_warps or gpu_time_mix.NUM_WARPS
    if a.time_mix_wide:
        gpu_time_mix.WIDE_ROWS, gpu_time_mix.WIDE_WARPS = map(int, a.time_mix_wide.split(":"))
    gpu_time_mix.ENABLED = gpu_time_mix.ENABLED and not a.no_time_mix
    gpu_kernels.FACTORED = gpu_kernels.FACTORED or a.factored
    gpu_kernels.INT_SPLIT = a.int_split or gpu_kernels.INT_SPLIT
    gpu_kernels.INT_SPLIT_ONE_ROW = a.int_split or gpu_kernels.INT_SPLIT_ONE_ROW
    gpu_kernels.INT_ROW_LOOP = a.int_row_loop or gpu_kernels.INT_ROW_LOOP
    if a.pallas:  # tuning only: the constants are module globals read at trace time
        names = ("MIN_ROWS", "BLOCK_ROWS", "NUM_WARPS", "SPLIT")
        for name, v in zip(names, map(int, a.pallas.split(":")), strict=True):
            if v:
                setattr(gpu_kernels, name, v)
    opts = {
        "dtype": a.dtype,
        "chunk_size": 64,
        "chunks_per_call": a.chunks_per_call,
        "chunks_per_step": a.chunks_per_step,
    }
    if a.wkv:
        opts["wkv_impl"] = a.wkv
    if a.unrolled:
        opts["stack_layers"] = False
    eng = JaxEngine(str(synth.ensure(a.preset, a.type, 0)), opts)
    for _ in range(a.loads):  # as the seed protocol does (load runs)
        eng.load_once()
    rng = np.random.default_rng(0)
    base_label = a.label or ("unrolled" if a.unrolled else "stacked")
    print(
        jax.devices()[0].device_kind,
        "jax",
        jax.__version__,
        base_label,
        "XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""),
    )
    defaults = {name: getattr(gpu_kernels, name) for name in _MMA_NAMES}
    for variant in a.mma:
        for name, v in zip(_MMA_NAMES, variant.split(":") if variant else [""] * 5, strict=True):
            setattr(gpu_kernels, name, int(v) if v else defaults[name])
        jax.clear_caches()  # the constants are read at trace time: trace again
        label = base_label + (f" mma={variant}" if variant else "")
        for i, case in enumerate(a.cases):
            run_case(eng, case, rng, label, a, i)


if __name__ == "__main__":
    main()
