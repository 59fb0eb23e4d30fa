"""Sampling on the device, stop strings / streaming text, and batched generation (B streams)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax
from rwkv_jax import backends, sampling, session
from rwkv_jax.errors import InputError
from rwkv_jax.sampling import Penalty, Sampler, SamplerParams
from rwkv_jax.session import Generator, TextStream, sample_steps, sample_steps_kept

# ---- helpers --------------------------------------------------------------------------------

# jitted once here: eager calls would compile every primitive separately on each new shape
_sample = jax.jit(sampling.sample)
_update = jax.jit(sampling.update_penalties)
_adjust = jax.jit(sampling.adjust_logits)
_cutoff = jax.jit(sampling.cutoff)


def _params(samplers, V):
    return SamplerParams.from_samplers(samplers, V)


def _draws(logits: np.ndarray, sampler: Sampler, n: int, seed: int = 0) -> np.ndarray:
    """n independent draws from one logits row: the row repeated n times, one key per row."""
    V = logits.shape[-1]
    z = jnp.asarray(np.repeat(logits[None].astype(np.float32), n, axis=0))
    keys = sampling.stream_keys(seed, n)
    sp = _params([sampler] * n, V)
    return np.asarray(_sample(z, keys, sp, Penalty.zeros(n, V)))


def _probs(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _official_top_p_cutoff(probs: np.ndarray, top_p: float) -> float:
    """The cutoff of `PIPELINE.sample_logits` (rwkv/utils.py, CPU branch), verbatim logic."""
    sorted_probs = np.sort(probs)[::-1]
    cumulative_probs = np.cumsum(sorted_probs)
    return float(sorted_probs[np.argmax(cumulative_probs >= top_p)])


# ---- greedy, seeds, batch invariance --------------------------------------------------------


def test_greedy_is_argmax_first_max_wins():
    z = np.array([[0.5, 2.0, -1.0, 2.0, 1.9], [3.0, 3.0, 3.0, 0.0, 0.0]], np.float32)
    sp = _params([Sampler.greedy()] * 2, 5)
    got = _sample(jnp.asarray(z), sampling.stream_keys(0, 2), sp, Penalty.zeros(2, 5))
    assert got.tolist() == [1, 0]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    rng = np.random.default_rng(0)
    z = rng.normal(size=64).astype(np.float32) * 2
    a = _draws(z, Sampler(temperature=1.0), 256, seed=7)
    b = _draws(z, Sampler(temperature=1.0), 256, seed=7)
    c = _draws(z, Sampler(temperature=1.0), 256, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rows_do_not_depend_on_the_batch():
    """Row b of a batched call equals the same row sampled alone with the same key."""
    rng = np.random.default_rng(1)
    V = 300
    z = rng.normal(size=(4, V)).astype(np.float32) * 3
    samplers = [
        Sampler(top_p=0.6),
        Sampler(top_k=7, temperature=0.7),
        Sampler(min_p=0.05),
        Sampler.greedy(),
    ]
    keys = sampling.stream_keys(3, 4)
    batched = _sample(jnp.asarray(z), keys, _params(samplers, V), Penalty.zeros(4, V))
    for b in range(4):
        alone = _sample(
            jnp.asarray(z[b : b + 1]), keys[b : b + 1], _params(samplers[b : b + 1], V),
            Penalty.zeros(1, V),
        )  # fmt: skip
        assert int(alone[0]) == int(batched[b])


# ---- the cuts and the temperature -----------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("top_p", [0.0, 0.1, 0.5, 0.85, 0.99])
def test_top_p_cutoff_matches_official(seed, top_p):
    rng = np.random.default_rng(seed)
    probs = _probs(rng.normal(size=2000).astype(np.float32) * (1 + seed)).astype(np.float32)
    sp = _params([Sampler(top_p=top_p)], probs.size)
    got = float(_cutoff(jnp.asarray(probs[None]), sp)[0])
    # identical thresholds: both are one of the probabilities; the float32 sums differ only in
    # summation order, which would matter only for a cumulative sum within ~1e-7 of top_p
    assert got == _official_top_p_cutoff(probs, top_p)


def test_top_p_one_disables_the_cut():
    probs = _probs(np.linspace(0, 3, 50)).astype(np.float32)
    sp = _params([Sampler(top_p=1.0)], 50)
    assert float(_cutoff(jnp.asarray(probs[None]), sp)[0]) == 0.0


def test_top_k_keeps_exactly_the_k_most_likely():
    rng = np.random.default_rng(2)
    z = rng.permutation(np.linspace(-1.0, 1.0, 40)).astype(np.float32)
    got = set(_draws(z, Sampler(top_k=4, temperature=5.0), 2000).tolist())
    assert got == set(np.argsort(z)[-4:].tolist())


def test_min_p_support():
    z = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.03, 0.02], np.float32))
    got = set(_draws(z, Sampler(min_p=0.2), 3000).tolist())
    assert got == {0, 1, 2, 3}  # p >= 0.2 * 0.4 = 0.08


def test_temperature_is_applied_after_the_top_p_cut():
    """Official order: cut on the untempered probabilities, then temper the survivors."""
    p = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
    z = np.log(p).astype(np.float32)
    T = 2.0
    draws = _draws(z, Sampler(top_p=0.7, temperature=T), 20000, seed=5)
    # top-p 0.7 keeps {0, 1} (0.5 + 0.3 >= 0.7) before the temperature flattens anything
    assert set(draws.tolist()) == {0, 1}
    want = p[0] ** (1 / T) / (p[0] ** (1 / T) + p[1] ** (1 / T))
    got = float(np.mean(draws == 0))
    # 5 standard errors of a binomial frequency with n = 20000 (~0.018): fails for T on logits
    # before the cut only if the law were wrong, not by chance (deterministic seed anyway)
    assert abs(got - want) < 5 * np.sqrt(want * (1 - want) / draws.size)


def test_temperature_law():
    rng = np.random.default_rng(3)
    z = rng.normal(size=6).astype(np.float32)
    T = 0.6
    draws = _draws(z, Sampler(temperature=T), 40000, seed=11)
    want = _probs(z / T)
    freq = np.bincount(draws, minlength=6) / draws.size
    # 5 binomial standard errors per bin (n = 40000)
    assert np.all(np.abs(freq - want) < 5 * np.sqrt(want * (1 - want) / draws.size))


# ---- penalties, bans, bias ------------------------------------------------------------------


def _penalised(sampler: Sampler, seen_tokens, V=8, weights=None):
    """Adjusted logits (zeros in) after the tokens were generated in order."""
    sp = _params([sampler], V)
    w = jnp.ones(V) if weights is None else jnp.asarray(weights)
    pen = Penalty.zeros(1, V)
    for t in seen_tokens:
        pen = _update(pen, jnp.asarray([t]), sp, w)
    return np.asarray(_adjust(jnp.zeros((1, V)), sp, pen)[0])


def test_presence_penalty_charges_each_seen_token_once():
    z = _penalised(Sampler(alpha_presence=0.7), [2, 2, 5])
    assert np.allclose(z, [0, 0, -0.7, 0, 0, -0.7, 0, 0])


def test_frequency_penalty_counts_and_decays():
    z = _penalised(Sampler(alpha_frequency=1.0, alpha_decay=0.5), [3, 3, 6])
    # official order: decay all counts, then add the new token: 3 -> 1, 1*0.5+1 = 1.5, 0.75
    assert np.allclose(z, [0, 0, 0, -0.75, 0, 0, -1.0, 0])


def test_zero_weight_tokens_get_presence_but_no_frequency():
    w = np.ones(8, np.float32)
    w[4] = 0.0  # e.g. " " or a digit
    z = _penalised(Sampler(alpha_presence=0.25, alpha_frequency=1.0), [4, 4, 1], weights=w)
    assert np.allclose(z, [0, -1.25, 0, 0, -0.25, 0, 0, 0])


def test_penalty_changes_the_greedy_choice():
    V = 8
    z = jnp.asarray(np.array([[0, 0, 1.0, 0.6, 0, 0, 0, 0]], np.float32))
    key = sampling.stream_keys(0, 1)
    sp = _params([Sampler.greedy(alpha_presence=0.5)], V)
    pen = Penalty.zeros(1, V)
    first = _sample(z, key, sp, pen)
    pen = _update(pen, first, sp, jnp.ones(V))
    second = _sample(z, key, sp, pen)
    assert (int(first[0]), int(second[0])) == (2, 3)


def test_ban_and_bias():
    V = 8
    z = jnp.asarray(np.array([[0, 0, 1.0, 0.6, 0, 0, 0, 0]], np.float32))
    key = sampling.stream_keys(0, 1)
    banned = _params([Sampler.greedy(token_ban=(2,))], V)
    assert int(_sample(z, key, banned, Penalty.zeros(1, V))[0]) == 3
    biased = _params([Sampler.greedy(logit_bias={7: 2.0})], V)
    assert int(_sample(z, key, biased, Penalty.zeros(1, V))[0]) == 7
    drawn = _draws(np.asarray(z[0]), Sampler(token_ban=(2, 3)), 500)
    assert not np.isin(drawn, [2, 3]).any()


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1.0),
        dict(top_p=float("nan")),
        dict(min_p=2.0),
        dict(alpha_decay=1.5),
        dict(token_ban=(99,)),
        dict(logit_bias={-1: 1.0}),
    ],
)
def test_invalid_options_are_input_errors(bad):
    with pytest.raises(InputError):
        Sampler(**bad).check(16)


@pytest.mark.oracle
def test_token_weights_match_official_pipeline():
    pytest.importorskip("rwkv")
    from rwkv.utils import PIPELINE

    from rwkv_jax.tokenizer import Tokenizer

    pipe = PIPELINE(None, "rwkv_vocab_v20230424")
    ours = sampling.token_weights(Tokenizer.world())
    official = np.array(
        [0.0 if pipe.decode([t]) in sampling.UNWEIGHTED_TEXT else 1.0 for t in range(65536)]
    )
    assert ours.sum() < 65536 - 10  # the test can see a difference: some tokens weigh 0
    assert np.array_equal(ours, official)


@pytest.mark.oracle
def test_penalised_greedy_sequence_matches_official_generate():
    """PIPELINE.generate (temperature 0: top-p 0, i.e. argmax) on a table of logits, with
    presence/frequency/decay and bans, against our sample + update_penalties loop."""
    pytest.importorskip("rwkv")
    torch = pytest.importorskip("torch")
    from rwkv.utils import PIPELINE, PIPELINE_ARGS

    from rwkv_jax.tokenizer import Tokenizer

    tok = Tokenizer.world()
    V, n = 65536, 40
    rng = np.random.default_rng(4)
    table = (rng.normal(size=(n, V)) * 0.3).astype(np.float32)
    # a handful of favourites, including space and digit tokens (weight 0), so the penalties
    # rotate among them
    fav = [tok.encode(s)[0] for s in [" ", "0", "7", "a", " the", "\n", "ok", "!"]]
    table[:, fav] += 4 + 0.05 * np.arange(len(fav))
    ban = [fav[-1]]

    class TableModel:
        def forward(self, tokens, state):
            i = 0 if state is None else state
            return torch.tensor(table[i]), i + 1

    picked: list[int] = []

    class Recording(PIPELINE):
        def sample_logits(self, logits, **kw):
            t = super().sample_logits(logits, **kw)
            picked.append(t)
            return t

    args = PIPELINE_ARGS(
        temperature=0, alpha_presence=0.4, alpha_frequency=0.3, alpha_decay=0.9, token_ban=ban
    )
    Recording(TableModel(), "rwkv_vocab_v20230424").generate("Hi", token_count=n, args=args)

    s = Sampler.greedy(alpha_presence=0.4, alpha_frequency=0.3, alpha_decay=0.9, token_ban=ban)
    sp = _params([s], V)
    w = jnp.asarray(sampling.token_weights(tok))
    pen, ours = Penalty.zeros(1, V), []
    key = sampling.stream_keys(0, 1)
    for i in range(n):
        t = _sample(jnp.asarray(table[i : i + 1]), key, sp, pen)
        pen = _update(pen, t, sp, w)
        ours.append(int(t[0]))
    assert len(set(ours)) > 3  # penalties did rotate the choice
    assert ours == picked


# ---- stop strings and streaming text --------------------------------------------------------


def test_stop_string_across_tokens_is_never_shown():
    s = TextStream([b"\nUser:"])
    pieces = [s.push(b"Hel"), s.push(b"lo\nUs"), s.push(b"er: more")]
    assert pieces == ["Hel", "lo", ""]
    assert s.stopped and s.text == "Hello" and s.tail == b"\nUser: more"


def test_utf8_character_split_over_tokens_arrives_whole():
    s = TextStream()
    euro = "€".encode()  # 3 bytes
    assert [s.push(euro[:1]), s.push(euro[1:2]), s.push(euro[2:] + b"!")] == ["", "", "€!"]
    bad = TextStream()
    bad.push(b"ok\xe2\x82")
    assert bad.close() == "\ufffd"


def test_text_stream_fuzz():
    """Any chunking: pieces concatenate to the decoded bytes before the first stop string."""
    rng = np.random.default_rng(0)
    alphabet = [b"a", b"\n", b"U", b"User:", b"\xc3", b"\xa9", "€".encode(), b"\n\n", b" "]
    stops = [b"\nUser:", b"\n\n"]
    for _ in range(300):
        chunks = [
            b"".join(alphabet[i] for i in rng.integers(0, len(alphabet), rng.integers(1, 4)))
            for _ in range(rng.integers(1, 12))
        ]
        data = b"".join(chunks)
        cuts = [i for st in stops if (i := data.find(st)) >= 0]
        want = data[: min(cuts)] if cuts else data
        s = TextStream(stops)
        got = "".join(s.push(c) for c in chunks) + s.close()
        assert got == s.text == want.decode("utf-8", errors="replace")
        assert s.stopped == bool(cuts)


# ---- batched generation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(synth_model) -> rwkv_jax.Model:
    return rwkv_jax.load(synth_model("tiny", "F32"))


PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog. " * 3, "User: 1+1?\n\nAssistant:"]


def test_batched_streams_equal_running_alone(model):
    """Ragged prompts, different samplers, one stream stopped early: each stream equals itself
    run alone with its key — tokens, text, finish, position, final state and logits."""
    gen = Generator(model)
    samplers = [
        Sampler(temperature=0.8, top_p=0.9),
        Sampler.greedy(alpha_presence=0.5, alpha_frequency=0.3),
        Sampler(top_k=20, min_p=0.01, alpha_presence=0.2),
    ]
    keys = sampling.stream_keys(42, 3)
    probe = gen.generate(PROMPTS[2:], 6, samplers[2], keys=keys[2:])
    stop = probe.tokens[0][2]  # stream 2 stops at its third token, the others run on
    kw = dict(stop_tokens=[stop], stop_strings=["\n\nUser"])
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    batch = gen.generate(
        PROMPTS, 10, samplers, keys=keys, on_text=lambda b, t: pieces[b].append(t), **kw
    )
    assert batch.finish_reasons[2] == "stop" and len(batch.tokens[2]) == 2
    for b in range(3):
        alone = gen.generate([PROMPTS[b]], 10, samplers[b], keys=keys[b : b + 1], **kw)
        assert batch.tokens[b] == alone.tokens[0]
        assert batch.texts[b] == alone.texts[0] == "".join(pieces[b])
        assert batch.finish_reasons[b] == alone.finish_reasons[0]
        assert batch.positions[b] == alone.positions[0]
        # same tokens through programs of different batch size: float32 rounding only
        for name in ("att_shift", "ffn_shift", "wkv"):
            np.testing.assert_allclose(
                getattr(batch.state, name)[:, b], getattr(alone.state, name)[:, 0], atol=2e-5
            )
        np.testing.assert_allclose(batch.logits[b], alone.logits[0], atol=2e-4)


def _assert_same_generation(got, want):
    """Two generations of the same streams: equal tokens, finish reasons, positions and texts;
    states, penalties and logits equal up to float32 reassociation (the same per-token work
    inside a loop or not)."""
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
    assert got.positions == want.positions and got.texts == want.texts
    for a, b in zip(
        jax.tree.leaves((got.state, got.penalty)),
        jax.tree.leaves((want.state, want.penalty)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    np.testing.assert_allclose(got.logits, want.logits, atol=2e-4)


@pytest.mark.parametrize("block", [4, 16])
def test_device_blocks_equal_token_by_token(model, block):
    """Tokens sampled in on-device blocks (a loop of sampling steps) equal one call per token:
    tokens, finish reasons, positions, penalties, final state and logits — with a stop token
    ending one stream mid-block, ragged limits, penalties and random sampling."""
    gen = Generator(model)
    samplers = [Sampler(temperature=0.8, top_p=0.9), Sampler.greedy(alpha_presence=0.5)]
    keys = sampling.stream_keys(9, 2)
    probe = gen.generate(PROMPTS[:1], 8, samplers[0], keys=keys[:1], block_size=1)
    stop = probe.tokens[0][4]  # stream 0 stops at its fifth token (inside the first block)
    kw = dict(stop_tokens=[stop], keys=keys)
    one = gen.generate(PROMPTS[:2], 11, samplers, block_size=1, **kw)
    blk = gen.generate(PROMPTS[:2], 11, samplers, block_size=block, **kw)
    assert one.finish_reasons[0] == "stop" and one.finish_reasons[1] in ("length", "stop")
    _assert_same_generation(blk, one)
    with pytest.raises(InputError):
        gen.generate(PROMPTS[:1], 4, block_size=0)


def _loop_args(model, stop: int = -1, remaining: int = 8):
    """sample_steps' arguments after the tokens (one greedy stream, no penalties)."""
    V = model.config.vocab_size
    return (
        Penalty.zeros(1, V),
        sampling.stream_keys(0, 1),
        jnp.zeros((1,), jnp.int32),
        jnp.ones((1,), bool),
        jnp.full((1,), remaining, jnp.int32),
        jnp.asarray([stop], jnp.int32),
        SamplerParams.from_samplers([Sampler.greedy()], V),
        jnp.zeros((V,), jnp.float32),
    )


def test_block_loop_ends_when_every_stream_has_stopped_and_takes_a_count(model):
    """With a traced count the on-device loop runs no step after its last stream stopped (its
    token buffer keeps zeros there, where a full block samples tokens) and a count of 3 runs the
    full block's first 3 steps; without one (GPUs) a fixed-length scan runs all n steps to the
    same result."""
    logits, state = model.forward(model.tokenizer.encode(PROMPTS[0]))
    kw = dict(n=8, cfg=model.config, dtype=model.dtype)
    full = sample_steps_kept(model.params, logits, state, *_loop_args(model), **kw)
    toks, fed = np.asarray(full[0])[:, 0], np.asarray(full[1])[:, 0]
    assert fed.all()
    first = toks.tolist().index(toks[2])  # the stop token's first appearance
    assert (toks[first + 1 :] != 0).any()  # a full block samples there
    stop_args = _loop_args(model, int(toks[2]))
    got = sample_steps_kept(model.params, logits, state, *stop_args, jnp.int32(8), **kw)
    g_toks, g_fed = np.asarray(got[0])[:, 0], np.asarray(got[1])[:, 0]
    assert g_toks[: first + 1].tolist() == toks[: first + 1].tolist()
    assert g_fed[: first + 1].all() and not g_fed[first + 1 :].any()
    assert (g_toks[first + 1 :] == 0).all()  # never sampled: the loop had ended
    assert int(got[5][0]) == first + 1  # positions: the stop token was fed
    part = sample_steps_kept(model.params, logits, state, *_loop_args(model), jnp.int32(3), **kw)
    assert np.asarray(part[1])[:, 0].tolist() == [True] * 3 + [False] * 5
    assert np.asarray(part[0])[:3, 0].tolist() == toks[:3].tolist() and int(part[5][0]) == 3
    # without a count: the fixed-length scan (GPUs) runs every step, the stopped row frozen
    fixed = sample_steps_kept(model.params, logits, state, *stop_args, **kw)
    assert np.asarray(fixed[1])[:, 0].tolist() == g_fed.tolist()
    assert (np.asarray(fixed[0])[first + 1 :, 0] != 0).any() and int(fixed[5][0]) == first + 1
    for a, b in zip(jax.tree.leaves(fixed[2:]), jax.tree.leaves(got[2:]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_one_decode_program_per_block_size(model):
    """On the CPU generation of any length runs one compiled loop per block size (its step count
    is a traced value); another block size is another program. GPUs keep fixed-length scans."""
    assert session.traced_count_loop("cpu") and not session.traced_count_loop("gpu")
    assert session.traced_count_loop()  # these tests run on the CPU
    gen = Generator(model)
    steps = sample_steps if backends.current_profile().donate else sample_steps_kept
    gen.generate([PROMPTS[0]], 2, block_size=8)
    before = steps._cache_size()
    for n in (1, 3, 5, 8, 13, 20):
        assert len(gen.generate([PROMPTS[0]], n, block_size=8).tokens[0]) == n
    assert steps._cache_size() == before
    gen.generate([PROMPTS[0]], 3, block_size=4)
    assert steps._cache_size() == before + 1


def _spy_counts(monkeypatch) -> list:
    """Record the steps of every call of the loop programs: its traced count, or its fixed
    length n where it has none."""
    seen = []

    def wrap(real):
        def spy(*args, **kw):
            seen.append(kw["n"] if kw.get("count") is None else int(kw["count"]))
            return real(*args, **kw)

        return spy

    for name in ("sample_steps", "sample_steps_kept"):
        monkeypatch.setattr(session, name, wrap(getattr(session, name)))
    return seen


def _stop_string_at(model, tokens: list[int], lo: int, hi: int) -> tuple[str, int]:
    """A stop string that first matches at a token index in [lo, hi) of `tokens`: that token's
    own text (valid UTF-8, not seen in the bytes before it)."""
    pieces = [model.tokenizer.decode_bytes([t]) for t in tokens]
    for k in range(lo, hi):
        try:
            text = pieces[k].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text and pieces[k] not in b"".join(pieces[:k]) + pieces[k][:-1]:
            return text, k
    pytest.skip("no token of the probe spells a usable stop string")


def test_stop_strings_in_blocks_equal_token_by_token(model, monkeypatch):
    """With stop strings, blocks of tokens (replayed up to a match they ran past) give what one
    token per call gives: tokens, texts, finish reasons, positions, streamed text, final state,
    penalties and logits — one stream cut by a stop string mid-block, one running on."""
    monkeypatch.setattr(session, "STREAM_SECONDS", 1e9)  # whole blocks after the first call
    gen = Generator(model)
    samplers = [Sampler(temperature=0.8, top_p=0.9), Sampler.greedy(alpha_presence=0.5)]
    keys = sampling.stream_keys(5, 2)
    probe = gen.generate(PROMPTS[:1], 24, samplers[0], keys=keys[:1], block_size=1)
    stop, k = _stop_string_at(model, probe.tokens[0], 4, 14)  # inside the second call's block
    kw = dict(stop_strings=[stop], keys=keys)
    one = gen.generate(PROMPTS[:2], 20, samplers, block_size=1, **kw)
    seen = _spy_counts(monkeypatch)
    streamed: dict[int, list[str]] = {0: [], 1: []}
    blk = gen.generate(
        PROMPTS[:2], 20, samplers, block_size=16, on_text=lambda b, t: streamed[b].append(t), **kw
    )
    assert one.finish_reasons[0] == "stop_string" and len(one.tokens[0]) == k + 1
    assert seen[:3] == [1, 16, k]  # one token, a block past the match, its replay to it
    _assert_same_generation(blk, one)
    assert ["".join(streamed[b]) for b in (0, 1)] == blk.texts


@pytest.mark.parametrize(
    "how, traced, seconds, sizes",
    [
        ("stop", True, 0.0, [1] * 9),
        ("stop", True, 1e9, [1, 8]),
        ("text", True, 0.0, [1] * 9),
        ("text", True, 1e9, [1, 8]),
        ("text", False, 0.0, [8, 1]),  # fixed-length scans (GPUs): a first whole block
        ("text", False, 1e9, [8, 1]),
        ("none", True, 0.0, [9]),  # nothing streamed or checked: whole blocks
    ],
)
def test_streamed_blocks_follow_the_time_per_token(model, monkeypatch, how, traced, seconds, sizes):
    """With stop strings or on_text, a call samples as many tokens as the last call's time per
    token fits in STREAM_SECONDS (at least one, at most the block; powers of two for the
    fixed-length scans): text arrives about that often."""
    monkeypatch.setattr(session, "STREAM_SECONDS", seconds)
    monkeypatch.setattr(session, "traced_count_loop", lambda: traced)
    seen = _spy_counts(monkeypatch)
    kw = {"stop": dict(stop_strings=["\x00never"]), "text": dict(on_text=lambda b, t: None)}
    res = Generator(model).generate([PROMPTS[0]], 9, block_size=16, **kw.get(how, {}))
    assert res.finish_reasons == ["length"] and len(res.tokens[0]) == 9
    assert seen == sizes


def test_generate_greedy_matches_model_generate(model):
    want = list(model.generate_tokens(PROMPTS[0], 8))
    got = Generator(model).generate([PROMPTS[0]], 8)
    assert got.tokens == [want] and got.finish_reasons == ["length"]
    assert got.positions == [len(model.tokenizer.encode(PROMPTS[0])) + 8]


def test_generation_level_penalties_ban_and_bias(model):
    gen = Generator(model)
    base = gen.generate([PROMPTS[1]], 12).tokens[0]
    ban = gen.generate([PROMPTS[1]], 12, Sampler.greedy(token_ban=(base[0],))).tokens[0]
    assert ban[0] != base[0] and base[0] not in ban
    forced = gen.generate([PROMPTS[1]], 5, Sampler.greedy(logit_bias={1234: 1e4})).tokens[0]
    assert forced == [1234] * 5
    unique = gen.generate(
        [PROMPTS[1]], 12, Sampler.greedy(logit_bias={1234: 50.0}, alpha_presence=1e4)
    ).tokens[0]
    assert unique[0] == 1234 and len(set(unique)) == 12  # presence forbids every repeat


def test_seeded_generation_is_reproducible(model):
    gen = Generator(model)
    s = Sampler(temperature=1.0)
    a = gen.generate(PROMPTS, 8, s, seed=1).tokens  # batch of 3: the program compiled above
    assert a == gen.generate(PROMPTS, 8, s, seed=1).tokens
    assert a != gen.generate(PROMPTS, 8, s, seed=2).tokens


def test_each_position_draws_with_its_own_key(model):
    """At a huge temperature the Gumbel noise decides: a key reused across positions would
    pick the same token every step."""
    toks = Generator(model).generate([PROMPTS[0]], 8, Sampler(temperature=1e4), seed=4).tokens
    assert len(set(toks[0])) == 8


def test_bad_generation_arguments(model):
    gen = Generator(model)
    with pytest.raises(InputError):
        gen.generate([""], 4)
    with pytest.raises(InputError):
        gen.generate(["a"], 4, stop_strings=[""])
    with pytest.raises(InputError):
        gen.generate(["a"], 4, stop_tokens=[10**6])
    with pytest.raises(InputError):
        gen.generate(["a", "b"], 4, [Sampler()])
