"""Packed ggml weight formats as equinox pytrees, dequantized with pure jnp inside jit.

One final class per ggml type. Each holds a 2-D weight of PyTorch shape (out, in) (ggml ne =
[in, out]): a row is `in` contiguous values made of `in / BLOCK_ELEMS` blocks. The block bytes are
split into the fields of the ggml C struct once at load (on the device: upload.py), so the
dequantizing code only shifts and masks integers and multiplies floats — no bitcasts. Under the
gpu profile the quant bytes of Q4_K / Q6_K (WORD_FIELDS) are stored as little-endian uint32
words (the GPU kernels' integer dot products take four quants per word); `_unwords` gives XLA's
paths their bytes back.
Block layouts: docs/rwkv7-spec.md §3 and ggml `src/ggml-common.h`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import ClassVar, TypeVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from jax import lax

from rwkv_jax import backends, cpu_kernels, gpu_kernels, upload
from rwkv_jax.errors import GGUFError, UnsupportedTypeError

Array = jax.Array
W = TypeVar("W", bound="Weight")

QK_K = 256  # elements in a K-quant super-block


# ---------------------------------------------------------------------------------------------
# Bit helpers (integer shifts and masks; leading axes pass through). A packed byte field is uint8
# as stored, or int8 under the metal-safe profile (Metal plugins lack unsigned types): an int8
# field is widened to int32 0..255 first, so every shift below is int32 arithmetic there.


def _bytes(a: Array) -> Array:
    """Byte values of a packed u8 field: uint8 as stored, or int32 0..255 from an int8 view."""
    return (a.astype(jnp.int32) & 0xFF) if a.dtype == jnp.int8 else a


def _unwords(a: Array) -> Array:
    """A quant byte field as bytes [..., 4n]: as stored, or from the gpu profile's
    little-endian 32-bit words [..., n] (Weight.WORD_FIELDS)."""
    if a.dtype != jnp.uint32:
        return a
    shifts = jnp.arange(0, 32, 8, dtype=jnp.uint32).reshape((1,) * a.ndim + (4,))
    b = (a[..., None] >> shifts) & 0xFF
    return b.astype(jnp.uint8).reshape(a.shape[:-1] + (4 * a.shape[-1],))


def _split_bits(a: Array, shifts: tuple[int, ...], mask: int, axis: int) -> Array:
    """Extract `(a >> s) & mask` for each shift s, stacked on a new axis (-1 or -2)."""
    a = _bytes(a)
    return jnp.stack([(a >> s) & mask for s in shifts], axis=axis)


def _flatten_last(a: Array, n: int) -> Array:
    """Merge the last n axes of `a` into one."""
    return a.reshape(a.shape[: a.ndim - n] + (-1,))


def _nibbles(qs: Array) -> Array:
    """Unpack [..., k] bytes to [..., 2k] nibbles: first all low nibbles, then all high ones."""
    # [..., 2, k]: index (half, i) -> element half*k + i, the ggml q4 order
    return _flatten_last(_split_bits(qs, (0, 4), 0xF, axis=-2), 2)


def _crumbs(qs: Array) -> Array:
    """Unpack [..., 32] bytes to [..., 4, 32] 2-bit values, shift 2j on row j."""
    return _split_bits(qs, (0, 2, 4, 6), 0x3, axis=-2)


def _bit_planes(qh: Array) -> Array:
    """Unpack [..., 32] bytes to [..., 8, 32] bits: plane b holds bit b of every byte."""
    return _split_bits(qh, tuple(range(8)), 0x1, axis=-2)


def _f32(a: Array) -> Array:
    """Exact widening of fp16 scales / small integers to float32."""
    return a.astype(jnp.float32)


def _scale_min_k4(scales: Array) -> tuple[Array, Array]:
    """ggml get_scale_min_k4 for all 8 sub-blocks: [..., 12] bytes -> (sc, mn) [..., 8] uint8."""
    # bytes 0-3: low 6 bits = sc[0:4], top 2 bits = sc[4:8] >> 4
    # bytes 4-7: low 6 bits = mn[0:4], top 2 bits = mn[4:8] >> 4
    # bytes 8-11: low nibble = sc[4:8] & 15, high nibble = mn[4:8] & 15
    # elementwise over [..., 2 halves, 4] (a select on the half, no concatenate): XLA fuses it
    # into the reduction or dequantization that uses the scales; a concatenate was a kernel of
    # its own per matrix and token (386 per token of the 2.9b decode on an H200)
    s = _bytes(scales).reshape(*scales.shape[:-1], 3, 1, 4)
    s0, s1, s2 = s[..., 0, :, :], s[..., 1, :, :], s[..., 2, :, :]  # [..., 1, 4]
    hi = lax.broadcasted_iota(jnp.int32, (2, 1), 0) == 1  # [2, 1]: sub-blocks 4..7
    sc = jnp.where(hi, (s2 & 0xF) | ((s0 >> 6) << 4), s0 & 63)  # [..., 2, 4]
    mn = jnp.where(hi, (s2 >> 4) | ((s1 >> 6) << 4), s1 & 63)
    return _flatten_last(sc, 2), _flatten_last(mn, 2)


# At most this many activation rows use the fused multiply+reduce matvec; more use a dot.
MATVEC_MAX_ROWS = 4

# ---------------------------------------------------------------------------------------------
# Base classes


class Weight(eqx.Module):
    """A weight [out, in] kept in one ggml format; array fields are the packed block fields."""

    shape: tuple[int, int] = eqx.field(static=True)  # (out, in), PyTorch convention

    GGML_TYPE: ClassVar[GGMLQuantizationType]
    BLOCK: ClassVar[np.dtype]  # one block as a numpy structured dtype (the ggml C struct)
    BLOCK_ELEMS: ClassVar[int]  # values per block
    # byte members the gpu profile stores as little-endian uint32 words (raw_layout): the GPU
    # kernels' integer dot products take four quants per word
    WORD_FIELDS: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def _decode(self) -> Array:
        """All values [..., rows, in]: float32 for block formats, the stored dtype for dense."""

    def dequantize(self, dtype=jnp.float32) -> Array:
        """Unpack the whole weight to [..., out, in] in `dtype` (jit-safe)."""
        return self._decode().astype(dtype)

    def rows(self, idx: Array) -> Array:
        """Dequantize only rows `idx` (any int shape) -> float32 [..., *idx.shape, in]."""

        def take(path, a: Array) -> Array:
            # the row axis sits before the block axis and the field's own per-block axes
            name = path[-1].name
            return jnp.take(a, idx, axis=a.ndim - 1 - self.BLOCK[name].ndim - 1)

        picked = jax.tree_util.tree_map_with_path(take, self)
        return picked._decode().astype(jnp.float32)

    def matmul(self, x: Array, of: LayerOf | None = None) -> Array:
        """x @ W^T: [..., in] -> [..., out] in x's dtype, accumulated in float32.

        On the CPU backend the native FFI kernels (rwkv_jax/cpu_kernels.py) multiply the packed
        blocks directly; elsewhere XLA dequantizes and runs a dot. `of`: this weight is layer
        `of.index` of the stack `of.stack`, which the native kernels read in place.
        """
        if _cpu_native(self):
            xla = self._matmul_xla
            w, index = (self, None) if of is None else (of.stack, of.index)
            # lambdas: platform_dependent hashes its branches (a Module with tracers is not)
            return lax.platform_dependent(
                x,
                cpu=lambda x: cpu_kernels.matmul(w, x, index=index).astype(x.dtype),
                default=lambda x: xla(x),
            )
        return self._matmul_xla(x)

    def _matmul_xla(self, x: Array) -> Array:
        """x @ W^T through XLA: dequantize to x's dtype, then a dot with float32 accumulation."""
        w = self.dequantize(x.dtype)  # [out, in]
        if w.ndim != 2:
            raise ValueError(f"matmul needs an unstacked weight, got values of shape {w.shape}")
        y = lax.dot_general(
            x,
            w,
            (((x.ndim - 1,), (1,)), ((), ())),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
        return y.astype(x.dtype)

    def matvec_fused(self, x: Array) -> Array:
        """x @ W^T as one fused unpack-multiply-reduce (float32 values and accumulation), for
        few rows."""
        rows = math.prod(x.shape[:-1])
        w = self._decode().astype(jnp.float32)  # [out, in], fused into the reduction below
        xs = x.reshape(rows, 1, -1).astype(jnp.float32)  # [M, 1, in]
        y = jnp.sum(w[None] * xs, axis=-1)  # [M, out]
        return y.reshape(*x.shape[:-1], -1).astype(x.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of packed device data (equals the GGUF tensor size for an unstacked weight)."""
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))

    @property
    def format_name(self) -> str:
        """ggml type name, e.g. 'Q4_K'."""
        return self.GGML_TYPE.name

    @classmethod
    def row_bytes(cls, n_in: int) -> int:
        """Bytes of one packed row of `n_in` values."""
        return n_in // cls.BLOCK_ELEMS * cls.BLOCK.itemsize

    @classmethod
    def leaf_ndim(cls) -> int:
        """ndim of the first array field of an unstacked weight (to count stacked axes)."""
        return 2 + cls.BLOCK[cls.BLOCK.names[0]].ndim  # [out, nb, *per-block shape]

    @classmethod
    def from_raw(
        cls: type[W], raw: np.ndarray, shape: tuple[int, int], *, name: str = "<raw>"
    ) -> W:
        """Upload raw ggml bytes once and split them into fields on the device (upload.py).

        raw: uint8, flat with exactly out*row_bytes bytes, or [*lead, out, row_bytes] where the
        leading axes (e.g. layers) become leading axes of every field. The device copy never
        aliases `raw`, so it may be a view of an mmap that later goes away.
        """
        out, n_in = check_raw(cls, raw, shape, name)
        lead = raw.shape[:-2] if raw.ndim > 1 else ()
        lay = raw_layout(cls)
        dev = upload.to_device(raw.reshape(*lead, out, cls.row_bytes(n_in)), lay)
        return cls(shape=(out, n_in), **upload.split({name: dev}, {name: lay})[name])


def _stored_as() -> str:
    """How the profile in force stores packed bytes (Profile.quant_bytes: uint8, int8, uint32)."""
    return backends.current_profile().quant_bytes


def field_dtype(base: np.dtype) -> np.dtype:
    """Device dtype of a block field of C type `base`: int8 for uint8 under metal-safe."""
    if base == np.uint8 and _stored_as() == "int8":
        return np.dtype(np.int8)
    return np.dtype(base)


def raw_layout(cls: type[Weight], words: bool | None = None) -> upload.Layout:
    """How `cls`'s block bytes split into its fields on the device, under the current profile
    (uint8 / int8 bytes). words: store cls.WORD_FIELDS as uint32 words (None: where the profile
    does, the gpu profile's quant_bytes "uint32")."""
    lay = upload.layout(cls.BLOCK, field_dtype(np.dtype(np.uint8)))
    if words is None:
        words = _stored_as() == "uint32"
    if words and cls.WORD_FIELDS:
        lay = upload.as_words(lay, cls.WORD_FIELDS)
    return lay


def words_for(dtype) -> bool:
    """Whether a packed model computing in `dtype` stores its quants as words: under the gpu
    profile, for the dtypes the GPU kernels' integer dot products take (bf16 / f16; none with
    RWKV_JAX_INT_DOT=0). A float32 model keeps the bytes its float kernels read fastest (over
    words they ran 457.6 -> 335.1 tok/s at one row and 962.3 -> 459.2 at four, H200, while they
    read a word's values on a trailing axis; BENCHMARKS.md)."""
    return _stored_as() == "uint32" and jnp.dtype(dtype) in gpu_kernels.INT_DOT_DTYPES


class _Blocked(Weight):
    """A block-quantized format: values come from `_blocks()` [..., nb, BLOCK_ELEMS]."""

    @abc.abstractmethod
    def _blocks(self) -> Array:
        """Unpack every block to float32 [..., rows, nb, BLOCK_ELEMS]."""

    def _decode(self) -> Array:
        """Blocks joined along each row: [..., rows, in]."""
        return _flatten_last(self._blocks(), 2)

    def matmul(self, x: Array, of: LayerOf | None = None) -> Array:
        """x @ W^T; for a few rows (decode) on GPUs as multiply + reduce over the contiguous axis.

        Written that way XLA fuses the unpacking into the reduction and reads each packed byte
        once instead of writing and re-reading a dequantized matrix for a dot (backends.md:
        2.9b Q4_K on an H100, 2.5 ms vs 7.0 ms per token). XLA:CPU does not vectorize the
        fused reduction (measured 4x slower than its dot here), so the CPU keeps the dot. On
        NVIDIA GPUs decode (1..64 rows) of Q4_K/Q6_K takes the Pallas kernels. `of`:
        this weight is layer `of.index` of the stack `of.stack`, which the kernels read in place.

        Up to MATVEC_MAX_ROWS rows every backend multiplies the float32 weight values, whatever
        x's dtype (x widened exactly, float32 sums, the result rounded to x's dtype): what
        `matvec_fused` computes. More rows: the weights rounded to x's dtype for the dot.
        """
        rows = math.prod(x.shape[:-1])
        fused = rows <= MATVEC_MAX_ROWS
        if _cpu_native(self):  # native kernels beat XLA at every row count
            if fused and x.dtype != jnp.float32:
                # the float32 kernels: the bfloat16 ones round every weight first (2-core CPU,
                # 0.1b Q4_K_M bfloat16 engine, tg128 in 15 interleaved rounds with llama.cpp,
                # experiments/paired.py: 131.6 -> 145.2 tok/s, 0.93x -> 1.03x)
                return super().matmul(x.astype(jnp.float32), of).astype(x.dtype)
            return super().matmul(x, of)
        if fused and backends.current_profile().matvec == "fused":  # what Metal runs
            return self.matvec_fused(x)
        dot = super()._matmul_xla
        # lambdas: platform_dependent hashes its branches, and a Module holding tracers is not
        # hashable (its bound methods neither)
        branches = dict(cpu=lambda x: dot(x), default=lambda x: dot(x))
        if fused:
            # XLA:CPU's dot on float32 values (its fused reduction is 4x slower)
            branches["cpu"] = lambda x: dot(x.astype(jnp.float32)).astype(x.dtype)
            branches["default"] = lambda x: self.matvec_fused(x)
        if gpu_kernels.supports(self, rows, x.dtype):
            # NVIDIA: Pallas kernels that unpack each packed byte once (rwkv_jax/gpu_kernels.py)
            w, layer = (self, None) if of is None else (of.stack, of.index)
            branches["cuda"] = lambda x: gpu_kernels.matmul(w, x, layer=layer).astype(x.dtype)
        elif not fused:
            return dot(x)
        return lax.platform_dependent(x, **branches)


class LayerOf(eqx.Module):
    """Layer `index` (a traced int32 scalar) of a stacked weight, in the scan over layers.

    XLA reads the scan's slice of a layer in place where a fusion consumes it, but copies it out
    of the stack before a custom call: the GPU and native CPU kernels take the whole stack and
    the index instead (gpu_kernels.matmul's `layer`, cpu_kernels.matmul's `index`); every other
    path uses the slice, unchanged. Has the `matmul` of a Weight.
    """

    layer: Weight  # the scan's slice: fields [...]
    stack: Weight  # fields [L, ...]
    index: Array  # int32 []

    def matmul(self, x: Array) -> Array:
        """x @ W_index^T, as the unstacked layer's matmul computes it."""
        return self.layer.matmul(x, of=self)


def matmul_group(pairs: Sequence[tuple[Weight | LayerOf, Array]]) -> list[Array]:
    """[x @ W^T for (W, x) in pairs], each in its x's dtype.

    On NVIDIA GPUs matrices of one Pallas format and shape (the receptance, key and value of a
    layer), with inputs of one shape, run in one launch (gpu_kernels.matmul_group): each C x C
    matvec is too small to keep the GPU's memory busy alone. Anything else, and every other
    backend, takes one `matmul` per pair.
    """
    ws, xs = [w for w, _ in pairs], [x for _, x in pairs]

    def separate(*xs):
        return tuple(w.matmul(x) for w, x in zip(ws, xs, strict=True))

    if _groupable(pairs) is None:
        return list(separate(*xs))

    def grouped(*xs):
        ys = group_partials(list(zip(ws, xs, strict=True)), summed=True)
        return tuple(y.astype(x.dtype) for y, x in zip(ys, xs, strict=True))  # type: ignore

    return list(lax.platform_dependent(*xs, cuda=grouped, default=separate))


def _groupable(pairs: Sequence[tuple[Weight | LayerOf, Array]], least: int = 2):
    """(weights or stacks, layer index or None) when `pairs` (at least `least` of them) can run
    as one Pallas launch on CUDA (see matmul_group), else None."""
    ws, xs = [w for w, _ in pairs], [x for _, x in pairs]
    stacked = isinstance(ws[0], LayerOf)
    layers = [w.layer if isinstance(w, LayerOf) else w for w in ws]
    w0, x0 = layers[0], xs[0]
    alike = (
        len(pairs) >= least
        and all(type(w) is type(w0) and w.shape == w0.shape for w in layers)
        and all(isinstance(w, LayerOf) == stacked for w in ws)
        and (not stacked or all(w.index is ws[0].index for w in ws))  # type: ignore[union-attr]
        and all(x.shape == x0.shape and x.dtype == x0.dtype for x in xs)
    )
    rows = math.prod(x0.shape[:-1])
    if (
        not alike
        or _cpu_native(w0)
        or backends.current_profile().matvec == "fused"  # Metal: the program it compiles
        or not gpu_kernels.supports(w0, rows, x0.dtype)
    ):
        return None
    operands = [w.stack for w in ws] if stacked else layers  # type: ignore[union-attr]
    return operands, (ws[0].index if stacked else None)  # type: ignore[union-attr]


def group_partials(
    pairs: Sequence[tuple[Weight | LayerOf, Array]], summed: bool = False, split: int | None = None
) -> Array | list[Array] | None:
    """For a CUDA branch: the one-launch products of `pairs` (one pair too) as the kernel's
    split-K partial sums, float32 [G, parts, out, M] (gpu_kernels.matmul_group's `partials`), or
    summed per pair (float32 [..., out]); None when they do not run as one launch (see
    matmul_group)."""
    group = _groupable(pairs, least=1)
    if group is None:
        return None
    operands, index = group
    xs = [x for _, x in pairs]
    return gpu_kernels.matmul_group(operands, xs, layer=index, partials=not summed, split=split)


def _cpu_native(w: Weight) -> bool:
    """Native kernels: the CPU backend (no build on accelerator hosts), a layout they know, and
    not the metal-safe profile (which must run exactly the program a Mac compiles)."""
    return (
        jax.default_backend() == "cpu"
        and backends.current_profile().matvec == "platform"
        and cpu_kernels.supports(w)
    )


class _Dense(Weight):
    """An unquantized format: one array `w` [out, in] in its own dtype."""

    w: eqx.AbstractVar[Array]
    BLOCK_ELEMS = 1

    def _decode(self) -> Array:
        """The stored values as they are."""
        return self.w

    def matmul(self, x: Array, of: LayerOf | None = None) -> Array:
        """x @ W^T; for a few rows on NVIDIA GPUs as multiply + reduce (the LoRA matrices).

        XLA runs a dot of 2..4 rows as a Triton GEMM fusion, and the scan over stacked layers
        then copies each layer's matrix (and the vectors fused into the GEMM's prologue) out of
        the stack first: 15 copies per layer at B = 4 (H200 trace). A reduction reads them in
        place, as XLA itself does for one row. Values: float32 products of the stored values
        (the dot rounds them to x's dtype first).
        """
        rows = math.prod(x.shape[:-1])
        # Metal (matvec "fused"): the dot, in a program without a conditional
        if (
            _cpu_native(self)
            or rows > MATVEC_MAX_ROWS
            or backends.current_profile().matvec == "fused"
        ):
            return super().matmul(x, of)
        dot = super()._matmul_xla
        # lambdas: platform_dependent hashes its branches, and a Module holding tracers is not
        return lax.platform_dependent(
            x, cuda=lambda x: self.matvec_fused(x), default=lambda x: dot(x)
        )


# ---------------------------------------------------------------------------------------------
# Dense formats


@final
class F32(_Dense):
    """ggml F32: IEEE binary32."""

    w: Array  # f32 [out, in]
    GGML_TYPE = GGMLQuantizationType.F32
    BLOCK = np.dtype([("w", "<f4")])


@final
class F16(_Dense):
    """ggml F16: IEEE binary16 (subnormals kept)."""

    w: Array  # f16 [out, in]
    GGML_TYPE = GGMLQuantizationType.F16
    BLOCK = np.dtype([("w", "<f2")])


@final
class BF16(_Dense):
    """ggml BF16: bfloat16 (top half of a binary32)."""

    w: Array  # bf16 [out, in]
    GGML_TYPE = GGMLQuantizationType.BF16
    BLOCK = np.dtype([("w", ml_dtypes.bfloat16)])


# ---------------------------------------------------------------------------------------------
# Legacy 32-element blocks: x = d * q (+ m)


@final
class Q4_0(_Blocked):
    """block_q4_0 {f16 d; u8 qs[16]}: x = d * (nibble - 8)."""

    d: Array  # f16 [out, nb]
    qs: Array  # u8 [out, nb, 16]
    GGML_TYPE = GGMLQuantizationType.Q4_0
    BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
    BLOCK_ELEMS = 32

    def _blocks(self) -> Array:
        """Dequantize blocks -> [..., nb, 32]."""
        q = _nibbles(self.qs).astype(jnp.int8) - 8  # [..., nb, 32] in -8..7
        return _f32(self.d)[..., None] * _f32(q)


@final
class Q4_1(_Blocked):
    """block_q4_1 {f16 d; f16 m; u8 qs[16]}: x = d * nibble + m."""

    d: Array  # f16 [out, nb]
    m: Array  # f16 [out, nb]
    qs: Array  # u8 [out, nb, 16]
    GGML_TYPE = GGMLQuantizationType.Q4_1
    BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])
    BLOCK_ELEMS = 32

    def _blocks(self) -> Array:
        """Dequantize blocks -> [..., nb, 32]."""
        q = _f32(_nibbles(self.qs))  # [..., nb, 32] in 0..15
        return _f32(self.d)[..., None] * q + _f32(self.m)[..., None]


def _q5_values(qh: Array, qs: Array) -> Array:
    """5-bit values [..., 32] of a q5_0/q5_1 block: nibble | (bit e of le32(qh)) << 4."""
    # [..., 4, 8] -> [..., 32]: element 8*byte + bit, i.e. bit e of the little-endian u32
    h = _flatten_last(_split_bits(qh, tuple(range(8)), 0x1, axis=-1), 2)
    return _nibbles(qs) | (h << 4)


@final
class Q5_0(_Blocked):
    """block_q5_0 {f16 d; u8 qh[4]; u8 qs[16]}: x = d * (q5 - 16)."""

    d: Array  # f16 [out, nb]
    qh: Array  # u8 [out, nb, 4]
    qs: Array  # u8 [out, nb, 16]
    GGML_TYPE = GGMLQuantizationType.Q5_0
    BLOCK = np.dtype([("d", "<f2"), ("qh", "u1", (4,)), ("qs", "u1", (16,))])
    BLOCK_ELEMS = 32

    def _blocks(self) -> Array:
        """Dequantize blocks -> [..., nb, 32]."""
        q = _q5_values(self.qh, self.qs).astype(jnp.int8) - 16  # -16..15
        return _f32(self.d)[..., None] * _f32(q)


@final
class Q5_1(_Blocked):
    """block_q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]}: x = d * q5 + m."""

    d: Array  # f16 [out, nb]
    m: Array  # f16 [out, nb]
    qh: Array  # u8 [out, nb, 4]
    qs: Array  # u8 [out, nb, 16]
    GGML_TYPE = GGMLQuantizationType.Q5_1
    BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "u1", (4,)), ("qs", "u1", (16,))])
    BLOCK_ELEMS = 32

    def _blocks(self) -> Array:
        """Dequantize blocks -> [..., nb, 32]."""
        q = _f32(_q5_values(self.qh, self.qs))  # 0..31
        return _f32(self.d)[..., None] * q + _f32(self.m)[..., None]


@final
class Q8_0(_Blocked):
    """block_q8_0 {f16 d; i8 qs[32]}: x = d * qs."""

    d: Array  # f16 [out, nb]
    qs: Array  # i8 [out, nb, 32]
    GGML_TYPE = GGMLQuantizationType.Q8_0
    BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])
    BLOCK_ELEMS = 32

    def _blocks(self) -> Array:
        """Dequantize blocks -> [..., nb, 32]."""
        return _f32(self.d)[..., None] * _f32(self.qs)


# ---------------------------------------------------------------------------------------------
# K-quants: super-blocks of 256 = 16 sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 8 of 32 (Q4_K, Q5_K)


def _low_crumbs_16x16(qs: Array) -> Array:
    """Q2_K/Q3_K 2-bit values: qs [..., 64] -> [..., 16, 16] (sub-block, element)."""
    # [..., 2, 32] halves of 128 elements -> [..., 2, 4, 32] (half, shift j, l) -> 16 x 16
    q = _crumbs(qs.reshape(qs.shape[:-1] + (2, 32)))
    return q.reshape(q.shape[:-3] + (16, 16))


@final
class Q2_K(_Blocked):
    """block_q2_K {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}: x = d*sc*q - dmin*mn."""

    scales: Array  # u8 [out, nb, 16]: low nibble scale, high nibble min, per 16 elements
    qs: Array  # u8 [out, nb, 64]
    d: Array  # f16 [out, nb]
    dmin: Array  # f16 [out, nb]
    GGML_TYPE = GGMLQuantizationType.Q2_K
    BLOCK = np.dtype([("scales", "u1", (16,)), ("qs", "u1", (64,)), ("d", "<f2"), ("dmin", "<f2")])
    BLOCK_ELEMS = QK_K

    def _blocks(self) -> Array:
        """Dequantize super-blocks -> [..., nb, 256]."""
        # per-sub-block scale and offset [..., nb, 16, 1], rounded to f32 first as ggml does
        scales = _bytes(self.scales)
        dl = (_f32(self.d)[..., None] * _f32(scales & 0xF))[..., None]
        ml = (_f32(self.dmin)[..., None] * _f32(scales >> 4))[..., None]
        q = _f32(_low_crumbs_16x16(self.qs))  # [..., nb, 16, 16]
        return _flatten_last(dl * q - ml, 2)


@final
class Q3_K(_Blocked):
    """block_q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: x = d*sc*(q2 - 4*!hbit)."""

    hmask: Array  # u8 [out, nb, 32]: high bit of each 3-bit value (set = no -4 offset)
    qs: Array  # u8 [out, nb, 64]: low 2 bits
    scales: Array  # u8 [out, nb, 12]: 16 packed 6-bit signed scales
    d: Array  # f16 [out, nb]
    GGML_TYPE = GGMLQuantizationType.Q3_K
    BLOCK = np.dtype(
        [("hmask", "u1", (32,)), ("qs", "u1", (64,)), ("scales", "u1", (12,)), ("d", "<f2")]
    )
    BLOCK_ELEMS = QK_K

    def _blocks(self) -> Array:
        """Dequantize super-blocks -> [..., nb, 256]."""
        # sub-block t: low 4 bits from nibbles of bytes 0-7, high 2 bits from bytes 8-11
        lo = _nibbles(self.scales[..., :8])  # [..., nb, 16]
        hi = _flatten_last(_crumbs(self.scales[..., 8:]), 2)  # [..., nb, 16]: t = 4*shift + k
        sc = (lo | (hi << 4)).astype(jnp.int8) - 32  # -32..31
        dl = (_f32(self.d)[..., None] * _f32(sc))[..., None]  # [..., nb, 16, 1]
        q2 = _low_crumbs_16x16(self.qs).astype(jnp.int8)  # [..., nb, 16, 16]
        # bit plane 4*half + j of hmask covers elements 32*(4*half + j) + l
        hb = _bit_planes(self.hmask)  # [..., nb, 8, 32]
        hb = hb.reshape(hb.shape[:-2] + (16, 16))
        q = q2 - ((hb ^ 1) << 2).astype(jnp.int8)  # -4..3
        return _flatten_last(dl * _f32(q), 2)


def _q45k_scales(d: Array, dmin: Array, scales: Array) -> tuple[Array, Array]:
    """Q4_K/Q5_K per-sub-block scale d*sc and offset dmin*mn, each f32 [..., nb, 8, 1]."""
    sc, mn = _scale_min_k4(scales)
    dl = _f32(d)[..., None] * _f32(sc)
    ml = _f32(dmin)[..., None] * _f32(mn)
    return dl[..., None], ml[..., None]


def _q4k_nibbles(qs: Array) -> Array:
    """Q4_K/Q5_K low nibbles: qs [..., 128] -> [..., 8, 32] (sub-block t = 2g + hi, l)."""
    q = _split_bits(qs.reshape(qs.shape[:-1] + (4, 32)), (0, 4), 0xF, axis=-2)  # [..., 4, 2, 32]
    return q.reshape(q.shape[:-3] + (8, 32))


@final
class Q4_K(_Blocked):
    """block_q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}: x = d*sc*q - dmin*mn."""

    d: Array  # f16 [out, nb]
    dmin: Array  # f16 [out, nb]
    scales: Array  # u8 [out, nb, 12]: 8 packed 6-bit (scale, min) pairs
    qs: Array  # u8 [out, nb, 128]
    GGML_TYPE = GGMLQuantizationType.Q4_K
    BLOCK = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (128,))])
    BLOCK_ELEMS = QK_K
    WORD_FIELDS = ("qs",)

    def _blocks(self) -> Array:
        """Dequantize super-blocks -> [..., nb, 256]."""
        dl, ml = _q45k_scales(self.d, self.dmin, self.scales)  # [..., nb, 8, 1]
        q = _f32(_q4k_nibbles(_unwords(self.qs)))  # [..., nb, 8, 32]
        return _flatten_last(dl * q - ml, 2)


@final
class Q5_K(_Blocked):
    """block_q5_K {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: as Q4_K, 5-bit q."""

    d: Array  # f16 [out, nb]
    dmin: Array  # f16 [out, nb]
    scales: Array  # u8 [out, nb, 12]
    qh: Array  # u8 [out, nb, 32]: bit t of qh[l] is the 5th bit of element 32*t + l
    qs: Array  # u8 [out, nb, 128]
    GGML_TYPE = GGMLQuantizationType.Q5_K
    BLOCK = np.dtype(
        [
            ("d", "<f2"),
            ("dmin", "<f2"),
            ("scales", "u1", (12,)),
            ("qh", "u1", (32,)),
            ("qs", "u1", (128,)),
        ]
    )
    BLOCK_ELEMS = QK_K

    def _blocks(self) -> Array:
        """Dequantize super-blocks -> [..., nb, 256]."""
        dl, ml = _q45k_scales(self.d, self.dmin, self.scales)  # [..., nb, 8, 1]
        q = _q4k_nibbles(self.qs) | (_bit_planes(self.qh) << 4)  # [..., nb, 8, 32] in 0..31
        return _flatten_last(dl * _f32(q) - ml, 2)


@final
class Q6_K(_Blocked):
    """block_q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: x = d*sc*(q6 - 32)."""

    ql: Array  # u8 [out, nb, 128]: low 4 bits
    qh: Array  # u8 [out, nb, 64]: high 2 bits
    scales: Array  # i8 [out, nb, 16]
    d: Array  # f16 [out, nb]
    GGML_TYPE = GGMLQuantizationType.Q6_K
    BLOCK = np.dtype(
        [("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)), ("d", "<f2")]
    )
    BLOCK_ELEMS = QK_K
    WORD_FIELDS = ("ql", "qh")

    def _blocks(self) -> Array:
        """Dequantize super-blocks -> [..., nb, 256]."""
        # low nibbles: per half of 128, [2 (low/high nibble), 64 (ql bytes)] = 4 runs of 32,
        # run c = 2*nibble + (l >= 32) -> [..., 2, 2, 64] -> [..., 8, 32]
        ql, qh = _unwords(self.ql), _unwords(self.qh)
        ql = ql.reshape(ql.shape[:-1] + (2, 64))
        lo = _split_bits(ql, (0, 4), 0xF, axis=-2)
        lo = lo.reshape(lo.shape[:-3] + (8, 32))
        # high crumbs: per half, qh[32*half + l] >> 2c -> [..., 2, 4, 32] -> [..., 8, 32]
        hi = _crumbs(qh.reshape(qh.shape[:-1] + (2, 32)))
        hi = hi.reshape(hi.shape[:-3] + (8, 32))
        q = (lo | (hi << 4)).astype(jnp.int8) - 32  # [..., nb, 8, 32] in -32..31
        q = q.reshape(q.shape[:-2] + (16, 16))
        dl = (_f32(self.d)[..., None] * _f32(self.scales))[..., None]  # [..., nb, 16, 1]
        return _flatten_last(dl * _f32(q), 2)


# ---------------------------------------------------------------------------------------------
# Registry

FORMATS: dict[int, type[Weight]] = {
    int(cls.GGML_TYPE): cls
    for cls in (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
}

_REQUANT_HINT = (
    "re-quantize from the F16/BF16/F32 GGUF to a supported type, "
    "e.g. `llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M`"
)


def _type_name(ggml_type: int) -> str:
    """ggml type name for messages ('unknown' for ids gguf does not know)."""
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return "unknown"


def block_info(ggml_type: int) -> tuple[int, int]:
    """(elements, bytes) per block of any ggml type gguf knows, supported or not."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise UnsupportedTypeError(
            f"ggml type id {ggml_type} is unknown to gguf {_gguf_version()}; the file was written "
            "by a newer tool or is corrupt"
        ) from None


def _gguf_version() -> str:
    """Installed gguf package version, for messages."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


def check_raw(cls: type[Weight], raw: np.ndarray, shape: tuple[int, int], name: str):
    """Validate raw bytes against (out, in) for format `cls`; return (out, in)."""
    fmt = cls.GGML_TYPE.name
    if len(shape) != 2 or any(int(s) <= 0 for s in shape):
        raise GGUFError(f"tensor '{name}': expected a 2-D (out, in) shape, got {tuple(shape)}")
    out, n_in = int(shape[0]), int(shape[1])
    if n_in % cls.BLOCK_ELEMS:
        raise GGUFError(
            f"tensor '{name}' ({fmt}): row length {n_in} (ggml ne[0]) is not a multiple of the "
            f"{fmt} block size {cls.BLOCK_ELEMS}; the file is malformed"
        )
    if raw.dtype != np.uint8:
        raise GGUFError(f"tensor '{name}': raw data must be uint8 bytes, got {raw.dtype}")
    row_bytes = cls.row_bytes(n_in)
    if raw.ndim <= 1 and raw.size != out * row_bytes:
        raise GGUFError(
            f"tensor '{name}' ({fmt}, shape {out}x{n_in}) needs {out * row_bytes} bytes but "
            f"{raw.size} were given; the file is truncated or its tensor table is wrong"
        )
    if raw.ndim > 1 and raw.shape[-2:] != (out, row_bytes):
        raise GGUFError(
            f"tensor '{name}' ({fmt}, shape {out}x{n_in}) needs bytes shaped [..., {out}, "
            f"{row_bytes}] but got {raw.shape}; the file is truncated or its tensor table is wrong"
        )
    return out, n_in


def format_class(ggml_type: int, name: str) -> type[Weight]:
    """The Weight class of ggml type `ggml_type` (tensor `name`, for the error message)."""
    cls = FORMATS.get(int(ggml_type))
    if cls is None:
        supported = ", ".join(c.GGML_TYPE.name for c in FORMATS.values())
        raise UnsupportedTypeError(
            f"tensor '{name}' has ggml type {_type_name(ggml_type)} ({int(ggml_type)}), which "
            f"rwkv_jax cannot unpack; supported: {supported}; {_REQUANT_HINT}"
        )
    return cls


def weight_from_raw(raw: np.ndarray, ggml_type: int, shape: tuple[int, int], name: str) -> Weight:
    """Build the packed weight for GGUF tensor `name` of ggml type `ggml_type` from its bytes."""
    return format_class(ggml_type, name).from_raw(raw, shape, name=name)


_DENSE_BY_DTYPE: dict[np.dtype, type[Weight]] = {
    np.dtype(np.float32): F32,
    np.dtype(np.float16): F16,
    np.dtype(ml_dtypes.bfloat16): BF16,
}


def dense_weight(w: Array) -> Weight:
    """Wrap dense values [..., out, in] (float32/float16/bfloat16) as an F32/F16/BF16 weight."""
    cls = _DENSE_BY_DTYPE.get(np.dtype(w.dtype))
    if cls is None or w.ndim < 2:
        raise ValueError(
            f"dense_weight needs float32/16 or bfloat16 [..., out, in], got {w.dtype} {w.shape}"
        )
    return cls(shape=(int(w.shape[-2]), int(w.shape[-1])), w=w)  # type: ignore[call-arg]


def stack(weights: list[W]) -> W:
    """Stack same-format, same-shape weights along a new leading axis (for lax.scan)."""
    if not weights:
        raise ValueError("stack needs at least one weight")
    first = weights[0]
    for i, w in enumerate(weights[1:], start=1):
        if type(w) is not type(first) or w.shape != first.shape:
            raise ValueError(
                f"cannot stack weight {i} ({w.format_name} {w.shape}) with weight 0 "
                f"({first.format_name} {first.shape}): formats and shapes must match"
            )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *weights)
