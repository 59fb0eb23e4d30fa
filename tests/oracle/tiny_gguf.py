"""Tiny random RWKV-7 models in BlinkDL `.pth` layout, written as llama.cpp-layout GGUF files.

The GGUF side follows llama.cpp's converter (`Rwkv7Model.modify_tensors`, spec §2.2) applied to a
BlinkDL-style state dict, its dtype rules (`prepare_tensors`) and, for quantized outputs,
`llama-quantize`'s choice of quantizable tensors (spec §2.5). Meant for math checks only: the
vocabulary is a fake list of "[T123]" strings.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

HEAD_SIZE = 64
# Distinct LoRA ranks (decay, iclr, value-residual, gate) so a swapped or mis-transposed LoRA
# cannot go unnoticed; layer-0 v1/v2 then have the iclr rank, as in real files.
DEFAULT_LORA_RANKS = (32, 24, 16, 48)
LERP_ORDER = ("r", "w", "k", "v", "a", "g")  # converter's stacking order for time_mix_lerp_fused

FLOAT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
QUANT_TYPES = {
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
}
# converter: these stay F32 whatever --outtype says
FORCED_F32 = ("time_mix_w1.weight", "time_mix_w2.weight", "time_mix_lerp_fused.weight")
# llama-quantize: RWKV tensors copied in their input type
QUANT_EXCLUDED = tuple(
    f"time_mix_{n}.weight"
    for n in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2")
    + ("decay_w1", "decay_w2", "lerp_fused")
)


def make_tiny_rwkv7_pth(
    seed: int,
    n_layer: int = 2,
    n_embd: int = 128,
    vocab: int = 65536,
    lora_ranks: tuple[int, int, int, int] = DEFAULT_LORA_RANKS,
) -> dict[str, np.ndarray]:
    """Random float32 weights under BlinkDL `.pth` keys and shapes (spec §1.1), no layer-0 v*."""
    rng = np.random.default_rng(seed)
    C, V, F = n_embd, vocab, 4 * n_embd
    H = C // HEAD_SIZE
    d_w, d_a, d_v, d_g = lora_ranks

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
        return rng.normal(mean, std, size=shape).astype(np.float32)

    def uniform(shape: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, size=shape).astype(np.float32)

    def matrix(n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
        # (out, in) with unit-variance outputs for unit-variance inputs
        return normal((n_out, n_in), gain / np.sqrt(n_in))

    sd: dict[str, np.ndarray] = {"emb.weight": normal((V, C), 1.0)}
    sd["blocks.0.ln0.weight"] = normal((C,), 0.1, 1.0)
    sd["blocks.0.ln0.bias"] = normal((C,), 0.1)
    for i in range(n_layer):
        b, att, ffn = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"] = normal((C,), 0.1, 1.0)
            sd[b + ln + ".bias"] = normal((C,), 0.1)
        for c in LERP_ORDER:
            sd[att + "x_" + c] = uniform((1, 1, C), 0.0, 1.0)
        # decay bias spread so per-channel decays range from ~0.85 to ~0.9985
        sd[att + "w0"] = uniform((1, 1, C), -6.0, -1.0)
        # BlinkDL stores LoRA matrices as (in, out): x @ w1 @ w2
        sd[att + "w1"] = matrix(d_w, C).T.copy()
        sd[att + "w2"] = matrix(C, d_w, 0.5).T.copy()
        sd[att + "a0"] = normal((1, 1, C), 0.1)
        sd[att + "a1"] = matrix(d_a, C).T.copy()
        sd[att + "a2"] = matrix(C, d_a, 0.5).T.copy()
        if i > 0:  # layer 0 has no value-residual LoRA (it only sets v_first)
            sd[att + "v0"] = normal((1, 1, C), 0.2, 0.5)
            sd[att + "v1"] = matrix(d_v, C).T.copy()
            sd[att + "v2"] = matrix(C, d_v, 0.5).T.copy()
        sd[att + "g1"] = matrix(d_g, C).T.copy()
        sd[att + "g2"] = matrix(C, d_g).T.copy()
        sd[att + "k_k"] = normal((1, 1, C), 0.05, 0.85)
        sd[att + "k_a"] = normal((1, 1, C), 0.05, 1.0)
        sd[att + "r_k"] = normal((H, HEAD_SIZE), 0.1)
        for proj in ("receptance", "key", "value", "output"):
            sd[att + proj + ".weight"] = matrix(C, C)
        sd[att + "ln_x.weight"] = normal((C,), 0.1, 1.0)
        sd[att + "ln_x.bias"] = normal((C,), 0.1)
        sd[ffn + "x_k"] = uniform((1, 1, C), 0.0, 1.0)
        sd[ffn + "key.weight"] = matrix(F, C)
        sd[ffn + "value.weight"] = matrix(C, F)
    sd["ln_out.weight"] = normal((C,), 0.1, 1.0)
    sd["ln_out.bias"] = normal((C,), 0.1)
    sd["head.weight"] = matrix(V, C)
    return sd


def pth_to_gguf_tensors(sd: dict[str, np.ndarray], n_layer: int) -> list[tuple[str, np.ndarray]]:
    """llama.cpp converter transforms (spec §2.2): GGUF name -> torch-order array (reversed ne)."""
    out = [
        ("token_embd.weight", sd["emb.weight"]),
        ("token_embd_norm.weight", sd["blocks.0.ln0.weight"]),
        ("token_embd_norm.bias", sd["blocks.0.ln0.bias"]),
    ]
    for i in range(n_layer):
        att, ffn, blk = f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blk.{i}."
        out += [
            (blk + "attn_norm.weight", sd[f"blocks.{i}.ln1.weight"]),
            (blk + "attn_norm.bias", sd[f"blocks.{i}.ln1.bias"]),
            (blk + "attn_norm_2.weight", sd[f"blocks.{i}.ln2.weight"]),
            (blk + "attn_norm_2.bias", sd[f"blocks.{i}.ln2.bias"]),
        ]
        # (6, 1, 1, C) stacked r,w,k,v,a,g -> GGUF ne [C, 1, 1, 6]
        lerp = np.stack([sd[att + "x_" + c] for c in LERP_ORDER])
        out.append((blk + "time_mix_lerp_fused.weight", lerp))
        for p in ("w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2", "g1", "g2"):
            if i == 0 and p[0] == "v":
                continue  # layer-0 v* are emitted below as copies of a*
            t = sd[att + p].squeeze()
            if p[1] in "12":
                t = t.T  # LoRA (in, out) -> (out, in), i.e. GGUF ne [in, out]
            if i == 0 and p[0] == "a":
                out.append((blk + f"time_mix_v{p[1]}.weight", t))  # llama.cpp wants them present
            out.append((blk + f"time_mix_{p}.weight", t))
        out += [
            (blk + "time_mix_k_k.weight", sd[att + "k_k"].squeeze()),
            (blk + "time_mix_k_a.weight", sd[att + "k_a"].squeeze()),
            (blk + "time_mix_r_k.weight", sd[att + "r_k"].reshape(-1)),  # (H, N) row-major -> C
            (blk + "time_mix_receptance.weight", sd[att + "receptance.weight"]),
            (blk + "time_mix_key.weight", sd[att + "key.weight"]),
            (blk + "time_mix_value.weight", sd[att + "value.weight"]),
            (blk + "time_mix_output.weight", sd[att + "output.weight"]),
            (blk + "time_mix_ln.weight", sd[att + "ln_x.weight"]),
            (blk + "time_mix_ln.bias", sd[att + "ln_x.bias"]),
            (blk + "channel_mix_lerp_k.weight", sd[ffn + "x_k"].squeeze()),
            (blk + "channel_mix_key.weight", sd[ffn + "key.weight"]),
            (blk + "channel_mix_value.weight", sd[ffn + "value.weight"]),
        ]
    out += [
        ("output_norm.weight", sd["ln_out.weight"]),
        ("output_norm.bias", sd["ln_out.bias"]),
        ("output.weight", sd["head.weight"]),
    ]
    return [(name, np.ascontiguousarray(t, dtype=np.float32)) for name, t in out]


def gguf_type_for(
    name: str, t: np.ndarray, outtype: str, quant: str | None
) -> gguf.GGMLQuantizationType:
    """Storage type of one tensor: converter rules for `outtype`, then llama-quantize's `quant`."""
    float_type = FLOAT_TYPES[outtype][0]
    if t.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        float_type = gguf.GGMLQuantizationType.F32
    if name.endswith(FORCED_F32):
        float_type = gguf.GGMLQuantizationType.F32
    quantizable = (
        t.ndim >= 2 and not name.endswith("_norm.weight") and not name.endswith(QUANT_EXCLUDED)
    )
    if quant is not None and quantizable:
        return QUANT_TYPES[quant][0]
    return float_type


def write_tiny_rwkv7_gguf(
    path: str | Path,
    seed: int,
    n_layer: int = 2,
    n_embd: int = 128,
    vocab: int = 65536,
    *,
    outtype: str = "f32",
    quant: str | None = None,
    lora_ranks: tuple[int, int, int, int] = DEFAULT_LORA_RANKS,
) -> Path:
    """Write a random RWKV-7 GGUF (llama.cpp names, ne, types, metadata); returns the path.

    `outtype` is the converter's --outtype (f32, f16, bf16); `quant` (q8_0, q4_0, q4_1, q5_0,
    q5_1) then re-types the tensors llama-quantize would quantize, as from an `outtype` file.
    """
    if outtype not in FLOAT_TYPES:
        raise ValueError(f"outtype must be one of {sorted(FLOAT_TYPES)}, got {outtype!r}")
    if quant is not None and quant not in QUANT_TYPES:
        raise ValueError(f"quant must be None or one of {sorted(QUANT_TYPES)}, got {quant!r}")
    if n_embd % HEAD_SIZE:
        raise ValueError(f"n_embd={n_embd} must be a multiple of the head size {HEAD_SIZE}")
    path = Path(path)
    sd = make_tiny_rwkv7_pth(seed, n_layer, n_embd, vocab, lora_ranks)
    d_w, d_a, d_v, d_g = lora_ranks
    file_type = QUANT_TYPES[quant][1] if quant else FLOAT_TYPES[outtype][1]

    w = gguf.GGUFWriter(path, "rwkv7")
    w.add_name(f"tiny-rwkv7-seed{seed}")
    w.add_context_length(1048576)  # converter's dummy: RWKV has no context limit
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_layer_norm_eps(1e-5)
    w.add_wkv_head_size(HEAD_SIZE)
    w.add_decay_lora_rank(d_w)
    w.add_iclr_lora_rank(d_a)
    w.add_value_residual_mix_lora_rank(d_v)
    w.add_gate_lora_rank(d_g)
    w.add_feed_forward_length(4 * n_embd)
    w.add_file_type(int(file_type))
    w.add_head_count(0)  # "required by llama.cpp, unused"
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # tokenizer block as `_set_vocab_rwkv_world` writes it, with fake token strings
    w.add_tokenizer_model("rwkv")
    w.add_token_list(["<s>"] + [f"[T{i}]" for i in range(1, vocab)])
    w.add_token_types([int(gguf.TokenType.CONTROL)] + [int(gguf.TokenType.NORMAL)] * (vocab - 1))
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    if vocab > 261:
        w.add_eot_token_id(261)
    w.add_chat_template("rwkv-world")

    for name, t in pth_to_gguf_tensors(sd, n_layer):
        qtype = gguf_type_for(name, t, outtype, quant)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, t)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            # packed bytes; gguf-py derives ne from the byte shape and the type
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
