"""Chunked prefill: equivalence with the token-by-token recurrence, split invariance, and the
compiled-once / donated-state properties of the two jit sites."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax
from rwkv_jax import backends, generate
from rwkv_jax.generate import decode_step, prefill_call

# Chunked and sequential WKV differ only in float32 summation order (triangular solve and
# matmuls vs a running recurrence): the bound of 1e-4 on logits of std ~3.
TOL = 1e-4


@functools.lru_cache(maxsize=8)
def _model(path: str, **kw) -> rwkv_jax.Model:
    return rwkv_jax.load(path, **kw)


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 65530, size=n).astype(np.int32)


@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 63, 130, 1000])
def test_chunked_equals_sequential(synth_model, chunk, T):
    path = synth_model("tiny", "F32")
    fast = _model(path, chunk_size=chunk, chunks_per_call=4, wkv_impl="chunked")
    ref = _model(path, chunk_size=16, chunks_per_call=16, wkv_impl="sequential")
    toks = _tokens(T)
    a, sa = fast.forward(toks, all_logits=True)
    b, sb = ref.forward(toks, all_logits=True)
    assert a.shape == b.shape == (1, T, 65536)
    err = float(jnp.abs(a - b).max())
    assert err <= TOL, err
    assert float(jnp.abs(sa.wkv - sb.wkv).max()) <= TOL


@pytest.mark.parametrize("T", [1, 17, 130, 300])
def test_multi_chunk_steps_equal_sequential(synth_model, T):
    """The GPU layout (several chunks per scan step, padding inside a step) on the CPU."""
    path = synth_model("tiny", "F32")
    fast = _model(path, chunk_size=16, chunks_per_step=4, chunks_per_call=8, wkv_impl="chunked")
    ref = _model(path, chunk_size=16, chunks_per_call=16, wkv_impl="sequential")
    toks = _tokens(T, seed=5)
    a, sa = fast.forward(toks, all_logits=True)
    b, sb = ref.forward(toks, all_logits=True)
    assert float(jnp.abs(a - b).max()) <= TOL
    last, sl = fast.forward(toks)
    assert float(jnp.abs(last - b[:, -1]).max()) <= TOL
    for x, y in zip(jax.tree.leaves(sl), jax.tree.leaves(sb), strict=True):
        assert float(jnp.abs(x - y).max()) <= TOL


def test_decode_steps_equal_prefill(synth_model):
    """Feeding tokens one at a time through the decode step gives the prefill's logits."""
    model = _model(synth_model("tiny", "F32"))
    toks = _tokens(40, seed=1)
    full, _ = model.forward(toks, all_logits=True)
    state = model.new_state(1)
    for t, tok in enumerate(toks):
        logits, state = model.step([int(tok)], state)
        assert float(jnp.abs(logits[0] - full[0, t]).max()) <= TOL


@pytest.mark.parametrize("split", [1, 16, 37])
def test_split_invariance(synth_model, split):
    model = _model(synth_model("tiny", "Q4_K_M"))
    toks = _tokens(100, seed=2)
    whole, s_whole = model.forward(toks)
    _, s_a = model.forward(toks[:split])
    part, s_b = model.forward(toks[split:], state=s_a)
    assert float(jnp.abs(whole - part).max()) <= TOL
    for x, y in zip(jax.tree.leaves(s_whole), jax.tree.leaves(s_b), strict=True):
        assert float(jnp.abs(x - y).max()) <= TOL


@pytest.mark.parametrize("impl", ["sequential", "chunked"])
@pytest.mark.parametrize("T", [7, 300])
@pytest.mark.parametrize("tail", [1, 2])
def test_tail_steps_equal_padded_step(synth_model, T, tail, impl):
    """A tail in shorter steps (one chunk: the CPU default; several: GPUs) = the same tokens in
    one padded long step, with either WKV kernel (the CPU's default and the GPUs')."""
    model = rwkv_jax.load(
        synth_model("tiny", "Q4_K_M"), chunks_per_step=8, chunks_per_call=16, wkv_impl=impl
    )
    assert model.tail_chunks == 1  # the CPU default
    toks = np.stack([_tokens(T), _tokens(T, 5)])
    lens = [T, max(1, T - 5)]
    got, s_got = dataclasses.replace(model, tail_chunks=tail).forward(
        toks, lengths=lens, all_logits=True
    )
    want, s_want = dataclasses.replace(model, tail_chunks=0).forward(
        toks, lengths=lens, all_logits=True
    )
    assert float(jnp.abs(got - want).max()) <= TOL
    for x, y in zip(jax.tree.leaves(s_got), jax.tree.leaves(s_want), strict=True):
        assert float(jnp.abs(x - y).max()) <= TOL


def test_auto_wkv_is_the_backends(synth_model):
    """wkv_impl="auto" (the default): the token recurrence on the CPU, the chunked form on
    accelerators; a name outside the list says which names there are."""
    assert generate.default_wkv("cpu") == "sequential"
    assert generate.default_wkv("gpu") == generate.default_wkv("METAL") == "chunked"
    path = synth_model("tiny", "F32")
    assert rwkv_jax.load(path).wkv_impl == generate.default_wkv()
    assert rwkv_jax.load(path, wkv_impl="chunked").wkv_impl == "chunked"
    with pytest.raises(rwkv_jax.InputError, match=r"'fast' is not one of .*'auto'"):
        rwkv_jax.load(path, wkv_impl="fast")


def test_large_batches_take_shorter_steps(synth_model, monkeypatch):
    """Rows x tokens per step above MAX_STEP_TOKENS halve the step; the result is the same."""
    model = rwkv_jax.load(synth_model("tiny", "Q4_K_M"), chunks_per_step=8, chunks_per_call=16)
    toks = np.stack([_tokens(200), _tokens(200, 5), _tokens(200, 9)])
    want, s_want = model.forward(toks, all_logits=True)
    seen = []
    real = generate.prefill_call

    def spy(*args, **kw):
        seen.append(kw["step_len"])
        return real(*args, **kw)

    monkeypatch.setattr(generate, "MAX_STEP_TOKENS", 3 * 32)
    monkeypatch.setattr(generate, "prefill_call", spy)
    got, s_got = model.forward(toks, all_logits=True)
    host = backends.current_profile().prefill_loop == "host"
    assert set(seen) == ({16} if host else {32, 16})  # 2-chunk steps, one-chunk tail
    assert float(jnp.abs(got - want).max()) <= TOL
    for x, y in zip(jax.tree.leaves(s_got), jax.tree.leaves(s_want), strict=True):
        assert float(jnp.abs(x - y).max()) <= TOL


def test_prefill_compiles_twice_per_batch_and_chunk(synth_model):
    """Two programs per batch size: whole long steps, and one-chunk steps for a tail shorter
    than a long step; every prompt length reuses them."""
    model = rwkv_jax.load(
        synth_model("tiny", "F32"), chunk_size=32, chunks_per_step=2, chunks_per_call=2
    )
    # metal-safe prefills one chunk per call (a host loop): one program, no tail variant
    programs = 1 if backends.current_profile().prefill_loop == "host" else 2
    before = prefill_call._cache_size()
    for T in (1, 5, 33, 64, 65, 200):  # 200 tokens: 3 long calls and a 8-token tail
        model.forward(_tokens(T))
    assert prefill_call._cache_size() - before == programs
    model.forward(np.stack([_tokens(10), _tokens(10, 3)]))  # a new batch size, tail only
    assert prefill_call._cache_size() - before == programs + 1


def test_decode_step_compiles_once_and_donates_state(synth_model):
    model = _model(synth_model("tiny", "F32"))
    state = model.new_state(1)
    before = decode_step._cache_size()
    for tok in (5, 6, 7):
        _, state = model.step([tok], state)
    assert decode_step._cache_size() - before <= 1
    lowered = decode_step.lower(
        model.params, jnp.zeros((1,), jnp.int32), state, cfg=model.config, dtype=model.dtype
    )
    text = lowered.compile().as_text()
    # every state leaf (att_shift, ffn_shift, wkv) is aliased to an output buffer
    # e.g. input_output_alias={ {1}: (35, {}, may-alias), {2}: (36, {}, may-alias), ... }
    aliases = re.findall(r"\{(\d+)\}: \((\d+), \{\}, (?:may|must)-alias\)", text)
    n_params = len(jax.tree.leaves(model.params))
    aliased_inputs = sorted(int(param) for _, param in aliases)
    assert aliased_inputs == [n_params + 1, n_params + 2, n_params + 3], aliases
    old = state
    _, state = model.step([1], state)
    assert old.wkv.is_deleted()  # the donated buffer was consumed


def test_all_logits_across_calls(synth_model):
    model = rwkv_jax.load(synth_model("tiny", "F32"), chunk_size=16, chunks_per_call=1)
    toks = _tokens(50, seed=4)
    many, _ = model.forward(toks, all_logits=True)  # 4 calls of one chunk
    last, _ = model.forward(toks)
    assert many.shape == (1, 50, 65536)
    # two compiled programs (head over [B, L, C] vs [B, C]) may sum in another order: ~1 ulp
    assert float(jnp.abs(many[:, -1] - last).max()) <= 1e-5
