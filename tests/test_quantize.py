"""Tests for rwkv_jax.quantize: block bytes, llama.cpp type rules, and GGUF re-quantization."""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest

import rwkv_jax.quantize as q
from rwkv_jax.errors import GGUFError, InputError, UnsupportedTypeError

T = gguf.GGMLQuantizationType
EPS16 = 2.0**-11  # fp16 relative rounding bound (10 explicit mantissa bits, round to nearest)


def _deq(b: np.ndarray, t: T) -> np.ndarray:
    """Dequantize bytes with gguf-py's reference decoder, as float64."""
    return gguf.quants.dequantize(b, t).astype(np.float64)


def _golden_input() -> np.ndarray:
    """Same as experiments/quant_error.py golden_input: integer-derived, platform independent."""
    i = np.arange(16 * 512, dtype=np.int64)
    u = ((i * 1103515245 + 12345) % (1 << 16)).astype(np.float64) / (1 << 16) - 0.5
    x = u * u * u * 0.5 + u * 0.01
    x[:256] = 0.0
    x[1024:1040] = 0.0
    return x.astype(np.float32).reshape(16, 512)


# sha256 of llama.cpp's quantize_row_{q4,q5,q6}_K_ref bytes on _golden_input(): ggml-quants.c
# vendored in llama-cpp-python 0.3.36, gcc -O2 (no FMA), via
# `python -m experiments.quant_error --llama-src DIR --golden`.
LLAMA_CPP_SHA256 = {
    T.Q4_K: "18586e265e61f898ada2a1c92989832856ae695ac1b42e8751858703521aa99f",
    T.Q5_K: "40ab3a4b482734656b8788fb4d8936bbc8be30a43c502f8cf5a421d0540d0b06",
    T.Q6_K: "49d3c527dbdcaa8b9cbe4c4198f220bf8a125d5b78ef292f0b1566f9aaf236a2",
}


@pytest.mark.parametrize("t", list(LLAMA_CPP_SHA256))
def test_k_quants_match_llama_cpp_bytes(t: T) -> None:
    """Our K-quant bytes are identical to llama.cpp's reference quantizer on a fixed input."""
    out = q.quantize_array(_golden_input(), t)
    assert hashlib.sha256(out.tobytes()).hexdigest() == LLAMA_CPP_SHA256[t]


def _normal(rows: int = 64, n: int = 512, seed: int = 0) -> np.ndarray:
    """normal(0, 1) float32 test matrix."""
    return np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)


def test_plain_types() -> None:
    """F32 exact; F16/BF16 within half an ulp of their mantissa (round to nearest)."""
    x = _normal()
    assert np.array_equal(q.quantize_array(x, T.F32).view(np.float32), x)
    ax = np.abs(x.astype(np.float64))
    err16 = np.abs(_deq(q.quantize_array(x, T.F16), T.F16) - x)
    assert np.all(err16 <= np.maximum(ax * EPS16, 2.0**-25))  # 2^-25: half the f16 subnormal step
    errbf = np.abs(_deq(q.quantize_array(x, T.BF16), T.BF16) - x)
    assert np.all(errbf <= ax * 2.0**-8)  # 7 explicit mantissa bits
    # BF16 ties go to even, as gguf/ggml: 1 + 2^-8 is halfway between 1 and 1 + 2^-7
    tie = np.array([[1 + 2.0**-8, 1 + 3 * 2.0**-8]], np.float32)
    assert _deq(q.quantize_array(tie, T.BF16), T.BF16).tolist() == [[1.0, 1 + 2.0**-6]]


def _legacy_bound(t: T, xb: np.ndarray) -> np.ndarray:
    """Worst-case |error| per 32-block of the reference legacy quantizers (fp16 scales)."""
    amax = np.abs(xb).max(axis=1)
    if t == T.Q8_0:  # d = amax/127, |x - q·d| <= d/2, |q|·|d - fp16(d)| <= 127·d·EPS16
        d = amax / 127
        return d * (0.5 + 127 * EPS16)
    if t in (T.Q4_0, T.Q5_0):  # d = amax/2^(b-1); the side opposite max may clip by one step
        d = amax / (8 if t == T.Q4_0 else 16)
        return d * (1 + 16 * EPS16)
    # Q5_1: d = range/31, m = min in fp16; rounding d/2 + 31·d·EPS16 + |m|·EPS16
    lo, hi = xb.min(axis=1), xb.max(axis=1)
    d = (hi - lo) / 31
    return d * (0.5 + 31 * EPS16) + np.abs(lo) * EPS16


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1])
def test_legacy_error_bound(t: T) -> None:
    """Every element of Q8_0/Q4_0/Q5_0/Q5_1 is within its block's worst-case error."""
    x = _normal()
    err = np.abs(_deq(q.quantize_array(x, t), t) - x).reshape(-1, 32)
    bound = _legacy_bound(t, x.reshape(-1, 32).astype(np.float64))
    assert np.all(err <= bound[:, None] * (1 + 1e-6))  # 1e-6: float32 products in the encoder


def _uniform_noise_rmse(x: np.ndarray, t: T) -> float:
    """RMSE of ideal rounding with the min/max step of each sub-block: sqrt(mean(step²)/12).

    Q4_K/Q5_K: step = (max - min(min, 0))/nmax per 32; Q6_K: step = max|x|/32 per 16. This is
    the candidate the reference's search starts from, before 6-bit scale rounding.
    """
    if t == T.Q6_K:
        step = np.abs(x.reshape(-1, 16)).max(axis=1) / 32
    else:
        xs = x.reshape(-1, 32).astype(np.float64)
        step = (xs.max(axis=1) - np.minimum(xs.min(axis=1), 0)) / (15 if t == T.Q4_K else 31)
    return float(np.sqrt(np.mean(step**2) / 12))


@pytest.mark.parametrize("t", [T.Q4_K, T.Q5_K, T.Q6_K])
@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_k_quant_error_vs_theory_and_fast_path(t: T, dist: str) -> None:
    """Search RMSE <= fast-path RMSE, and both near the uniform-noise RMSE of min/max steps."""
    rng = np.random.default_rng(1)
    shape = (64, 1024)
    x = rng.standard_normal(shape) if dist == "normal" else rng.standard_t(3, shape)
    x = (x * 0.02).astype(np.float32)
    rmse_search = np.sqrt(np.mean((_deq(q.quantize_array(x, t), t) - x) ** 2))
    rmse_fast = np.sqrt(np.mean((_deq(q.quantize_array(x, t, search=False), t) - x) ** 2))
    theory = _uniform_noise_rmse(x, t)
    # the search starts from the min/max candidate and keeps only improvements
    assert rmse_search <= rmse_fast
    assert rmse_search <= theory
    # the fast path is that candidate plus 6-bit scale rounding (<= 1/126 of the largest step)
    # and fp16 d: a few percent above ideal rounding at most
    assert rmse_fast <= 1.05 * theory


@pytest.mark.parametrize("t", list(q._QUANTIZERS))
def test_zero_input(t: T) -> None:
    """Zeros dequantize to exact zeros; K-quants and Q8_0 emit all-zero blocks like the ref."""
    z = np.zeros((3, 512), np.float32)
    for search in (True, False):
        b = q.quantize_array(z, t, search=search)
        assert np.array_equal(_deq(b, t), z)
        if t in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F32, T.F16, T.BF16):
            assert not b.any()


def test_q8_0_representable_roundtrip() -> None:
    """Values d·q with fp16 d and a ±127 in every block survive Q8_0 exactly."""
    rng = np.random.default_rng(2)
    d = rng.uniform(1e-3, 1.0, (40, 1)).astype(np.float16).astype(np.float32)
    qv = rng.integers(-127, 128, (40, 32))
    qv[:, 5] = 127 * rng.choice([-1, 1], 40)  # amax/127 == d exactly
    x = (d * qv).astype(np.float32).reshape(4, 320)
    assert np.array_equal(_deq(q.quantize_array(x, T.Q8_0), T.Q8_0), x)


def test_chunking_and_threads_are_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small chunks on a thread pool give the bytes of one big call."""
    x = _normal(48, 768, seed=3)
    for t in (T.Q4_K, T.Q6_K, T.Q8_0):
        whole = q.quantize_array(x, t)
        monkeypatch.setattr(q, "CHUNK_ELEMS", 1000)  # ~1 row per task
        assert np.array_equal(q.quantize_array(x, t), whole)
        monkeypatch.undo()


def test_quantize_array_bad_input() -> None:
    """Shape, type and NaN problems raise rwkv_jax errors naming the problem."""
    with pytest.raises(InputError, match="2-D"):
        q.quantize_array(np.zeros(256, np.float32), T.Q4_K)
    with pytest.raises(InputError, match="multiple"):
        q.quantize_array(np.zeros((2, 100), np.float32), T.Q8_0)
    with pytest.raises(UnsupportedTypeError, match="IQ2_XXS"):
        q.quantize_array(np.zeros((2, 256), np.float32), T.IQ2_XXS)
    with pytest.raises(UnsupportedTypeError, match="unknown"):
        q.quantize_array(np.zeros((2, 256), np.float32), 1234)
    bad = np.zeros((2, 256), np.float32)
    bad[1, 7] = np.nan
    for t in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q5_0):
        with pytest.raises(InputError, match="NaN"):
            q.quantize_array(bad, t)


# ----------------------------------------------------------------------------------------------
# tensor_type: llama.cpp rules, table-driven
# ----------------------------------------------------------------------------------------------

C, V = 2560, 65536
TYPE_CASES = [
    # (ftype, name, ne, source, expected)
    ("Q4_K_M", "token_embd.weight", (C, V), T.F16, T.Q4_K),
    ("Q4_K_M", "output.weight", (C, V), T.F16, T.Q6_K),
    ("Q4_K_M", "blk.3.time_mix_key.weight", (C, C), T.F16, T.Q4_K),
    ("Q4_K_M", "blk.3.channel_mix_value.weight", (4 * C, C), T.BF16, T.Q4_K),
    ("Q4_K_M", "blk.3.time_mix_a1.weight", (C, 64), T.F16, T.F16),  # RWKV exclusion list
    ("Q4_K_M", "blk.3.time_mix_v2.weight", (32, C), T.BF16, T.BF16),
    ("Q4_K_M", "blk.3.time_mix_w1.weight", (C, 64), T.F32, T.F32),
    ("Q4_K_M", "blk.3.time_mix_lerp_fused.weight", (C, 1, 1, 6), T.F32, T.F32),
    ("Q4_K_M", "blk.3.attn_norm.weight", (C,), T.F32, T.F32),  # < 2 dims
    ("Q4_K_M", "blk.3.channel_mix_lerp_k.weight", (C, 1, 1), T.F32, T.F32),  # ggml_n_dims 1
    ("Q4_K_M", "blk.3.attn_norm.weight", (C, 4), T.F32, T.F32),  # *_norm.weight
    ("Q4_K_M", "blk.3.attn_norm_2.weight", (C, 256), T.F32, T.Q4_K),  # (substring test, as C)
    ("Q4_K_M", "blk.3.something.bias", (C, 4), T.F32, T.F32),  # not "...weight"
    ("Q4_K_M", "blk.3.time_mix_key.weight", (96, 96), T.F16, T.Q5_0),  # fallbacks
    ("Q4_K_M", "blk.3.time_mix_key.weight", (80, 80), T.F16, T.F16),
    ("Q4_K_M", "output.weight", (96, 100), T.F16, T.Q8_0),  # ne0 % 256: output -> Q8_0
    ("Q4_K_M", "output.weight", (80, 100), T.F16, T.F16),
    ("Q5_K_M", "blk.0.time_mix_output.weight", (C, C), T.F16, T.Q5_K),
    ("Q5_K_M", "output.weight", (C, V), T.F16, T.Q6_K),
    ("Q5_K_M", "blk.0.time_mix_output.weight", (96, 96), T.F16, T.Q5_1),
    ("Q6_K", "blk.0.time_mix_value.weight", (C, C), T.F16, T.Q6_K),
    ("Q6_K", "output.weight", (C, V), T.F16, T.Q6_K),
    ("Q6_K", "blk.0.time_mix_value.weight", (96, 96), T.F16, T.Q8_0),
    ("Q8_0", "output.weight", (C, V), T.F16, T.Q8_0),
    ("Q8_0", "token_embd.weight", (C, V), T.F16, T.Q8_0),
    ("Q8_0", "blk.0.time_mix_key.weight", (80, 80), T.F16, T.F16),
    ("Q4_0", "blk.0.time_mix_key.weight", (C, C), T.F16, T.Q4_0),
    ("Q4_0", "output.weight", (C, V), T.F16, T.Q6_K),  # output always gets more bits
    ("Q4_0", "output.weight", (96, 100), T.F16, T.Q8_0),  # Q6_K -> fallback Q8_0
    # F32/F16/BF16 presets: the converter's rules
    ("F16", "blk.0.time_mix_key.weight", (C, C), T.Q8_0, T.F16),
    ("F16", "blk.0.time_mix_a1.weight", (C, 64), T.F32, T.F16),
    ("F16", "blk.0.time_mix_w1.weight", (C, 64), T.F16, T.F32),
    ("F16", "blk.0.time_mix_w2.weight", (64, C), T.F16, T.F32),
    ("F16", "blk.0.time_mix_lerp_fused.weight", (C, 1, 1, 6), T.F16, T.F32),
    ("F16", "blk.0.attn_norm.weight", (C,), T.F16, T.F32),
    ("F16", "blk.0.time_mix_k_k.weight", (C,), T.F16, T.F32),
    ("F16", "blk.0.attn_norm.bias", (C,), T.F16, T.F32),
    ("F16", "output.weight", (C, V), T.Q6_K, T.F16),
    ("BF16", "token_embd.weight", (C, V), T.F16, T.BF16),
    ("BF16", "blk.0.time_mix_w2.weight", (64, C), T.BF16, T.F32),
    ("F32", "output.weight", (C, V), T.F16, T.F32),
]


@pytest.mark.parametrize(("ftype", "name", "ne", "src", "want"), TYPE_CASES)
def test_tensor_type(ftype: str, name: str, ne: tuple[int, ...], src: T, want: T) -> None:
    """tensor_type reproduces llama-quantize / the converter for RWKV-7 tensor names."""
    assert T(q.tensor_type(name, ne, ftype, int(src))) == want


def test_ftypes_and_unknown_ftype() -> None:
    """FTYPES ids are llama.h's; unknown presets are rejected with the valid list."""
    assert q.FTYPES == {
        "F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q5_K_M": 17,
        "Q6_K": 18,
    }  # fmt: skip
    with pytest.raises(InputError, match="Q4_K_M"):
        q.tensor_type("output.weight", (C, V), "Q3_K_S", int(T.F16))


# ----------------------------------------------------------------------------------------------
# quantize_file
# ----------------------------------------------------------------------------------------------

TOKENS = ["<s>", "\\xe4\\xb8", "hello", "caf\u00e9", "[PAD65535]"]


def _write_src(path, arch: str = "rwkv7") -> dict[str, np.ndarray]:
    """A small RWKV-7-named GGUF (F16 big weights, F32 small ones) with typed metadata."""
    rng = np.random.default_rng(4)
    w = gguf.GGUFWriter(path, arch)
    w.add_uint32("rwkv7.embedding_length", 256)
    w.add_float32("rwkv7.attention.layer_norm_epsilon", 1e-5)
    w.add_string("general.name", "tiny t\u00e9st")
    w.add_bool("rwkv7.some_flag", True)
    w.add_uint32("general.file_type", 1)
    w.add_array("tokenizer.ggml.tokens", TOKENS)
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1, 5])
    w.add_array("rwkv7.some_floats", [0.5, -1.25])
    f16 = lambda *s: (rng.standard_normal(s) * 0.05).astype(np.float16)  # noqa: E731
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    tensors = {  # numpy shape = reversed ggml ne
        "token_embd.weight": f16(64, 256),
        "blk.0.attn_norm.weight": f32(256),
        "blk.0.time_mix_lerp_fused.weight": f32(6, 1, 1, 256),
        "blk.0.time_mix_w1.weight": f32(32, 256),
        "blk.0.time_mix_a1.weight": f16(32, 256),
        "blk.0.time_mix_key.weight": f16(256, 256),
        "blk.0.channel_mix_value.weight": f16(256, 96),  # ne0 = 96: Q4_K -> Q5_0 fallback
        "output.weight": f16(64, 256),
    }
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def _fields(r: gguf.GGUFReader) -> dict[str, tuple[list, object]]:
    """Metadata as {key: (types, contents)} without the reader's GGUF.* pseudo-keys."""
    return {k: (f.types, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_quantize_file_roundtrip(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """Q4_K_M file: types as llama-quantize, bytes as quantize_array, metadata preserved."""
    src, dst = tmp_path / "m-f16.gguf", tmp_path / "m-q4km.gguf"
    tensors = _write_src(src)
    q.quantize_file(str(src), str(dst), "Q4_K_M")
    assert "blk.0.time_mix_key.weight" in capsys.readouterr().err  # progress on stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dst.name, src.name])  # no temp
    r = gguf.GGUFReader(dst)
    want = {
        "token_embd.weight": T.Q4_K,
        "blk.0.attn_norm.weight": T.F32,
        "blk.0.time_mix_lerp_fused.weight": T.F32,
        "blk.0.time_mix_w1.weight": T.F32,
        "blk.0.time_mix_a1.weight": T.F16,
        "blk.0.time_mix_key.weight": T.Q4_K,
        "blk.0.channel_mix_value.weight": T.Q5_0,
        "output.weight": T.Q6_K,
    }
    assert {t.name: T(int(t.tensor_type)) for t in r.tensors} == want
    for t in r.tensors:
        src_arr = tensors[t.name]
        assert tuple(int(v) for v in t.shape) == tuple(reversed(src_arr.shape))
        got = np.asarray(t.data).reshape(-1).view(np.uint8)
        if want[t.name] in (T.F32, T.F16):  # kept tensors are copied byte for byte
            assert got.tobytes() == src_arr.tobytes()
        else:
            rows = src_arr.reshape(-1, src_arr.shape[-1]).astype(np.float32)
            assert got.tobytes() == q.quantize_array(rows, want[t.name]).tobytes()
    before, after = _fields(gguf.GGUFReader(src)), _fields(r)
    assert after.pop("general.file_type")[1] == q.FTYPES["Q4_K_M"]
    assert after.pop("general.quantization_version")[1] == 2
    before.pop("general.file_type")
    assert after == before  # same keys, types and values (token strings byte-exact)
    assert after["tokenizer.ggml.tokens"][1] == TOKENS


def test_quantize_file_requantize_to_f16(tmp_path) -> None:
    """A quantized source dequantizes into an F16 preset with the converter's F32 rules."""
    src, mid, dst = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    _write_src(src)
    q.quantize_file(str(src), str(mid), "Q4_K_M", progress=False)
    q.quantize_file(str(mid), str(dst), "F16", progress=False)
    by_name = {t.name: t for t in gguf.GGUFReader(mid).tensors}
    for t in gguf.GGUFReader(dst).tensors:
        f32_kinds = ("norm.weight", "lerp_fused.weight", "w1.weight")
        want, dtype = (T.F32, np.float32) if t.name.endswith(f32_kinds) else (T.F16, np.float16)
        assert T(int(t.tensor_type)) == want
        m = by_name[t.name]
        ref = gguf.quants.dequantize(np.asarray(m.data), T(int(m.tensor_type))).reshape(-1)
        assert np.array_equal(np.asarray(t.data).reshape(-1), ref.astype(dtype))


def test_quantize_file_errors(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad inputs raise rwkv_jax errors; a failure mid-write leaves neither dst nor temp files."""
    dst = tmp_path / "out.gguf"
    with pytest.raises(GGUFError, match="no such file"):
        q.quantize_file(str(tmp_path / "missing.gguf"), str(dst), "Q4_K_M")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        q.quantize_file(str(junk), str(dst), "Q4_K_M")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError):
        q.quantize_file(str(empty), str(dst), "Q4_K_M")
    src = tmp_path / "m.gguf"
    _write_src(src)
    with pytest.raises(InputError, match="unknown ftype"):
        q.quantize_file(str(src), str(dst), "Q2_K")
    llama = tmp_path / "llama.gguf"
    _write_src(llama, arch="llama")
    with pytest.raises(GGUFError, match="rwkv7"):
        q.quantize_file(str(llama), str(dst), "Q4_K_M")

    calls = []
    real = q._convert_tensor

    def failing(*args):
        """Fail on the third tensor, after the header and two tensors are written."""
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(q, "_convert_tensor", failing)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        q.quantize_file(str(src), str(dst), "Q4_K_M", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
