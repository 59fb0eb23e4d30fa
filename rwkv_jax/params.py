"""The weights of an RWKV-7 model as an equinox pytree, loaded from a GGUF file.

Matrices stay in their file format (`quant.Weight`: packed blocks for quantized types) unless
`mode="dense"` asks for a one-time dequantization at load. Vectors are float32. When every layer
has the same formats (true of llama.cpp's rwkv7 presets) the layers are stacked along a leading
axis so the forward pass is one `lax.scan`; otherwise they stay a tuple and are unrolled.
Loading makes one pass over the bytes: each matrix goes from the mmap to the device as it lies
in the file and is split into its block fields there, a layer (or emb + head) per program
(upload.py); stacks are filled layer by layer in place.
"""

from __future__ import annotations

import equinox as eqx
import gguf
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from rwkv_jax import quant, upload
from rwkv_jax.errors import GGUFError, InputError
from rwkv_jax.gguf import GLOBAL_TENSORS, LAYER_TENSORS, GGUFFile, TensorInfo

T = gguf.GGMLQuantizationType
MODES = ("packed", "dense")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Block(eqx.Module):
    """One layer: time mix (attention replacement) then channel mix (FFN). Names as BlinkDL's."""

    ln1_w: Array  # [C]
    ln1_b: Array  # [C]
    x_rwkvag: Array  # [6, C] token-shift lerp coefficients, order r, w, k, v, a, g
    w0: Array  # [C] decay bias
    w1: quant.Weight  # (Dw, C) decay LoRA down
    w2: quant.Weight  # (C, Dw) decay LoRA up
    a0: Array  # [C] iclr bias
    a1: quant.Weight  # (Da, C)
    a2: quant.Weight  # (C, Da)
    v0: Array  # [C] value-residual bias
    v1: quant.Weight  # (Dv, C)
    v2: quant.Weight  # (C, Dv)
    g1: quant.Weight  # (Dg, C) gate LoRA
    g2: quant.Weight  # (C, Dg)
    k_k: Array  # [C] removal-key scale
    k_a: Array  # [C] iclr key rescale
    r_k: Array  # [H, N] bonus
    receptance: quant.Weight  # (C, C)
    key: quant.Weight  # (C, C)
    value: quant.Weight  # (C, C)
    output: quant.Weight  # (C, C)
    ln_x_w: Array  # [C] per-head GroupNorm affine
    ln_x_b: Array  # [C]
    ln2_w: Array  # [C]
    ln2_b: Array  # [C]
    ffn_x_k: Array  # [C]
    ffn_key: quant.Weight  # (F, C)
    ffn_value: quant.Weight  # (C, F)


class Params(eqx.Module):
    """All weights. `blocks` is one Block with a leading layer axis, or a tuple of Blocks."""

    emb: quant.Weight  # (V, C), looked up by rows
    ln0_w: Array  # [C]
    ln0_b: Array  # [C]
    blocks: Block | tuple[Block, ...]
    ln_out_w: Array  # [C]
    ln_out_b: Array  # [C]
    head: quant.Weight  # (V, C)

    @property
    def stacked(self) -> bool:
        """True when the layers are one stacked Block (forward scans over them)."""
        return isinstance(self.blocks, Block)


def _vector(f: GGUFFile, info: TensorInfo) -> np.ndarray:
    """A 1-D (or lerp) tensor as float32 on the host; float formats only (never quantized)."""
    n = int(np.prod(info.ne))
    if info.ggml_type == T.F32:
        return info.data.view(np.float32)[:n]
    if info.ggml_type == T.F16:
        return info.data.view(np.float16)[:n].astype(np.float32)
    if info.ggml_type == T.BF16:
        return (info.data.view(np.uint16)[:n].astype(np.uint32) << 16).view(np.float32)
    raise GGUFError(
        f"{f.path}: tensor '{info.name}' is a vector stored as {info.type_name}; llama.cpp keeps "
        "vectors in F32/F16/BF16 and so does rwkv_jax (re-convert the file)"
    )


def _host_fields(f: GGUFFile, layer: int | None) -> dict[str, object]:
    """Host-side pieces of one layer (or the global tensors): vectors as numpy, matrices as info."""
    specs = GLOBAL_TENSORS if layer is None else LAYER_TENSORS
    prefix = "" if layer is None else f"blk.{layer}."
    cfg = f.config
    out: dict[str, object] = {}
    for spec in specs:
        info = f.tensor(prefix + spec.gguf_name)
        if spec.kind == "mat":
            out[spec.field] = info
        elif spec.kind == "lerp":
            out[spec.field] = _vector(f, info).reshape(6, cfg.n_embd)  # torch (6,1,1,C)
        elif spec.field == "r_k":
            out[spec.field] = _vector(f, info).reshape(cfg.n_head, cfg.head_size)
        else:
            out[spec.field] = _vector(f, info)
    return out


def _layer0_dummy(f: GGUFFile, layers: list[dict[str, object]]) -> None:
    """Give layer 0's unused v1/v2 the rank and format of the other layers (so layers stack).

    Layer 0 never applies the value-residual mix (the model sets v_first = v there, which makes
    the mix an exact no-op), so zero blocks of the common format stand in for the dummies.
    """
    if len(layers) < 2:
        return
    for field in ("v1", "v2"):
        ref: TensorInfo = layers[1][field]  # type: ignore[assignment]
        zeros = np.zeros_like(ref.data)
        layers[0][field] = TensorInfo(f"blk.0.{field} (dummy)", ref.ggml_type, ref.ne, zeros)
    layers[0]["v0"] = np.zeros_like(layers[1]["v0"])  # type: ignore[arg-type]


def _matrix(info: TensorInfo) -> tuple[type[quant.Weight], tuple[int, int], np.ndarray]:
    """(format class, PyTorch shape (out, in), bytes [out, row_bytes]) of a matrix tensor."""
    shape = (int(np.prod(info.ne[1:], dtype=np.int64)), info.ne[0])
    cls = quant.format_class(info.ggml_type, info.name)
    quant.check_raw(cls, info.data, shape, info.name)
    return cls, shape, info.data.reshape(shape[0], cls.row_bytes(shape[1]))


def _to_device(
    mats: dict[str, tuple[type[quant.Weight], tuple[int, int], np.ndarray]],
    lays: dict[str, upload.Layout],
) -> dict[str, Array]:
    """Upload a group's tensor bytes, one device_put each, from this thread.

    A thread pool did not help: on an H200 (2.9b Q4_K_M) load_params took 0.16 s from one
    thread and 0.23 s from four, 0.25 s from eight.
    """
    return {k: upload.to_device(rows, lays[k]) for k, (_, _, rows) in mats.items()}


def _weights(group: dict[str, TensorInfo], words: bool) -> dict[str, quant.Weight]:
    """Packed weights of a group of tensors (one layer, or emb + head): each tensor's bytes go
    to the device as they lie in the mmap, and one program splits the group's blocks there
    (words: the K-quants' quants as uint32 words, quant.raw_layout)."""
    mats = {k: _matrix(info) for k, info in group.items()}
    lays = {k: quant.raw_layout(cls, words) for k, (cls, _, _) in mats.items()}
    fields = upload.split(_to_device(mats, lays), lays)
    return {k: cls(shape=shape, **fields[k]) for k, (cls, shape, _) in mats.items()}


def _stacked_weights(layers: list[dict[str, TensorInfo]], words: bool) -> dict[str, quant.Weight]:
    """Packed weights stacked over layers [L, ...]: zero stacks on the device, then each layer's
    bytes uploaded and split into its slot in place (peak: the stacks plus one layer)."""
    mats = [{k: _matrix(info) for k, info in lay.items()} for lay in layers]
    first = mats[0]
    lays = {k: quant.raw_layout(cls, words) for k, (cls, _, _) in first.items()}
    shapes = {
        k: (len(layers), out, n_in // cls.BLOCK_ELEMS) for k, (cls, (out, n_in), _) in first.items()
    }
    stacks = upload.empty_stacks(lays, shapes)
    for i, lay in enumerate(mats):  # dispatch is asynchronous: layer i+1 uploads meanwhile
        stacks = upload.put_layers(stacks, _to_device(lay, lays), i, lays)
    return {k: cls(shape=shape, **stacks[k]) for k, (cls, shape, _) in first.items()}


def _signature(layer: dict[str, object]) -> tuple:
    """What must agree across layers for them to be stacked."""
    return tuple(
        (k, v.ggml_type, v.ne) if isinstance(v, TensorInfo) else (k, v.shape)  # type: ignore
        for k, v in sorted(layer.items())
    )


def _build_block(layers: list[dict[str, object]], words: bool) -> Block:
    """One Block from one layer's host pieces, or stacked from several (leading axis)."""
    mats = {k: v for k, v in layers[0].items() if isinstance(v, TensorInfo)}
    if len(layers) == 1:
        fields: dict[str, object] = dict(_weights(mats, words))  # type: ignore[arg-type]
    else:
        per_layer = [{k: lay[k] for k in mats} for lay in layers]
        fields = dict(_stacked_weights(per_layer, words))  # type: ignore[arg-type]
    vectors = {k: v for k, v in layers[0].items() if k not in mats}
    if len(layers) > 1:  # small: stacked on the host ([L, ...] float32), one upload each
        vectors = {k: np.stack([lay[k] for lay in layers]) for k in vectors}  # type: ignore[misc]
    # float32 copies we own (an F32 vector is a view of the mmap): one batched device_put
    fields |= jax.device_put({k: np.array(v, np.float32) for k, v in vectors.items()})
    return Block(**fields)  # type: ignore[arg-type]


def load_params(
    f: GGUFFile, *, mode: str = "packed", dtype=jnp.float32, stack_layers: bool | None = None
) -> Params:
    """Upload the weights of an opened GGUF file to the default device.

    mode: "packed" keeps matrices in their file format and dequantizes inside jit; "dense"
    dequantizes every matrix once now to `dtype`. stack_layers: None = stack when possible.
    Packed under the gpu profile with a bf16/f16 `dtype`, the quants of Q4_K / Q6_K are stored
    as uint32 words (quant.words_for), for the GPU kernels' integer dot products.
    """
    if mode not in MODES:
        raise InputError(f"weight mode '{mode}' is not one of {MODES}")
    glob = _host_fields(f, None)
    layers = [_host_fields(f, i) for i in range(f.config.n_layer)]
    _layer0_dummy(f, layers)
    can_stack = len({_signature(lay) for lay in layers}) == 1
    if stack_layers and not can_stack:
        raise InputError(f"{f.path}: layers use different tensor formats; they cannot be stacked")
    if stack_layers is None:
        stack_layers = can_stack
    # the two largest tensors first, while little else is on the device: their bytes and
    # fields coexist briefly (2.9b: 0.23 GB), which then stays under the layers' own peak of
    # everything plus one layer in flight (H200, 2.9b: peak 1.036x the file, 1.12x before)
    words = mode == "packed" and quant.words_for(dtype)
    ends = _weights({k: glob[k] for k in ("emb", "head")}, words)  # type: ignore[misc]
    blocks: Block | tuple[Block, ...]
    if stack_layers:
        blocks = _build_block(layers, words)
    else:
        blocks = tuple(_build_block([lay], words) for lay in layers)
    vec = jax.device_put({k: np.array(glob[k], np.float32) for k in glob if k not in ends})
    params = Params(blocks=blocks, **ends, **vec)  # type: ignore[arg-type]
    if mode == "dense":
        params = densify(params, dtype)
    return params


def densify(params: Params, dtype=jnp.float32) -> Params:
    """Dequantize every matrix once (on the device) into a dense weight of `dtype`."""

    def convert(w):
        if isinstance(w, quant.Weight):
            return quant.dense_weight(jax.jit(lambda w: w.dequantize(dtype))(w))
        return w

    return jax.tree.map(convert, params, is_leaf=lambda x: isinstance(x, quant.Weight))


def nbytes(params: Params) -> int:
    """Bytes of device memory held by the weights."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
