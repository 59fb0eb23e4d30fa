"""Synthetic models are in llama.cpp's exact layout; the reader validates and configures them."""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest

from rwkv_jax import synth
from rwkv_jax.errors import GGUFError
from rwkv_jax.gguf import GGUFFile

T = gguf.GGMLQuantizationType

# Expected types written independently of rwkv_jax.quantize, from spec §2.2 / §2.5:
# converter: norms, biases, vectors, w1, w2, lerp_fused -> F32; everything else -> outtype;
# llama-quantize then leaves a1/a2/v1/v2/g1/g2 (and the F32 ones) alone, quantizes the 6 layer
# matrices and token_embd to the default type, and output.weight to Q6_K for every quantized
# type but Q8_0 (llama_tensor_get_type: `else if (new_type != GGML_TYPE_Q8_0) new_type = Q6_K`).
F32_ALWAYS = ("norm", ".bias", "w0", "w1", "w2", "a0", "v0", "k_k", "k_a", "r_k", "lerp", "ln.")
LORA = ("time_mix_a1", "time_mix_a2", "time_mix_v1", "time_mix_v2", "time_mix_g1", "time_mix_g2")


def expected_type(name: str, ftype: str) -> T:
    if any(s in name for s in F32_ALWAYS):
        return T.F32
    if ftype in ("F32", "F16", "BF16"):
        return T[ftype]
    if any(s in name for s in LORA):
        return T.F16
    default = {"Q8_0": T.Q8_0, "Q4_0": T.Q4_0, "Q4_K_M": T.Q4_K, "Q5_K_M": T.Q5_K, "Q6_K": T.Q6_K}[
        ftype
    ]
    if name == "output.weight" and ftype != "Q8_0":
        return T.Q6_K
    return default


@pytest.mark.parametrize("ftype", synth.TYPES)
def test_tiny_layout_and_types(synth_model, ftype):
    path = synth_model("tiny", ftype)
    r = gguf.GGUFReader(path)
    p = synth.PRESETS["tiny"]
    C, V = p.n_embd, 65536
    names = [t.name for t in r.tensors]
    assert len(names) == 6 + 28 * p.n_layer
    assert names[0] == "token_embd.weight" and names[-1] == "output.weight"
    for t in r.tensors:
        assert t.tensor_type == expected_type(t.name, ftype), t.name
    dims = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert dims["token_embd.weight"] == [C, V]
    assert dims["blk.1.time_mix_lerp_fused.weight"] == [C, 1, 1, 6]
    assert dims["blk.1.time_mix_w1.weight"] == [C, p.rank_w]
    assert dims["blk.1.time_mix_v2.weight"] == [p.rank_v, C]
    assert dims["blk.0.time_mix_v1.weight"] == [C, p.rank_a]  # the layer-0 quirk
    assert dims["blk.1.channel_mix_key.weight"] == [C, 4 * C]
    assert dims["blk.1.channel_mix_value.weight"] == [4 * C, C]
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "rwkv7"
    assert meta["rwkv7.embedding_length"] == C and meta["rwkv7.block_count"] == p.n_layer
    assert meta["rwkv7.wkv.head_size"] == 64
    assert meta["rwkv7.attention.gate_lora_rank"] == p.rank_g
    assert meta["tokenizer.ggml.model"] == "rwkv"
    assert len(meta["tokenizer.ggml.tokens"]) == V
    assert meta["tokenizer.ggml.eot_token_id"] == 261
    assert meta["general.file_type"] == int(
        {
            "F32": 0,
            "F16": 1,
            "BF16": 32,
            "Q8_0": 7,
            "Q4_0": 2,
            "Q4_K_M": 15,
            "Q5_K_M": 17,
            "Q6_K": 18,
        }[ftype]
    )
    # layer 0's v0/v1/v2 are copies of a0/a1/a2, as the converter writes them
    t = {t.name: t for t in r.tensors}
    for a, v in (("a0", "v0"), ("a1", "v1"), ("a2", "v2")):
        assert np.array_equal(
            t[f"blk.0.time_mix_{a}.weight"].data, t[f"blk.0.time_mix_{v}.weight"].data
        )


def test_deterministic_per_seed(tmp_path):
    def digest(seed: int, name: str) -> str:
        path = tmp_path / name
        synth.synth("tiny", "Q4_K_M", seed, str(path), progress=False)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(3, "a.gguf") == digest(3, "b.gguf")
    assert digest(3, "a.gguf") != digest(4, "c.gguf")


def test_config_from_metadata(synth_model):
    f = GGUFFile(synth_model("tiny", "F32"))
    p = synth.PRESETS["tiny"]
    c = f.config
    assert (c.n_layer, c.n_embd, c.ffn, c.head_size, c.vocab_size) == (
        p.n_layer,
        p.n_embd,
        4 * p.n_embd,
        64,
        65536,
    )
    assert (c.rank_w, c.rank_a, c.rank_v, c.rank_g) == (p.rank_w, p.rank_a, p.rank_v, p.rank_g)
    assert c.n_head == p.n_embd // 64 and c.group_norm_eps == pytest.approx(64e-5)
    assert hash(c) == hash(GGUFFile(synth_model("tiny", "F32")).config)


def test_presets_match_released_shapes():
    assert synth.PRESETS["0.1b"] == synth.Preset(12, 768, 64, 64, 32, 128)
    assert synth.PRESETS["2.9b"] == synth.Preset(32, 2560, 96, 96, 64, 320)
    # 7.2b from the converter's formula: max(1, round(C^e * m / 32)) * 32
    assert synth.PRESETS["7.2b"] == synth.Preset(32, 4096, 128, 128, 96, 480)


# ---- the reader rejects what is not a usable rwkv7 model ---------------------------------------


def _rewrite(
    src: str,
    dst: str,
    *,
    drop: str | None = None,
    arch: str | None = None,
    reshape: tuple[str, tuple[int, ...]] | None = None,
    meta: dict[str, int] | None = None,
) -> str:
    """Copy a GGUF with one change (a tensor dropped or resized, a key changed)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch or "rwkv7")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        if meta and k in meta:
            w.add_uint32(k, meta[k])
            continue
        v = f.contents()
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(k, v)
        elif vt == gguf.GGUFValueType.STRING:
            w.add_string(k, v)
        elif vt == gguf.GGUFValueType.FLOAT32:
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    for t in r.tensors:
        if t.name == drop:
            continue
        data = np.asarray(t.data)
        if reshape and t.name == reshape[0]:
            data = np.zeros(reshape[1][::-1], np.float32)
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_rejects_wrong_architecture(synth_model, tmp_path):
    bad = _rewrite(synth_model("tiny", "F32"), str(tmp_path / "x.gguf"), arch="llama")
    with pytest.raises(GGUFError, match="architecture is 'llama'"):
        GGUFFile(bad)


def test_rejects_missing_tensor(synth_model, tmp_path):
    bad = _rewrite(
        synth_model("tiny", "F32"), str(tmp_path / "x.gguf"), drop="blk.1.time_mix_key.weight"
    )
    with pytest.raises(GGUFError, match="'blk.1.time_mix_key.weight' is missing"):
        GGUFFile(bad)


def test_rejects_shape_contradicting_metadata(synth_model, tmp_path):
    bad = _rewrite(
        synth_model("tiny", "F32"),
        str(tmp_path / "x.gguf"),
        reshape=("blk.1.time_mix_w1.weight", (256, 48)),
    )
    with pytest.raises(GGUFError, match=r"'blk.1.time_mix_w1.weight' has dims \[256, 48\]"):
        GGUFFile(bad)
    bad = _rewrite(
        synth_model("tiny", "F32"), str(tmp_path / "y.gguf"), meta={"rwkv7.block_count": 3}
    )
    with pytest.raises(GGUFError, match="'blk.2.attn_norm.weight' is missing"):
        GGUFFile(bad)


def test_rejects_non_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match=r"not a GGUF file \(starts with b'not '"):
        GGUFFile(str(p))
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile(str(tmp_path / "missing.gguf"))
