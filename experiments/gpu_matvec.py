"""GPU decode-matvec microbenchmark: XLA's fused matvec vs the Pallas kernels (gpu_kernels).

Run (CUDA):  python -m experiments.gpu_matvec [--rows 1 4] [--variants ...] [--model 2.9b]

Shapes are the 2.9b model's (C = 2560, F = 10240, vocab 65536) with random packed bytes (finite
scales), in Q4_K and Q6_K. Each timing is one jitted call multiplying by --chain distinct weights
of the shape in a chain (each input depends on the previous output, with a small fold between),
so launches count as they do per token. Median of `--reps` calls; GB/s counts packed weight
bytes, next to a measured device copy. --model PRESET also times whole decode steps.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from experiments.cpu_matvec import random_weight
from experiments.decode_profile import bench
from rwkv_jax import gpu_kernels, quant

C, F, VOCAB = 2560, 10240, 65536
# (format, label, (out, in)): the Q4_K_M decode's big matrices
CASES = [
    (quant.Q4_K, "C x C", (C, C)),
    (quant.Q4_K, "C -> F", (F, C)),
    (quant.Q6_K, "F -> C", (C, F)),
    (quant.Q6_K, "head", (VOCAB, C)),
]


def timed(fn, *args, reps: int) -> float:
    """Median seconds of a blocking call, after two warm-up calls (decode_profile.bench)."""
    return bench(fn, *args, n=reps) / 1e3


def copy_gbs(reps: int) -> float:
    """Device copy bandwidth (read + write) of a 1 GiB buffer, GB/s."""
    a = jnp.ones((1 << 28,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    return 2 * a.nbytes / timed(f, a, reps=reps) / 1e9


def chain(mat, ws, x):
    """Multiply x through every weight of `ws` in turn (square-ish: fold the output back)."""
    n_in = x.shape[-1]
    for w in ws:
        y = mat(w, x).astype(jnp.float32)
        # fit [.., out] back to [.., in] so the next weight depends on this result
        if y.shape[-1] >= n_in:
            y = y[..., :n_in]
        else:
            y = jnp.tile(y, (1,) * (y.ndim - 1) + (n_in // y.shape[-1],))
        x = (x + 1e-3 * y).astype(x.dtype)
    return x


def variant(spec: str):
    """'xla' or 'pallas:TILE:WARPS:SPLIT[:STAGES]' -> (label, matmul function)."""
    if spec == "xla":
        return "xla fused", lambda w, x: w.matvec_fused(x)
    t, nw, sp, *st = map(int, spec.split(":")[1:])
    stages = st[0] if st else gpu_kernels.NUM_STAGES
    return f"pallas {t}x{nw}w split {sp} st {stages}", lambda w, x: gpu_kernels.matmul(
        w, x, block_rows=t, num_warps=nw, split=sp, num_stages=stages
    )


def decode_ab(
    preset: str, reps: int, configs: list[tuple[str, int]], batches: list[int], min_rows: int
) -> None:
    """Whole decode step of a synthetic Q4_K_M model: XLA fused vs Pallas, scan vs unrolled;
    the Pallas kernels take min_rows activation rows and up."""
    import rwkv_jax
    from rwkv_jax import model as M
    from rwkv_jax import synth
    from rwkv_jax.generate import decode_step

    m = rwkv_jax.load(synth.ensure(preset, "Q4_K_M", 0), stack_layers=True)
    cfg, dt = m.config, m.dtype
    for spec, unroll in configs:
        pallas = spec != "xla"
        gpu_kernels.ENABLED, M.LAYER_SCAN_UNROLL = pallas, unroll
        if pallas:
            t, nw, sp, *st = map(int, spec.split(":")[1:])
            gpu_kernels.BLOCK_ROWS, gpu_kernels.NUM_WARPS, gpu_kernels.SPLIT = t, nw, sp
            gpu_kernels.NUM_STAGES = st[0] if st else 2
            gpu_kernels.MIN_ROWS = min_rows
        jax.clear_caches()
        for b in batches:
            st, tok = m.new_state(b), jnp.ones((b,), jnp.int32)

            def step(tok, st):
                return decode_step(m.params, tok, jax.tree.map(jnp.copy, st), cfg=cfg, dtype=dt)[0]

            t0 = time.perf_counter()
            jax.block_until_ready(step(tok, st))
            first = time.perf_counter() - t0
            ms = 1e3 * timed(step, tok, st, reps=reps)
            print(
                f"{preset} decode B={b} {spec:16s} "
                f"unroll {unroll:2d}: {ms:7.3f} ms/step ({b / ms * 1e3:7.1f} tok/s), "
                f"first call {first:.1f} s"
            )


DEFAULT_VARIANTS = [
    "xla",
    "pallas:16:2:1",
    "pallas:16:4:1",
    "pallas:32:4:1",
    "pallas:64:4:1",
    "pallas:64:8:1",
    "pallas:32:4:4",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        help="xla | pallas:TILE:WARPS:SPLIT[:STAGES]",
    )
    p.add_argument("--chain", type=int, default=8, help="distinct weights per timed call")
    p.add_argument("--model", default=None, help="also time whole decode steps of this preset")
    p.add_argument(
        "--decode-variants",
        nargs="+",
        default=["xla", "pallas:32:4:4"],
        help="xla | pallas:TILE:WARPS:SPLIT[:STAGES] for --model",
    )
    p.add_argument("--unroll", type=int, nargs="+", default=[1], help="layers per scan step")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 64], help="for --model")
    p.add_argument("--min-rows", type=int, default=gpu_kernels.MIN_ROWS, help="for --model")
    a = p.parse_args()
    print(jax.devices()[0].device_kind, "jax", jax.__version__)
    print(f"device copy: {copy_gbs(a.reps):.0f} GB/s")
    variants = [variant(v) for v in a.variants if v != "none"]
    for cls, label, shape in CASES if variants else ():
        one = cls.row_bytes(shape[1]) * shape[0]
        ws = [random_weight(cls, shape, seed=i) for i in range(a.chain)]
        for rows in a.rows:
            x = jnp.ones((rows, shape[1]), jnp.bfloat16)
            for name, mat in variants:
                f = jax.jit(lambda ws, x, mat=mat: chain(mat, ws, x))
                try:
                    sec = timed(f, ws, x, reps=a.reps) / a.chain
                except Exception as e:  # a tile/warp variant Triton rejects
                    print(
                        f"{cls.__name__} {label:7s} M={rows} {name:24s} failed: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                    )
                    continue
                print(
                    f"{cls.__name__} {label:7s} M={rows} {name:24s} {1e6 * sec:8.1f} us "
                    f"{one / sec / 1e9:7.0f} GB/s"
                )
        del ws
    if a.model:
        configs = [(v, u) for v in a.decode_variants for u in a.unroll]
        decode_ab(a.model, a.reps, configs, a.batches, a.min_rows)


if __name__ == "__main__":
    main()
