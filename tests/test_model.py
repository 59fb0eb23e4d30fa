"""End-to-end logits against BlinkDL's official package and float64 math (spec §6 ladder 4-7)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax
from rwkv_jax.generate import prefill_call

PROMPT = (
    "The RWKV language model is a recurrent neural network with transformer-level performance. "
    "It can be trained in parallel like a transformer, and it runs as an RNN at inference time, "
    "so its memory does not grow with the context. 中文也可以。 Emoji too: 🦀🐍!\n\n"
    "User: What is 2 + 2?\n\nAssistant:"
)

# max|Δlogit| bound against the official fp32 implementation. Both sides compute in float32 with
# different summation orders (XLA dot vs torch matmul, chunked vs sequential WKV); logits have a
# standard deviation of ~3, so float32 rounding (~1e-7 relative) accumulated through 2-12 layers
# stays orders of magnitude below 1e-4 — the bound, used unchanged.
OFFICIAL_TOL = 1e-4


@functools.lru_cache(maxsize=8)
def _load(path: str, **kw) -> rwkv_jax.Model:
    return rwkv_jax.load(path, **kw)


def _ids(model: rwkv_jax.Model, n: int) -> list[int]:
    ids = model.tokenizer.encode(PROMPT)
    assert len(ids) >= n, len(ids)
    return ids[:n]


@pytest.mark.oracle
@pytest.mark.parametrize("preset", ["tiny", "0.1b"])
@pytest.mark.parametrize("impl", ["chunked", "sequential"])
def test_prefill_matches_official(synth_model, preset, impl):
    official = pytest.importorskip("tests.oracle.official")
    path = synth_model(preset, "F32")
    model = _load(path, wkv_impl=impl)
    ids = _ids(model, 64)
    ref = official.official_logits(path, ids, mode="seq")  # [T, V]
    got, _ = model.forward(ids, all_logits=True)
    got = np.asarray(got[0])
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err <= OFFICIAL_TOL, f"max|Δlogit| = {err:.3g} (std {ref.std():.3g})"
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.oracle
@pytest.mark.parametrize("preset", ["tiny", "0.1b"])
def test_decode_steps_match_official(synth_model, preset):
    """Feed one token at a time carrying the state, after a prefill: every step's logits."""
    official = pytest.importorskip("tests.oracle.official")
    path = synth_model(preset, "F32")
    model = _load(path)
    ids = _ids(model, 40)
    ref = official.official_logits(path, ids, mode="rnn")  # [T, V], token by token
    n_prefill = 20
    logits, state = model.forward(ids[:n_prefill])
    got = [np.asarray(logits[0])]
    for tok in ids[n_prefill:]:
        logits, state = model.step([tok], state)
        got.append(np.asarray(logits[0]))
    got = np.stack(got)
    want = ref[n_prefill - 1 :]
    err = np.abs(got - want).max()
    assert err <= OFFICIAL_TOL, f"max|Δlogit| = {err:.3g}"
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M", "Q6_K", "BF16"])
def test_quantized_matches_float64_math(synth_model, ftype):
    """f32 engine on packed weights vs float64 math on the same dequantized weights."""
    numpy_ref = pytest.importorskip("tests.oracle.numpy_ref")
    path = synth_model("tiny", ftype)
    model = _load(path)
    ids = _ids(model, 32)
    ref = numpy_ref.forward_f64(path, ids)
    got = np.asarray(model.forward(ids, all_logits=True)[0][0], np.float64)
    # 1e-3 relative to the logit scale (the bound); float32 vs float64 differs by ~1e-6.
    rel = np.abs(got - ref).max() / ref.std()
    assert rel <= 1e-3, rel
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def test_dense_mode_equals_packed(synth_model):
    path = synth_model("tiny", "Q4_K_M")
    packed, dense = _load(path), _load(path, mode="dense")
    ids = _ids(packed, 24)
    a = np.asarray(packed.forward(ids, all_logits=True)[0])
    b = np.asarray(dense.forward(ids, all_logits=True)[0])
    # same dequantized values, same f32 math: only XLA fusion/reassociation differs
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_batch_rows_are_independent(synth_model):
    model = _load(synth_model("tiny", "F32"))
    a, b = _ids(model, 30), _ids(model, 60)[30:]
    both, _ = model.forward([a, b])
    one_a, _ = model.forward(a)
    one_b, _ = model.forward(b)
    np.testing.assert_allclose(np.asarray(both), np.concatenate([one_a, one_b]), atol=2e-5)


def test_padding_never_reaches_the_state(synth_model):
    """Row lengths mask the tail: state and logits equal those of the unpadded prompt."""
    model = _load(synth_model("tiny", "F32"))
    cfg = model.config
    ids = np.asarray(_ids(model, 21), np.int32)
    junk = np.full(64 - 21, 12345, np.int32)
    toks = jnp.asarray(np.concatenate([ids, junk])[None])
    state0 = model.new_state(1)
    lg_pad, st_pad = prefill_call(
        model.params,
        toks,
        jnp.array([21]),
        state0,
        cfg=cfg,
        chunk_size=16,
        step_len=32,
        all_logits=False,
        impl="chunked",
        dtype=jnp.float32,
    )
    lg, st = model.forward(ids)
    np.testing.assert_allclose(np.asarray(lg_pad), np.asarray(lg), atol=1e-5)
    for x, y in zip(jax.tree.leaves(st_pad), jax.tree.leaves(st), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@pytest.mark.parametrize("stacked", [True, False])
def test_inactive_decode_rows_keep_their_state(synth_model, stacked):
    """decode_step with `active`: an inactive row's state comes back exactly (== on every value)
    as it went in, whatever token it is given; active rows get the ordinary step, bit for bit."""
    from rwkv_jax.generate import decode_step_kept

    model = _load(synth_model("tiny", "Q4_K_M"), stack_layers=stacked)
    cfg = model.config
    _, st = model.forward([_ids(model, 9), _ids(model, 18)[9:], _ids(model, 27)[18:]])
    toks = jnp.asarray([5, 77, 3000], jnp.int32)
    active = jnp.asarray([True, False, True])
    lg_m, st_m = decode_step_kept(model.params, toks, st, active, cfg=cfg, dtype=model.dtype)
    lg_a, st_a = decode_step_kept(model.params, toks, st, cfg=cfg, dtype=model.dtype)
    leaves = (jax.tree.leaves(t) for t in (st_m, st_a, st))
    for new, full, old in zip(*leaves, strict=True):
        new, full, old = np.asarray(new), np.asarray(full), np.asarray(old)
        assert np.array_equal(new[:, 1], old[:, 1])  # frozen row: untouched
        assert not np.array_equal(full[:, 1], old[:, 1])  # (a step would have changed it)
        assert np.array_equal(new[:, [0, 2]], full[:, [0, 2]])
    assert np.array_equal(np.asarray(lg_m)[[0, 2]], np.asarray(lg_a)[[0, 2]])


@pytest.mark.parametrize("preset", ["tiny", "0.1b"])
def test_synthetic_model_is_numerically_sane(synth_model, preset):
    """Logit spread like a trained model (std of a few units) and greedy output that wanders."""
    model = _load(synth_model(preset, "Q4_K_M"))
    ids = _ids(model, 16)
    logits, _ = model.forward(ids)
    std = float(jnp.std(logits))
    assert 1.0 <= std <= 10.0, std
    out = list(model.generate_tokens(ids, 64))
    assert len(set(out)) >= 16, out  # not stuck in a short loop


def test_generate_round_trips_text(synth_model):
    model = _load(synth_model("tiny", "F32"))
    ids = list(model.generate_tokens("Hello", 12))
    text = model.generate("Hello", 12)
    assert text == model.tokenizer.decode(ids)


def test_out_of_range_tokens_are_an_error(synth_model):
    model = _load(synth_model("tiny", "F32"))
    with pytest.raises(rwkv_jax.InputError, match="65536"):
        model.forward([1, 2, 65536])
    with pytest.raises(rwkv_jax.InputError, match="empty"):
        model.forward([])
