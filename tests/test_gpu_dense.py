"""The grouped dense (LoRA) matmul kernel of batched decode (rwkv_jax/gpu_dense.py): against
float64 products in Pallas' interpreter on the CPU, its Triton lowering for CUDA, and the
model's decode through it (CUDA branch forced) against the XLA path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import rwkv_jax
from rwkv_jax import gpu_dense, gpu_kernels, gpu_time_mix, quant

TRITON = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

# one layer's LoRA downs (out = rank, in = C: split into KC-wide parts) of the 0.1b model, and
# ups (out = C, in = rank: whole, in power-of-two pieces) at the 2.9b's ranks with a smaller C
DOWNS = (
    (64, 768, jnp.float32),
    (64, 768, jnp.float16),
    (32, 768, jnp.float16),
    (128, 768, jnp.float16),
)
UPS = (
    (512, 96, jnp.float32),
    (512, 96, jnp.float16),
    (512, 64, jnp.float16),
    (512, 320, jnp.float16),
)


def _operands(shapes, rows, dtype, seed):
    rng = np.random.default_rng(seed)
    L = 3
    stacks = [jnp.asarray(rng.standard_normal((L, o, i)) / np.sqrt(i), t) for o, i, t in shapes]
    xs = [jnp.asarray(rng.standard_normal((rows, 1, i)), dtype) for _, i, _ in shapes]
    return stacks, xs


@pytest.mark.parametrize("shapes", [DOWNS, UPS], ids=["downs", "ups"])
@pytest.mark.parametrize("rows", [5, 16, 17, 64])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernel_within_rounding_of_float64(shapes, rows, dtype):
    """Each product equals x · bf16(W[layer])ᵀ (the layer the index picks, weights rounded to
    x's dtype as XLA's dot does) up to float32 summation (gamma_n, Higham) and one rounding to
    x's dtype: a wrong layer, output tile, input part or piece is off by about the values."""
    stacks, xs = _operands(shapes, rows, dtype, seed=rows)
    got = gpu_dense.matmul_group(stacks, xs, jnp.int32(1), interpret=True)
    for stack, x, y in zip(stacks, xs, got, strict=True):
        assert y.shape == (rows, 1, stack.shape[1]) and y.dtype == dtype
        w = np.asarray(stack[1].astype(dtype), np.float64)  # [out, in]
        xf = np.asarray(x, np.float64)[:, 0]  # [rows, in]
        want = xf @ w.T
        n = w.shape[1]
        gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
        unit = 2.0 ** -(jnp.finfo(dtype).nmant + 1)  # the final rounding to dtype
        bound = gamma * (np.abs(xf) @ np.abs(w).T) * (1 + unit) + unit * np.abs(want)
        err = np.abs(np.asarray(y, np.float64)[:, 0] - want)
        assert (err <= bound + 1e-30).all(), float((err - bound).max())


def test_parts_and_tiles(monkeypatch):
    """Long rows split into KC-wide parts, short ones whole; tiles are powers of two dividing
    the rows; what they cannot cover is refused."""
    assert gpu_dense._parts(2560) == 2560 // gpu_dense.KC and gpu_dense._parts(320) == 1
    assert gpu_dense._tile(320) == 32 and gpu_dense._tile(2560) == 32 and gpu_dense._tile(48) == 16
    assert gpu_dense._tile(40) is None
    w = quant.F16(shape=(40, 256), w=jnp.zeros((40, 256), jnp.float16))
    monkeypatch.setattr(gpu_dense, "_cpu_backend", lambda: False)  # as on a GPU host
    ok = quant.F16(shape=(64, 256), w=jnp.zeros((64, 256), jnp.float16))
    assert gpu_dense.supports([ok], 8, jnp.bfloat16)
    assert not gpu_dense.supports([ok, w], 8, jnp.bfloat16)  # 40 rows: no tile
    assert not gpu_dense.supports([ok], 4, jnp.bfloat16)  # XLA's multiply-reduce rows
    assert not gpu_dense.supports([ok], 65, jnp.bfloat16)
    assert not gpu_dense.supports([ok], 8, jnp.float32)  # no tensor cores


@pytest.mark.parametrize("rows", [8, 64])
def test_lowers_to_triton_for_cuda(rows):
    """One Triton call at the 2.9b model's sizes (C = 2560, ranks 96/96/64/320) for the four
    downs, and for the four ups, reading the stacks whole (no slice of a layer)."""
    L, C = 4, 2560
    ranks = (96, 96, 64, 320)
    for shapes in ([(d, C) for d in ranks], [(C, d) for d in ranks]):
        stacks = [
            jnp.ones((L, *s), jnp.float32 if i == 0 else jnp.float16) for i, s in enumerate(shapes)
        ]
        xs = [jnp.ones((rows, 1, s[1]), jnp.bfloat16) for s in shapes]
        f = jax.jit(gpu_dense.matmul_group)
        text = export.export(f, platforms=["cuda"], disabled_checks=TRITON)(
            stacks, xs, jnp.int32(2)
        ).mlir_module()
        calls = [ln for ln in text.splitlines() if "__gpu$xla.gpu.triton" in ln]
        assert len(calls) == 1
        for s in shapes:
            assert f"tensor<{L}x{s[0]}x{s[1]}x" in calls[0]
        assert "dynamic_slice" not in text


@pytest.mark.parametrize("stack_layers", [True, False], ids=["stacked", "unrolled"])
@pytest.mark.parametrize("B", [5, 17])
def test_decode_with_kernel_matches_xla(
    monkeypatch, cuda_branch, decode_steps, synth_model, stack_layers, B
):
    """Three decode steps of the tiny model with the LoRA downs (and above MAX_UP_ROWS the
    ups) through the kernel equal the XLA path's: the matrices, their stacks and the layer
    index wired right. Float32 (the tensor-core gate lifted: interpreted, the kernel's dot is
    float32 too), so only the summation order differs."""
    m = rwkv_jax.load(synth_model("tiny", "Q8_0"), stack_layers=stack_layers, dtype="float32")
    rng = np.random.default_rng(B)
    toks = jnp.asarray(rng.integers(0, m.config.vocab_size, (3, B)), jnp.int32)
    want_logits, want_st = decode_steps(m, toks)
    monkeypatch.setattr(gpu_kernels, "_tensor_cores", lambda dtype: True)
    log_dense = lambda a, kw: tuple(s.shape for s in a[0])  # noqa: E731
    log_heads = lambda a, kw: "heads"  # noqa: E731
    calls = cuda_branch(
        [(gpu_dense, "matmul_group", log_dense), (gpu_time_mix, "time_mix_heads", log_heads)]
    )
    jax.clear_caches()
    got_logits, got_st = decode_steps(m, toks)
    jax.clear_caches()
    cfg = m.config
    L = cfg.n_layer if stack_layers else 1
    blk = m.params.blocks if stack_layers else m.params.blocks[0]
    ranks = [getattr(blk, n).w.shape[-2] for n in ("w1", "a1", "v1", "g1")]
    downs = tuple((L, d, cfg.n_embd) for d in ranks)
    ups = tuple((L, cfg.n_embd, d) for d in ranks)
    per_layer = [downs] + [ups] * (B > gpu_time_mix.MAX_UP_ROWS) + ["heads"]
    assert calls == per_layer * (1 if stack_layers else cfg.n_layer)
    scale = np.abs(want_logits).max()
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(
        np.asarray(got_st.wkv), np.asarray(want_st.wkv), rtol=1e-4, atol=1e-5
    )
