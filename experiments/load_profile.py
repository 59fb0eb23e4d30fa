"""Where does loading a model's weights go? Times the load phases on the default device.

    python -m experiments.load_profile --preset 2.9b --type Q4_K_M [--stack auto|1|0]

Run it twice: the first process compiles the load-time split programs (and fills JAX's
persistent compilation cache, compile_cache.py), the second reads them from the cache. Prints:
- end to end, `reps` times in this process: open (parse the GGUF), load_params (upload + split,
  until every array is ready), with XLA compile seconds and persistent-cache hits/misses of the
  first rep; device memory after the load and its peak during the first rep, over the file size.
- phases of the same work done one after the other (peak memory is not representative here:
  every tensor's bytes are on the device at once): open/parse; host work (tensor table to
  layers, format checks); upload of every tensor's bytes (serial device_put, one batched
  device_put of the list, and `--threads` threads); device split (the jitted programs); ready.
With --compile N: the Model's first prefill (N tokens) and decode calls minus second calls, i.e.
compile time, or the persistent cache's load time in a process after the first. The page cache
is warmed first (the file is read once) unless --cold-file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from jax._src import monitoring

from rwkv_jax import compile_cache, quant, synth, upload
from rwkv_jax import params as P
from rwkv_jax.gguf import GGUFFile, TensorInfo

EVENTS: dict[str, float] = {}


def _on_duration(event: str, duration: float, **_) -> None:
    """Sum JAX's duration events (compile time) by name."""
    EVENTS[event] = EVENTS.get(event, 0.0) + duration


def _on_event(event: str, **_) -> None:
    """Count JAX's plain events (persistent cache hits and misses) by name."""
    EVENTS[event] = EVENTS.get(event, 0.0) + 1


def warm(path: str) -> None:
    """Read the file once so it sits in the page cache (64 MiB at a time)."""
    buf = bytearray(64 << 20)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def memory() -> tuple[int | None, int | None]:
    """(bytes in use, peak bytes in use) on the default device; None where not reported (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")


def plan(f: GGUFFile) -> list[dict[str, tuple]]:
    """Host work of load_params: groups in load order (emb + head, then each layer), each
    tensor key -> (format class, shape, bytes [out, row_bytes], layout)."""
    layers = [P._host_fields(f, i) for i in range(f.config.n_layer)]
    P._layer0_dummy(f, layers)
    glob = P._host_fields(f, None)
    infos = [{k: glob[k] for k in ("emb", "head")}]
    infos += [{k: v for k, v in lay.items() if isinstance(v, TensorInfo)} for lay in layers]
    groups = []
    for g in infos:  # the format checks and byte views load_params does
        mats = {k: P._matrix(info) for k, info in g.items()}
        groups.append({k: (*m, quant.raw_layout(m[0])) for k, m in mats.items()})
    return groups


def phases(path: str, stack: bool, threads: int) -> None:
    """Time open, host work, upload (three ways), split and ready one after the other."""
    t0 = time.perf_counter()
    f = GGUFFile(path)
    t1 = time.perf_counter()
    groups = plan(f)
    t2 = time.perf_counter()
    flat = [(rows, lay) for g in groups for (_, _, rows, lay) in g.values()]
    print(f"  open/parse   {t1 - t0:7.3f} s")
    print(f"  host work    {t2 - t1:7.3f} s  ({len(flat)} matrices)")

    def serial():
        return [upload.to_device(rows, lay) for rows, lay in flat]

    def batched():
        return jax.device_put([host_view(rows, lay) for rows, lay in flat])

    def threaded():
        with ThreadPoolExecutor(threads) as ex:
            return list(ex.map(lambda a: upload.to_device(*a), flat))

    ways = (("serial", serial), ("batched", batched), (f"{threads} threads", threaded))
    for name, fn in ways:
        devs = None  # free the previous copy first
        ta = time.perf_counter()
        devs = fn()
        jax.block_until_ready(devs)
        print(f"  upload {name:<10} {time.perf_counter() - ta:7.3f} s")
    it = iter(devs)
    dev_groups = [{k: next(it) for k in g} for g in groups]
    lays = [{k: v[3] for k, v in g.items()} for g in groups]
    tb = time.perf_counter()
    out = [upload.split(dev_groups[0], lays[0])]  # emb + head
    if stack:  # every layer into the stacks, as load_params does
        shapes = {
            k: (len(groups) - 1, shape[0], shape[1] // cls.BLOCK_ELEMS)
            for k, (cls, shape, _, _) in groups[1].items()
        }
        stacks = upload.empty_stacks(lays[1], shapes)
        for i, d in enumerate(dev_groups[1:]):
            stacks = upload.put_layers(stacks, d, i, lays[1])
        out.append(stacks)
    else:
        out += [upload.split(d, lay) for d, lay in zip(dev_groups[1:], lays[1:], strict=True)]
    tc = time.perf_counter()
    jax.block_until_ready(out)
    td = time.perf_counter()
    print(f"  device split {tc - tb:7.3f} s to dispatch, ready after {td - tb:.3f} s")


def host_view(raw: np.ndarray, lay: upload.Layout) -> np.ndarray:
    """The host array `upload.to_device` hands to device_put (for a batched device_put)."""
    raw = np.ascontiguousarray(raw)
    if lay.dense:
        return raw.view(lay.fields[0].dtype).reshape(raw.shape[:-1] + (-1,))
    return raw.view(lay.raw_dtype)


def compile_times(path: str, prompt_len: int) -> None:
    """Load the Model (from_gguf, the profile's defaults) and time the first prefill and decode
    calls minus a second identical call: XLA compile, or the persistent cache's load."""
    import rwkv_jax

    m = rwkv_jax.from_gguf(GGUFFile(path))
    toks = np.arange(1, prompt_len + 1, dtype=np.int32) % m.config.vocab_size

    def prefill() -> float:
        t0 = time.perf_counter()
        np.asarray(m.forward(toks, m.new_state(1))[0])
        return time.perf_counter() - t0

    def decode() -> float:
        st = m.new_state(1)
        jax.block_until_ready(st)
        t0 = time.perf_counter()
        np.asarray(m.step([1], st)[0])
        return time.perf_counter() - t0

    for name, fn in (("prefill", prefill), ("decode", decode)):
        EVENTS.clear()
        first = fn()
        hits = int(EVENTS.get("/jax/compilation_cache/cache_hits", 0))
        misses = int(EVENTS.get("/jax/compilation_cache/cache_misses", 0))
        again = fn()
        print(
            f"compile {name:<8} {max(first - again, 0.0):7.3f} s  (first call {first:.3f} s, "
            f"second {again:.3f} s; cache hits {hits} misses {misses})"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="2.9b")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--path", default=None, help="a GGUF file instead of the synthetic preset")
    p.add_argument("--stack", default="auto", choices=("auto", "1", "0"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--cold-file", action="store_true", help="do not warm the page cache")
    p.add_argument("--no-phases", action="store_true")
    p.add_argument(
        "--compile", type=int, default=0, help="also time compiling prefill (this many tokens)"
    )
    a = p.parse_args()
    monitoring.register_event_duration_secs_listener(_on_duration)
    monitoring.register_event_listener(_on_event)
    cache = compile_cache.enable()
    path = a.path or synth.ensure(a.preset, a.type, 0)
    size = os.path.getsize(path)
    stack = {"auto": None, "1": True, "0": False}[a.stack]
    dev = jax.devices()[0]
    print(f"{dev.platform} {dev.device_kind}: {path} ({size / 1e6:.0f} MB), compile cache {cache}")
    t0 = time.perf_counter()
    jax.block_until_ready(jax.device_put(np.zeros(8, np.float32)))
    # the runtime's one-time start (CUDA: context, memory pool) is no part of the load
    print(f"first device_put (runtime start) {time.perf_counter() - t0:.3f} s")
    if not a.cold_file:
        warm(path)
    times = []
    for rep in range(a.reps):
        EVENTS.clear()
        t0 = time.perf_counter()
        f = GGUFFile(path)
        t1 = time.perf_counter()
        params = P.load_params(f, stack_layers=stack)
        jax.block_until_ready(params)
        t2 = time.perf_counter()
        used, peak = memory()
        compile_s = EVENTS.get("/jax/core/compile/backend_compile_duration", 0.0)
        hits = int(EVENTS.get("/jax/compilation_cache/cache_hits", 0))
        misses = int(EVENTS.get("/jax/compilation_cache/cache_misses", 0))
        mem = ""
        if used is not None and peak is not None:
            mem = f"  device {used / size:.3f}x file, peak {peak / size:.3f}x"
        print(
            f"rep {rep}: open {t1 - t0:.3f} s  load_params {t2 - t1:.3f} s  total {t2 - t0:.3f} s"
            f"  (compile {compile_s:.2f} s, cache hits {hits} misses {misses}, "
            f"stacked={params.stacked}, weights {P.nbytes(params) / size:.3f}x file){mem}"
        )
        times.append(t2 - t0)
        stacked = params.stacked
        del params, f
    if len(times) > 1:
        print(f"median of reps 1..: {statistics.median(times[1:]):.3f} s")
    if not a.no_phases:
        print("phases:")
        phases(path, stacked, a.threads)
    if a.compile:
        compile_times(path, a.compile)


if __name__ == "__main__":
    main()
