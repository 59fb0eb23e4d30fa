"""CPU matmul microbenchmark: XLA (Weight.matmul) vs the native FFI kernel (cpu_kernels).

Run:  python -m experiments.cpu_matvec [--reps 5] [--rows 1 16] [--no-sweep] [--dtype bfloat16]

Shapes are the 0.1b model's (C = 768, F = 3072, vocab 65536) with random packed bytes (finite
scales): per layer four C x C matrices (r, k, v, o), C -> F and F -> C, all Q4_K, plus the
Q6_K head, and two of the four LoRA pairs (w1 / w2 float32, g1 / g2 float16 in the synthetic
Q4_K_M file; a1 / a2 and v1 / v2, float16 with 64 and 32 hidden, are left out). Each timing is
one jitted call that multiplies by K *distinct* weights of the shape in a chain (each input
depends on the previous output), so XLA cannot hoist a loop-invariant dequantization, dispatch
is amortised as in the decode step, and weights come from memory rather than a hot cache, as
they do per token (K x size >= 64 MB where K <= 16 allows; the C x C and LoRA chains, 5 and
3 MB, fit a 32 MB L3: optimistic). Best of `--reps`; GB/s counts the packed weight bytes read
per matmul. `--dtype bfloat16` times the bfloat16 path (activations in bfloat16, weights
rounded to bfloat16: vdpbf16ps with avx512_bf16).

The per-token estimate sums 12 x (4 C x C + C->F + F->C + the four LoRA matrices) + head from
the table; the sweep then measures 12 x (4 C x C + C->F + F->C) + head (73 distinct matrices,
89 MB) in one jit, at 1 activation row.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax import cpu_kernels, quant

C, F, VOCAB, LAYERS = 768, 3072, 65536, 12
# (label, format, (out, in), count per token)
SHAPES = [
    ("C x C (r,k,v,o)", quant.Q4_K, (C, C), 4 * LAYERS),
    ("C -> F (ffn key)", quant.Q4_K, (F, C), LAYERS),
    ("F -> C (ffn value)", quant.Q4_K, (C, F), LAYERS),
    ("head", quant.Q6_K, (VOCAB, C), 1),
    ("LoRA down w1", quant.F32, (64, C), LAYERS),
    ("LoRA up w2", quant.F32, (C, 64), LAYERS),
    ("LoRA down g1", quant.F16, (128, C), LAYERS),
    ("LoRA up g2", quant.F16, (C, 128), LAYERS),
]
# one layer in model order: r, k, v, o, ffn key, ffn value
LAYER = [(quant.Q4_K, (C, C))] * 4 + [(quant.Q4_K, (F, C)), (quant.Q4_K, (C, F))]
CHAIN_BYTES = 64e6  # distinct weights per timed call: about this many bytes (2..16 of them)


def random_weight(cls: type[quant.Weight], shape: tuple[int, int], seed: int) -> quant.Weight:
    """A packed weight of random bytes whose fp16 fields are finite, |v| in [1e-4, 1] (float32
    values: standard normal)."""
    rng = np.random.default_rng(seed)
    out, n_in = shape
    raw = rng.integers(0, 256, out * cls.row_bytes(n_in), dtype=np.uint8)
    rec = raw.view(cls.BLOCK)
    for name in cls.BLOCK.names:
        if cls.BLOCK[name] == np.float16:
            mag = 10.0 ** rng.uniform(-4, 0, rec.shape)
            rec[name] = (rng.choice([-1.0, 1.0], rec.shape) * mag).astype(np.float16)
        elif cls.BLOCK[name] == np.float32:
            rec[name] = rng.standard_normal(rec.shape).astype(np.float32)
    return cls.from_raw(raw, shape)


def xla_matmul(w: quant.Weight, x: jax.Array) -> jax.Array:
    """The XLA path the CPU takes without the native kernels (float32 result); Weight.matmul
    itself would take the native kernels here."""
    return w._matmul_xla(x).astype(jnp.float32)


def native_matmul(w: quant.Weight, x: jax.Array) -> jax.Array:
    """The native FFI kernel."""
    return cpu_kernels.matmul(w, x)


def chain(fn, weights: list[quant.Weight], x: jax.Array) -> jax.Array:
    """Multiply by each weight in turn; the next input depends on the last output."""
    for w in weights:
        y = fn(w, x)  # [M, out]
        x = (x + 1e-3 * jnp.mean(y, axis=-1, keepdims=True)).astype(x.dtype)  # [M, in]
    return x


def best_time(run, *args, reps: int) -> float:
    """Best wall time of `reps` calls of a jitted function (after one warm-up call)."""
    jax.block_until_ready(run(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def sweep(fn, layers, head, x: jax.Array) -> jax.Array:
    """One token's matmuls in model order: per layer r, k, v, o, ffn key -> value; the head."""
    dt = x.dtype
    for mats in layers:
        for w in mats[:4]:
            x = (x + 1e-3 * fn(w, x)).astype(dt)  # [M, C]
        h = fn(mats[4], x).astype(dt)  # [M, F]
        x = (x + 1e-3 * fn(mats[5], h)).astype(dt)
    return fn(head, x)  # [M, V]


def main() -> None:
    """Print the per-matrix table, the per-token estimate and the measured sweep."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="timed calls per cell (best is kept)")
    # M = 1: decode; 128: a CPU prefill step (generate.default_layout), the tiled kernel
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 128], help="activation rows M")
    ap.add_argument("--no-xla", action="store_true", help="time only the native kernel")
    ap.add_argument("--no-sweep", action="store_true", help="skip the 73-matrix sweep")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    t0 = time.perf_counter()
    ok = cpu_kernels.available()
    print(
        f"native: {cpu_kernels.reason()} ({cpu_kernels.info()}); first use took "
        f"{time.perf_counter() - t0:.1f} s (compile {cpu_kernels.build_seconds():.1f} s)"
    )
    print(f"jax {jax.__version__}, devices {jax.devices()}, activations {args.dtype}")
    paths = [] if args.no_xla else [("xla", xla_matmul)]
    paths += [("native", native_matmul)] if ok else []
    rng = np.random.default_rng(0)

    per_token: dict[tuple[str, int], float] = {}
    print("\n| matrix | format | out x in | MB packed | M | path | ms/call | GB/s | vs xla |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (label, cls, shape, count) in enumerate(SHAPES):
        size = cls.row_bytes(shape[1]) * shape[0]
        k = int(np.clip(CHAIN_BYTES // size, 2, 16))
        weights = [random_weight(cls, shape, seed=100 * i + j) for j in range(k)]
        for m in args.rows:
            x = jnp.asarray(rng.standard_normal((m, shape[1])), args.dtype)
            base = None
            for name, fn in paths:
                run = jax.jit(lambda ws, x, fn=fn: chain(fn, ws, x))
                s = best_time(run, weights, x, reps=args.reps) / k
                base = s if name == "xla" else base
                per_token[(name, m)] = per_token.get((name, m), 0.0) + count * s
                speed = f"{base / s:.1f}x" if base and name != "xla" else ""
                print(
                    f"| {label} | {cls.__name__} | {shape[0]}x{shape[1]} | {size / 1e6:.2f} | "
                    f"{m} | {name} | {s * 1e3:.3f} | {size / s / 1e9:.2f} | {speed} |",
                    flush=True,
                )
        del weights

    print(
        "\nEstimated matmul time per token, 12 x (4 CxC + C->F + F->C + w1, w2, g1, g2) + head, "
        "from the table:"
    )
    for (name, m), s in sorted(per_token.items()):
        rate = m / s
        print(f"  {name:6s} M={m:<3d} {s * 1e3:8.2f} ms/step  ->  {rate:8.1f} tok/s (matmuls only)")

    if not args.no_sweep:
        layers = [
            [random_weight(c, shape, seed=1000 + 10 * i + j) for j, (c, shape) in enumerate(LAYER)]
            for i in range(LAYERS)
        ]
        head = random_weight(quant.Q6_K, (VOCAB, C), seed=999)
        nbytes = sum(w.nbytes for mats in layers for w in mats) + head.nbytes
        print(f"\nMeasured: the 73 matmuls of one token in one jit ({nbytes / 1e6:.0f} MB), M=1")
        x = jnp.asarray(rng.standard_normal((1, C)), args.dtype)
        for name, fn in paths:
            run = jax.jit(lambda layers, head, x, fn=fn: sweep(fn, layers, head, x))
            s = best_time(run, layers, head, x, reps=max(2, args.reps // 2))
            print(f"  {name:6s} {s * 1e3:8.2f} ms/token  ({nbytes / s / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
