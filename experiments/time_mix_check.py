"""Decode with and without the time mix's decode kernels on a GPU (the per-head kernel,
rwkv_jax/gpu_time_mix.py, and the prologues, rwkv_jax/gpu_mix.py; or the packed matmuls'
kernels, rwkv_jax/gpu_kernels.py; or the batched LoRA matmuls', rwkv_jax/gpu_dense.py): how far
apart the logits and WKV states are.

    python -m experiments.time_mix_check [--preset 2.9b] [--cases float32:1 float32:8 bfloat16:1]
        [--kernels heads prologue matmuls dense]

For each DTYPE:B case: `--steps` greedy-free decode steps of random tokens, once with the
`--kernels` off (their ENABLED flags: the XLA path) and once on, in one process; prints
max |d logits| over their std, the largest KL between the two next-token distributions, top-1
agreement, and after one step each layer's max |d S| / max |S|. Float32 differences are
summation order only.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import rwkv_jax
from rwkv_jax import gpu_dense, gpu_kernels, gpu_mix, gpu_time_mix, synth
from rwkv_jax.generate import decode_step

# `matmuls`: the packed matmuls' Pallas kernels (off: XLA's fused matvec / dequantize-then-dot)
# `dense`: the batched LoRA matmuls' kernel (5..64 rows of bf16/f16; off: XLA's GEMMs)
KERNELS = {
    "heads": gpu_time_mix,
    "prologue": gpu_mix,
    "matmuls": gpu_kernels,
    "dense": gpu_dense,
}


def run(m, toks, on: bool, kernels):
    """Logits [steps, B, V] float64, the final WKV state and the state after the first step."""
    for name in kernels:
        KERNELS[name].ENABLED = on
    jax.clear_caches()
    st, logits, first = m.new_state(toks.shape[1]), [], None
    for t in toks:
        lg, st = decode_step(m.params, t, st, cfg=m.config, dtype=m.dtype)
        logits.append(np.asarray(lg, np.float64))
        first = np.asarray(st.wkv) if first is None else first
    return np.stack(logits), np.asarray(st.wkv), first


def log_softmax(a):
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="2.9b")
    p.add_argument("--type", default="Q4_K_M")
    p.add_argument("--model", default=None, help="a .gguf file instead of the synthetic preset")
    p.add_argument("--cases", nargs="+", default=["float32:1", "float32:8", "bfloat16:1"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=["heads", "prologue"])
    a = p.parse_args()
    path = a.model or synth.ensure(a.preset, a.type, 0)
    print(jax.devices()[0].device_kind, "jax", jax.__version__, path)
    for case in a.cases:
        dtype, B = case.split(":")
        m = rwkv_jax.load(path, dtype=dtype)
        rng = np.random.default_rng(int(B))
        toks = jnp.asarray(rng.integers(0, m.config.vocab_size, (a.steps, int(B))), jnp.int32)
        (x, sx, fx), (y, sy, fy) = run(m, toks, False, a.kernels), run(m, toks, True, a.kernels)
        lx, ly = log_softmax(x), log_softmax(y)
        kl = (np.exp(lx) * (lx - ly)).sum(-1).max()
        L = fx.shape[0]
        rel = np.abs(fx - fy).reshape(L, -1).max(1) / np.abs(fx).reshape(L, -1).max(1)
        print(
            f"{dtype} B={B}: max|d logits|/std {np.abs(x - y).max() / x.std():.2e}, max KL "
            f"{kl:.2e}, top-1 agree {(x.argmax(-1) == y.argmax(-1)).mean():.3f}, final state "
            f"max|d| {np.abs(sx - sy).max():.2e}; one step, max|dS|/max|S| per layer: "
            f"{rel.min():.1e}..{rel.max():.1e}"
        )


if __name__ == "__main__":
    main()
