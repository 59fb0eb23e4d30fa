"""State checkpoints (save/load/fork/resume), state-tuning imports, and the prefix-state cache."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import equinox as eqx
import jax
import numpy as np
import pytest

import rwkv_jax
from rwkv_jax import checkpoint
from rwkv_jax.errors import InputError, StateError
from rwkv_jax.sampling import Sampler
from rwkv_jax.session import Generator, PrefixCache
from rwkv_jax.state import State

FIELDS = ("att_shift", "ffn_shift", "wkv")
PROMPT = "The RWKV state is the whole memory of the model, so it can be saved and forked."


@pytest.fixture(scope="module")
def model(synth_model) -> rwkv_jax.Model:
    return rwkv_jax.load(synth_model("tiny", "F32"))


def _assert_states_equal(a: State, b: State, atol: float = 0.0) -> None:
    for name in FIELDS:
        np.testing.assert_allclose(
            np.asarray(getattr(a, name), np.float32),
            np.asarray(getattr(b, name), np.float32),
            atol=atol,
            rtol=0,
        )


# ---- save / load ----------------------------------------------------------------------------


def test_save_load_roundtrip(model, tmp_path):
    logits, state = model.forward(model.tokenizer.encode(PROMPT))
    path = tmp_path / "s.safetensors"
    checkpoint.save_state(path, state, model, positions=[17], logits=logits, extra={"k": [1]})
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]  # the temporary file is gone
    meta = checkpoint.read_metadata(path)
    assert meta["shapes"]["wkv"] == [2, 1, 4, 64, 64]
    assert meta["model"]["n_layer"] == 2 and meta["dtypes"]["wkv"] == "float32"
    ck = checkpoint.load_state(path, model)
    _assert_states_equal(ck.state, state)
    np.testing.assert_array_equal(np.asarray(ck.logits), np.asarray(logits))
    assert ck.positions == [17] and ck.extra == {"k": [1]}
    assert ck.fingerprint == checkpoint.model_fingerprint(model)


def test_compute_dtype_is_recorded_and_restored(model, tmp_path):
    bf16 = dataclasses.replace(model, dtype=jax.numpy.bfloat16)  # shift states in bfloat16
    st = bf16.new_state(1)
    st = dataclasses.replace(st, att_shift=st.att_shift + jax.numpy.bfloat16(1.5))
    path = tmp_path / "bf16.safetensors"
    checkpoint.save_state(path, st, bf16)
    assert checkpoint.read_metadata(path)["dtypes"]["att_shift"] == "bfloat16"
    back = checkpoint.load_state(path, bf16).state
    assert back.att_shift.dtype == jax.numpy.bfloat16 and float(back.att_shift.max()) == 1.5
    assert checkpoint.load_state(path, model).state.att_shift.dtype == jax.numpy.float32


@pytest.mark.parametrize(
    "sampler", [Sampler.greedy(), Sampler(temperature=1.0, top_p=0.9, top_k=50)], ids=str
)
def test_resume_equivalence(model, tmp_path, sampler):
    """generate 2, save, load, generate 2 == generate 4 (sampled too: keys follow positions)."""
    gen = Generator(model)
    whole = gen.generate([PROMPT], 4, sampler, seed=3)
    first = gen.generate([PROMPT], 2, sampler, seed=3)
    path = tmp_path / "half.safetensors"
    checkpoint.save_state(path, first.state, model, positions=first.positions, logits=first.logits)
    ck = checkpoint.load_state(path, model)
    rest = gen.generate(
        [[]], 2, sampler, seed=3, state=ck.state, logits=ck.logits, positions=ck.positions
    )
    assert first.tokens[0] + rest.tokens[0] == whole.tokens[0]
    assert rest.positions == whole.positions
    _assert_states_equal(rest.state, whole.state)


def test_resume_with_penalties_carried(model):
    s = Sampler(temperature=1.0, alpha_presence=0.6, alpha_frequency=0.4, alpha_decay=0.9)
    gen = Generator(model)
    whole = gen.generate([PROMPT], 6, s, seed=9)
    first = gen.generate([PROMPT], 3, s, seed=9)
    rest = gen.generate(
        [[]], 3, s, seed=9, state=first.state, logits=first.logits,
        positions=first.positions, penalty=first.penalty,
    )  # fmt: skip
    assert first.tokens[0] + rest.tokens[0] == whole.tokens[0]


def test_fork_continues_two_ways(model):
    """One context forked into two continuations; each equals a fresh run of its full text."""
    tok = model.tokenizer
    gen = Generator(model)
    logits, base = model.forward(tok.encode("Once upon a time"))
    branches = {}
    for suffix in (" there was a cat", " in a land far away"):
        res = gen.generate([suffix], 6, state=checkpoint.fork(base), logits=logits, positions=[4])
        branches[suffix] = res
    # the base state is untouched by the donated forks: it still continues like before
    again = gen.generate([" there was a cat"], 6, state=checkpoint.fork(base), logits=logits)
    assert again.tokens == branches[" there was a cat"].tokens
    for suffix, res in branches.items():
        fresh = gen.generate(["Once upon a time" + suffix], 6)
        assert res.tokens == fresh.tokens
        # prefilled as one prompt or as two: only the chunk boundaries differ (float32 rounding)
        _assert_states_equal(res.state, fresh.state, atol=1e-4)
    assert branches[" there was a cat"].tokens != branches[" in a land far away"].tokens


def test_row_surgery(model):
    st = model.new_state(1)
    rep = checkpoint.repeat_rows(checkpoint.fork(st), 3)
    assert rep.batch == 3
    both = checkpoint.concat_rows([rep, checkpoint.take_rows(rep, [0])])
    assert both.batch == 4
    with pytest.raises(StateError):
        checkpoint.repeat_rows(rep, 2)


# ---- wrong files, wrong models --------------------------------------------------------------


def _other_weights(model) -> rwkv_jax.Model:
    """The same shapes with different weights (one layer-norm vector changed)."""
    params = eqx.tree_at(lambda p: p.ln_out_w, model.params, model.params.ln_out_w * 1.01)
    return dataclasses.replace(model, params=params)


def test_state_from_other_weights_is_refused(model, tmp_path):
    path = tmp_path / "s.safetensors"
    checkpoint.save_state(path, model.new_state(1), model)
    other = _other_weights(model)
    with pytest.raises(StateError, match="fingerprint"):
        checkpoint.load_state(path, other)
    assert checkpoint.load_state(path, other, check_model=False).state.batch == 1


def test_state_of_other_shape_is_refused(model, tmp_path):
    path = tmp_path / "s.safetensors"
    checkpoint.save_state(path, model.new_state(2), model)
    bigger = dataclasses.replace(model, config=dataclasses.replace(model.config, n_layer=3))
    with pytest.raises(StateError, match="n_layer=2"):
        checkpoint.load_state(path, bigger)
    with pytest.raises(StateError, match="att_shift"):
        checkpoint.save_state(tmp_path / "t.safetensors", model.new_state(1), bigger)


def test_fingerprint_ignores_the_file_type(model, synth_model):
    """A state belongs to the trained weights, not to one quantization of them."""
    q8 = rwkv_jax.load(synth_model("tiny", "Q8_0"), mode="dense")
    assert checkpoint.model_fingerprint(q8) == checkpoint.model_fingerprint(model)
    assert checkpoint.model_fingerprint(_other_weights(model)) != checkpoint.model_fingerprint(
        model
    )


def test_files_that_are_not_states(model, tmp_path):
    from safetensors.numpy import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(plain))
    cases = {
        "no such": tmp_path / "missing.safetensors",
        "not a safetensors": junk,
        "not an rwkv_jax state": plain,
    }
    for message, path in cases.items():
        with pytest.raises(StateError, match=message):
            checkpoint.load_state(path, model)
    future = tmp_path / "future.safetensors"
    checkpoint.save_state(future, model.new_state(1), model)
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save

    meta = checkpoint.read_metadata(future)
    raw = {k: v for k, v in load_file(str(future)).items()}
    save(raw, str(future), metadata={
        "format": checkpoint.FORMAT, "format_version": "99", "fingerprint": meta["fingerprint"],
        "model": json.dumps(meta["model"]), "positions": "[0]", "dtypes": "{}", "shapes": "{}",
    })  # fmt: skip
    with pytest.raises(StateError, match="newer"):
        checkpoint.load_state(future, model)


# ---- state tuning ---------------------------------------------------------------------------


def _write_time_state(path, n_layer: int, shape, seed: int = 0) -> list[np.ndarray]:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    mats = [(rng.normal(size=shape) * 0.3).astype(np.float32) for _ in range(n_layer)]
    sd = {f"blocks.{i}.att.time_state": torch.tensor(m).to(torch.bfloat16) for i, m in
          enumerate(mats)}  # fmt: skip
    torch.save(sd, path)
    return [torch.tensor(m).to(torch.bfloat16).float().numpy() for m in mats]


def test_import_state_tuning(model, tmp_path):
    path = tmp_path / "tuned.pth"
    mats = _write_time_state(path, 2, (4, 64, 64))
    st = checkpoint.import_state_tuning(path, model, batch=2)
    assert st.batch == 2
    np.testing.assert_array_equal(np.asarray(st.wkv[:, 1]), np.stack(mats))  # no transpose
    assert not np.asarray(st.att_shift).any() and not np.asarray(st.ffn_shift).any()
    ck = checkpoint.load_any(path, model)
    assert ck.positions == [0] and ck.state.batch == 1


def test_bad_state_tuning_files(model, tmp_path):
    few = tmp_path / "few.pth"
    _write_time_state(few, 1, (4, 64, 64))
    with pytest.raises(StateError, match="1 'blocks.N.att.time_state' tensors"):
        checkpoint.import_state_tuning(few, model)
    wrong = tmp_path / "wrong.pth"
    _write_time_state(wrong, 2, (8, 32, 32))
    with pytest.raises(StateError, match=r"\(4, 64, 64\)"):
        checkpoint.import_state_tuning(wrong, model)


def test_state_tuning_without_torch(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(StateError, match="PyTorch"):
        checkpoint.import_state_tuning(tmp_path / "x.pth", model)


@pytest.mark.oracle
def test_state_tuning_layout_matches_official(model, synth_model, tmp_path):
    """The official RWKV-7 package started from time_state as is gives our logits; started
    from its transpose it does not (so the test tells the two layouts apart)."""
    pytest.importorskip("rwkv")
    official = pytest.importorskip("tests.oracle.official")
    path = tmp_path / "tuned.pth"
    mats = _write_time_state(path, 2, (4, 64, 64), seed=1)
    ids = model.tokenizer.encode("Hello there")
    got, _ = model.forward(ids, checkpoint.import_state_tuning(path, model))
    C = model.config.n_embd

    def official_logits(layout):
        st = []
        for m in mats:
            st += [np.zeros(C, np.float32), layout(m), np.zeros(C, np.float32)]
        return official.official_run(synth_model("tiny", "F32"), ids, mode="seq", state=st)[0][-1]

    err = np.abs(np.asarray(got[0]) - official_logits(lambda m: m)).max()
    err_t = np.abs(np.asarray(got[0]) - official_logits(lambda m: m.transpose(0, 2, 1))).max()
    assert err <= 1e-4, err  # the end-to-end tolerance of tests/test_model.py
    assert err_t > 1e-2, err_t


# ---- prefix cache ---------------------------------------------------------------------------


def test_prefix_cache_longest_prefix_and_lru(model):
    st = model.new_state(1)
    lg = jax.numpy.zeros((1, model.config.vocab_size))
    one = PrefixCache()
    one.insert([1], st, lg)
    size = one.nbytes
    cache = PrefixCache(max_bytes=2 * size)
    cache.insert([1, 2], st, lg)
    cache.insert([1, 2, 3, 4], st, lg)
    assert cache.lookup([1, 2, 3, 4, 5])[0] == 4
    assert cache.lookup([1, 2, 3])[0] == 2
    assert cache.lookup([1, 2])[0] == 2 and cache.lookup([7]) is None
    cache.insert([9], st, lg)  # over budget: the least recently used ([1, 2, 3, 4]) goes
    assert len(cache) == 2 and cache.nbytes == 2 * size
    assert [1, 2, 3, 4] not in cache and [1, 2] in cache
    assert cache.lookup([1, 2, 3, 4])[0] == 2
    assert PrefixCache(max_bytes=size - 1).insert([1], st, lg) is False
    with pytest.raises(InputError):
        PrefixCache(max_bytes=0)


def test_generation_with_prefix_cache(model):
    """Shared prefixes reuse the cached state; results equal running without the cache."""
    cache = PrefixCache()
    gen, plain = Generator(model, cache), Generator(model)
    system = "System: You are terse.\n\n"
    ids = model.tokenizer.encode(system)
    logits, st = model.forward(ids)
    cache.insert(ids, st, logits)
    q = [system + f"User: {w}\n\nAssistant:" for w in ("hi", "bye", "what?")]
    r = gen.generate(q, 5)
    assert r.cached == [len(ids)] * 3
    ref = plain.generate(q, 5)
    assert r.tokens == ref.tokens
    _assert_states_equal(r.state, ref.state, atol=1e-4)  # prefill split at another point
    again = gen.generate([q[0]], 5)  # the whole prompt is cached now: no prefill at all
    assert again.cached == [len(model.tokenizer.encode(q[0]))]
    assert again.tokens == [r.tokens[0]]
    context = model.tokenizer.encode(q[0]) + r.tokens[0]  # the generated context is cached too
    assert gen.generate([context + [33]], 1).cached == [len(context)]
