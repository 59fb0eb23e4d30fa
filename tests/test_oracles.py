"""The two reference implementations agree with each other on small random RWKV-7 GGUF files."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.oracle import numpy_ref
from tests.oracle.tiny_gguf import HEAD_SIZE, make_tiny_rwkv7_pth, write_tiny_rwkv7_gguf

SEED = 0
N_LAYER, N_EMBD, VOCAB = 2, 128, 65536
TOKENS = [int(t) for t in np.random.default_rng(1234).integers(0, VOCAB, size=64)]

# Tolerance for float32 (official "cpu fp32") against float64 (numpy) or against another fp32
# evaluation order: logits are O(1) sums of O(1) terms over C=128 / F=512 inputs, 2 layers, 64
# recurrent steps; measured max|dlogit|/std ~ 3.5e-6 (about 30 fp32 ulps of 1). 5e-5 leaves a
# >10x margin while any real math slip measured on this model (GroupNorm eps 1e-5 instead of
# 64e-5: 3.6e-2; lerp rows r,w swapped: 1.7; r_k transposed: 1.2) fails it by orders of magnitude.
REL_TOL = 5e-5


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / std(ref), the metric of BlinkDL's rwkv_v7_numpy.py."""
    return float(np.abs(got - ref).max() / ref.std())


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny all-F32 RWKV-7 GGUF."""
    path = tmp_path_factory.mktemp("oracle") / "tiny-f32.gguf"
    return write_tiny_rwkv7_gguf(path, SEED, N_LAYER, N_EMBD, VOCAB)


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model as an F16 conversion then quantized to Q8_0 (mixed F32/F16/Q8_0 tensors)."""
    path = tmp_path_factory.mktemp("oracle") / "tiny-q8_0.gguf"
    return write_tiny_rwkv7_gguf(path, SEED, N_LAYER, N_EMBD, VOCAB, outtype="f16", quant="q8_0")


def test_tiny_gguf_has_llama_cpp_rwkv7_layout(q8_file: Path) -> None:
    """Tensor names match gguf-py's RWKV7 table; types and ne follow spec §2.2 / §2.5."""
    reader = gguf.GGUFReader(q8_file)
    tensors = {t.name: t for t in reader.tensors}
    expected = set()
    for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.RWKV7]:
        stem = gguf.TENSOR_NAMES[t]
        for bid in range(N_LAYER) if "{bid}" in stem else [None]:
            name = stem.format(bid=bid) if bid is not None else stem
            norm = name.endswith(("_norm", "_norm_2", "time_mix_ln"))
            expected |= {name + ".weight", name + ".bias"} if norm else {name + ".weight"}
    assert set(tensors) == expected

    C = N_EMBD
    Q8, F16, F32 = (gguf.GGMLQuantizationType[n] for n in ("Q8_0", "F16", "F32"))
    spec = {
        "token_embd.weight": ([C, VOCAB], Q8),
        "output.weight": ([C, VOCAB], Q8),
        "blk.1.time_mix_lerp_fused.weight": ([C, 1, 1, 6], F32),
        "blk.1.time_mix_w1.weight": ([C, 32], F32),
        "blk.1.time_mix_w2.weight": ([32, C], F32),
        "blk.1.time_mix_a1.weight": ([C, 24], F16),
        "blk.1.time_mix_v2.weight": ([16, C], F16),
        "blk.0.time_mix_v1.weight": ([C, 24], F16),  # layer 0: copy of a1, iclr rank
        "blk.1.time_mix_g1.weight": ([C, 48], F16),
        "blk.1.time_mix_r_k.weight": ([C], F32),
        "blk.1.time_mix_key.weight": ([C, C], Q8),
        "blk.1.channel_mix_lerp_k.weight": ([C], F32),
        "blk.1.channel_mix_key.weight": ([C, 4 * C], Q8),
        "blk.1.channel_mix_value.weight": ([4 * C, C], Q8),
    }
    for name, (ne, qtype) in spec.items():
        assert tensors[name].shape.tolist() == ne, name
        assert tensors[name].tensor_type == qtype, name
    md = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.tokens"}
    assert md["general.architecture"] == "rwkv7"
    assert md["rwkv7.wkv.head_size"] == HEAD_SIZE
    assert md["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert md["tokenizer.ggml.model"] == "rwkv"
    assert len(md["tokenizer.ggml.token_type"]) == VOCAB


def test_numpy_ref_state_continues(f32_file: Path) -> None:
    """Splitting the prompt and carrying the float64 state gives the same logits."""
    full, s_full = numpy_ref.run_f64(f32_file, TOKENS)
    head, s_head = numpy_ref.run_f64(f32_file, TOKENS[:23])
    tail, s_tail = numpy_ref.run_f64(f32_file, TOKENS[23:], state=s_head)
    # identical float64 operations in the same order: equal up to rounding of a few ulps
    np.testing.assert_allclose(np.concatenate([head, tail]), full, rtol=0, atol=1e-12)
    for a, b in zip(s_tail, s_full, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.oracle
def test_pth_state_dict_inverts_converter(f32_file: Path) -> None:
    """GGUF -> .pth recovers BlinkDL's keys, shapes and (F32: exact) values."""
    pytest.importorskip("rwkv")
    from tests.oracle.official import gguf_to_pth_state_dict

    got = gguf_to_pth_state_dict(f32_file)
    want = make_tiny_rwkv7_pth(SEED, N_LAYER, N_EMBD, VOCAB)
    assert set(got) == set(want)  # in particular no blocks.0.att.v0/v1/v2
    for key, value in want.items():
        assert tuple(got[key].shape) == value.shape, key
        np.testing.assert_array_equal(got[key].numpy(), value, err_msg=key)


@pytest.mark.oracle
def test_official_seq_matches_rnn(f32_file: Path) -> None:
    """The package's layer-major prefill equals its token-by-token mode (logits and state)."""
    pytest.importorskip("rwkv")
    from tests.oracle.official import official_run

    seq, s_seq = official_run(f32_file, TOKENS, mode="seq")
    rnn, s_rnn = official_run(f32_file, TOKENS, mode="rnn")
    assert seq.shape == (len(TOKENS), VOCAB) and seq.dtype == np.float32
    # both fp32, same math, different batching of the matmuls: see REL_TOL
    assert rel_err(rnn, seq) < REL_TOL
    for a, b in zip(s_rnn, s_seq, strict=True):
        assert np.abs(a - b).max() < REL_TOL * np.abs(b).max()


@pytest.mark.oracle
@pytest.mark.parametrize("which", ["f32_file", "q8_file"])
def test_numpy_ref_matches_official(which: str, request: pytest.FixtureRequest) -> None:
    """float64 numpy and the official fp32 package agree on logits, argmax and final state."""
    pytest.importorskip("rwkv")
    from tests.oracle.official import official_run

    path = request.getfixturevalue(which)
    ref, s_ref = official_run(path, TOKENS, mode="seq")
    got, s_got = numpy_ref.run_f64(path, TOKENS)
    err = rel_err(got, ref)
    assert err < REL_TOL
    # argmax must match exactly: every position's top-2 gap is far above the difference, so a
    # mismatch would be a real disagreement, not a near-tie
    top2 = np.sort(got, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 10 * np.abs(got - ref).max()
    np.testing.assert_array_equal(got.argmax(axis=1), ref.argmax(axis=1))
    for a, b in zip(s_got, s_ref, strict=True):
        assert np.abs(a - b).max() < REL_TOL * np.abs(b).max()


@pytest.mark.oracle
def test_official_state_continues(f32_file: Path) -> None:
    """The official oracle resumes from a state it returned (prefill(a+b) == prefill(b | a))."""
    pytest.importorskip("rwkv")
    from tests.oracle.official import official_run

    full, _ = official_run(f32_file, TOKENS, mode="seq")
    head, state = official_run(f32_file, TOKENS[:23], mode="seq")
    tail, _ = official_run(f32_file, TOKENS[23:], mode="seq", state=state)
    assert rel_err(np.concatenate([head, tail]), full) < REL_TOL


@pytest.mark.slow
@pytest.mark.oracle
def test_oracles_agree_on_real_file() -> None:
    """Same agreement on a real model file named by $RWKV_JAX_ORACLE_GGUF (e.g. the 0.1B Q4_K_M)."""
    pytest.importorskip("rwkv")
    from tests.oracle.official import official_run

    path = os.environ.get("RWKV_JAX_ORACLE_GGUF")
    if not path:
        pytest.skip("set RWKV_JAX_ORACLE_GGUF to a real RWKV-7 GGUF to run this check")
    tokens = TOKENS[:16]
    ref, _ = official_run(path, tokens, mode="seq")
    got, _ = numpy_ref.run_f64(path, tokens)
    # Real models (12+ layers, C >= 768, large relu^2 activations) accumulate more fp32 error
    # than the tiny ones (~4e-6); not measured offline, so only a bound that still pins top-1.
    assert rel_err(got, ref) < 1e-3
    np.testing.assert_array_equal(got.argmax(axis=1), ref.argmax(axis=1))
