"""GGUF reading for `rwkv7` files: validation, the one name table, and the model config.

The `gguf` package's reader parses the container over mmap; this module checks that what it found
is a usable RWKV-7 model and fixes ggml's dimension order (``ne[0]`` fastest) once: every 2-D
tensor leaves here as ``(rows, row_bytes)`` bytes plus a PyTorch-convention ``(out, in)`` shape.

Model files come from strangers, so reading is defensive (`open_reader`): every read is
bounds-checked, every declared count or length is compared with the bytes that follow before
anything loops or allocates, and the tensor table (types, sizes, alignment, bounds, overlap,
duplicates) is checked before a single view is made. Every problem is one `GGUFError` (or
`UnsupportedTypeError`) whose one-line message names the file, the key or tensor, and the fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
import os
import re
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from rwkv_jax.errors import GGUFError, UnsupportedTypeError

ARCH = "rwkv7"
# ggml types a vector (norms, biases, w0/a0/v0, lerps, k_k, k_a, r_k) may use: the converter
# writes them F32 and llama-quantize never touches them.
VECTOR_TYPES = (
    int(gguf.GGMLQuantizationType.F32),
    int(gguf.GGMLQuantizationType.F16),
    int(gguf.GGMLQuantizationType.BF16),
)

# --------------------------------------------------------------------------------------------
# The name table: GGUF tensor name -> field of the params pytree (rwkv_jax/params.py).
# Global tensors map to top-level fields, per-layer tensors (``blk.N.``) to fields of a block.
# ``kind`` says how the loader treats the tensor: "vec" = 1-D float vector, "lerp" = the fused
# 6-way token-shift coefficients, "mat" = 2-D matrix kept in its file format (packed if quantized).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Where one GGUF tensor goes and what shape (ggml ``ne`` order) it must have."""

    gguf_name: str  # suffix after "blk.N." for layer tensors
    field: str  # params field name (paper / BlinkDL names)
    kind: str  # "vec" | "lerp" | "mat"
    ne: tuple[str, ...]  # symbolic dims in ggml order, resolved against ModelConfig


GLOBAL_TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec("token_embd.weight", "emb", "mat", ("C", "V")),
    TensorSpec("token_embd_norm.weight", "ln0_w", "vec", ("C",)),
    TensorSpec("token_embd_norm.bias", "ln0_b", "vec", ("C",)),
    TensorSpec("output_norm.weight", "ln_out_w", "vec", ("C",)),
    TensorSpec("output_norm.bias", "ln_out_b", "vec", ("C",)),
    TensorSpec("output.weight", "head", "mat", ("C", "V")),
)

LAYER_TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec("attn_norm.weight", "ln1_w", "vec", ("C",)),
    TensorSpec("attn_norm.bias", "ln1_b", "vec", ("C",)),
    TensorSpec("attn_norm_2.weight", "ln2_w", "vec", ("C",)),
    TensorSpec("attn_norm_2.bias", "ln2_b", "vec", ("C",)),
    TensorSpec("time_mix_lerp_fused.weight", "x_rwkvag", "lerp", ("C", "1", "1", "6")),
    TensorSpec("time_mix_w0.weight", "w0", "vec", ("C",)),
    TensorSpec("time_mix_w1.weight", "w1", "mat", ("C", "Dw")),
    TensorSpec("time_mix_w2.weight", "w2", "mat", ("Dw", "C")),
    TensorSpec("time_mix_a0.weight", "a0", "vec", ("C",)),
    TensorSpec("time_mix_a1.weight", "a1", "mat", ("C", "Da")),
    TensorSpec("time_mix_a2.weight", "a2", "mat", ("Da", "C")),
    TensorSpec("time_mix_v0.weight", "v0", "vec", ("C",)),
    TensorSpec("time_mix_v1.weight", "v1", "mat", ("C", "Dv")),
    TensorSpec("time_mix_v2.weight", "v2", "mat", ("Dv", "C")),
    TensorSpec("time_mix_g1.weight", "g1", "mat", ("C", "Dg")),
    TensorSpec("time_mix_g2.weight", "g2", "mat", ("Dg", "C")),
    TensorSpec("time_mix_k_k.weight", "k_k", "vec", ("C",)),
    TensorSpec("time_mix_k_a.weight", "k_a", "vec", ("C",)),
    TensorSpec("time_mix_r_k.weight", "r_k", "vec", ("C",)),
    TensorSpec("time_mix_receptance.weight", "receptance", "mat", ("C", "C")),
    TensorSpec("time_mix_key.weight", "key", "mat", ("C", "C")),
    TensorSpec("time_mix_value.weight", "value", "mat", ("C", "C")),
    TensorSpec("time_mix_output.weight", "output", "mat", ("C", "C")),
    TensorSpec("time_mix_ln.weight", "ln_x_w", "vec", ("C",)),
    TensorSpec("time_mix_ln.bias", "ln_x_b", "vec", ("C",)),
    TensorSpec("channel_mix_lerp_k.weight", "ffn_x_k", "vec", ("C",)),
    TensorSpec("channel_mix_key.weight", "ffn_key", "mat", ("C", "F")),
    TensorSpec("channel_mix_value.weight", "ffn_value", "mat", ("F", "C")),
)

# Layer 0's value-residual LoRA is a dummy: the converter writes copies of a0/a1/a2 under the v
# names (so v1/v2 have the iclr rank there) and no implementation ever uses them.
LAYER0_DUMMY_RANK = {"v1": "Da", "v2": "Da"}

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

KEY = {
    "context_length": f"{ARCH}.context_length",
    "n_embd": f"{ARCH}.embedding_length",
    "n_layer": f"{ARCH}.block_count",
    "ffn": f"{ARCH}.feed_forward_length",
    "head_size": f"{ARCH}.wkv.head_size",
    "eps": f"{ARCH}.attention.layer_norm_epsilon",
    "rank_w": f"{ARCH}.attention.decay_lora_rank",
    "rank_a": f"{ARCH}.attention.iclr_lora_rank",
    "rank_v": f"{ARCH}.attention.value_residual_mix_lora_rank",
    "rank_g": f"{ARCH}.attention.gate_lora_rank",
    "head_count": f"{ARCH}.attention.head_count",
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one RWKV-7 model, read only from GGUF metadata and tensor shapes."""

    n_layer: int
    n_embd: int  # C
    ffn: int  # F (4*C in released models)
    head_size: int  # N (64)
    vocab_size: int  # V (rows of token_embd)
    rank_w: int  # decay LoRA rank Dw
    rank_a: int  # iclr LoRA rank Da
    rank_v: int  # value-residual LoRA rank Dv
    rank_g: int  # gate LoRA rank Dg
    layer_norm_eps: float = 1e-5
    file_type: int = -1  # general.file_type (llama_ftype), -1 when absent
    name: str = ""

    @property
    def n_head(self) -> int:
        """H = C / N."""
        return self.n_embd // self.head_size

    @property
    def group_norm_eps(self) -> float:
        """ln_x epsilon: N * 1e-5 = 64e-5 in every implementation (spec §1.4-9)."""
        return self.head_size * 1e-5

    def dims(self) -> dict[str, int]:
        """Symbolic dimension names of the name table -> sizes."""
        return {
            "C": self.n_embd,
            "V": self.vocab_size,
            "F": self.ffn,
            "Dw": self.rank_w,
            "Da": self.rank_a,
            "Dv": self.rank_v,
            "Dg": self.rank_g,
            "1": 1,
            "6": 6,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON results and state metadata)."""
        return dataclasses.asdict(self)


def lora_rank(n_embd: int, exponent: float, multiplier: float) -> int:
    """The converter's default LoRA rank: max(1, round(C^e * m / 32)) * 32."""
    return max(1, round(n_embd**exponent * multiplier / 32)) * 32


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: type, ggml dims, and a zero-copy view of its bytes."""

    name: str
    ggml_type: int
    ne: tuple[int, ...]  # ggml order, ne[0] contiguous
    data: np.ndarray  # uint8 view into the mmap, exactly n_bytes long

    @property
    def type_name(self) -> str:
        """ggml type name, e.g. 'Q4_K' (or the number for unknown ids)."""
        try:
            return gguf.GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return str(self.ggml_type)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """PyTorch-convention shape (reverse of ne): (out, in) for matrices."""
        return tuple(reversed(self.ne))

    @property
    def n_bytes(self) -> int:
        """Bytes of data in the file."""
        return int(self.data.size)

    def rows(self) -> np.ndarray:
        """Bytes as (rows, row_bytes): one row per ``ne[0]`` run, in file order."""
        n_rows = int(np.prod(self.ne[1:], dtype=np.int64)) if len(self.ne) > 1 else 1
        return self.data.reshape(n_rows, -1)


# --------------------------------------------------------------------------------------------
# Checked reading. Model files come from strangers: every count, length and offset the file
# declares is checked against the bytes that actually follow before anything is looped over or
# allocated, and every failure is a GGUFError naming the offset, key or tensor. The parser is
# gguf-py's GGUFReader; `_CheckedReader` only wraps its internal steps (checks + translation of
# its exceptions) and replaces its per-element loop for arrays of strings and scalars by a fast
# path that returns the same ReaderField parts (tests/test_robustness.py proves equality).
# --------------------------------------------------------------------------------------------

# What a file may declare before we believe it. Released rwkv7 files are far below every limit
# (25 keys, 6 + 28 * n_layer tensors, 65536-entry vocabulary arrays).
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 16
MAX_KEY_BYTES = 65535  # gguf.cpp: keys are at most 65535 bytes
MAX_NAME_BYTES = 63  # ggml GGML_MAX_NAME = 64 including the NUL
MAX_STRING_BYTES = 1 << 24  # one string value (chat templates are a few kB)
MAX_ARRAY_LEN = 1 << 20  # elements of one metadata array
MAX_ARRAY_TOTAL = 1 << 22  # elements of all metadata arrays (each costs a numpy view)
MAX_ARRAY_DEPTH = 2  # arrays of arrays of scalars at most
MAX_DIMS = 4  # ggml GGML_MAX_DIMS
HEADER_BYTES = 24  # magic, version, tensor count, kv count

_V = gguf.GGUFValueType
# Fewest bytes one value of each type occupies: an array of n elements needs n times this.
_MIN_VALUE_BYTES = {
    **{
        t: int(np.dtype(d).itemsize)
        for t, d in getattr(gguf.GGUFReader, "gguf_scalar_to_np", {}).items()
    },
    _V.STRING: 8,  # u64 length, no bytes
    _V.ARRAY: 12,  # u32 element type + u64 count, no elements
}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one ne, type, offset


def _reader_internals_ok() -> bool:
    """True when the installed gguf reader has the internals _CheckedReader builds on."""
    import inspect

    want = {
        "_get": ["self", "offset", "dtype", "count", "override_order"],
        "_get_field_parts": ["self", "orig_offs", "raw_type"],
        "_build_fields": ["self", "offs", "count"],
        "_build_tensor_info": ["self", "offs", "count"],
        "_get_tensor_info_field": ["self", "orig_offs"],
        "_build_tensors": ["self", "start_offs", "fields"],
    }
    try:
        for name, params in want.items():
            got = list(inspect.signature(getattr(gguf.GGUFReader, name)).parameters)
            if got != params:
                return False
        return gguf.ReaderField._fields == ("offset", "name", "parts", "data", "types") and all(
            hasattr(gguf.GGUFReader, a) for a in ("gguf_scalar_to_np", "byte_order", "alignment")
        )
    except (AttributeError, TypeError, ValueError):
        return False


def _quoted(name: str, limit: int = 64) -> str:
    """A name from the file, quoted for a one-line message (escapes control characters)."""
    short = name if len(name) <= limit else name[:limit] + "..."
    return f"'{short}'" if short.isprintable() else repr(short)


def _key_at(data: np.ndarray, offs: int) -> str:
    """Best-effort quoted key/name stored as a GGUF string at offs (for error messages)."""
    if offs + 8 > data.size:
        return "'?'"
    n = int(np.asarray(data[offs : offs + 8]).view("<u8")[0])
    if n > MAX_KEY_BYTES:
        return "'?'"
    return _quoted(bytes(data[offs + 8 : offs + 8 + min(n, 65)]).decode("utf-8", "replace"))


class _CheckedReader(gguf.GGUFReader):
    """gguf.GGUFReader with every read bounds-checked and every declared size sanity-checked."""

    def __init__(self, path: str):
        self._elems_left = MAX_ARRAY_TOTAL
        self._depth = 0
        self._tensor_index = 0
        super().__init__(path, "r")

    def _plain(self) -> np.ndarray:
        """The mmap as a plain uint8 ndarray (slicing np.memmap costs ~7x more)."""
        plain = getattr(self, "_plain_data", None)
        if plain is None:
            plain = self._plain_data = np.asarray(self.data)
        return plain

    def _get(self, offset, dtype, count=1, override_order=None):
        """Base read, after checking that count items at offset lie inside the file."""
        offset, count = int(offset), int(count)
        end = offset + np.dtype(dtype).itemsize * count
        if offset < 0 or count < 0 or end > self.data.size:
            raise GGUFError(
                f"truncated or corrupt: {count} x {np.dtype(dtype).name} at offset {offset} "
                f"would end at byte {end}, past the end of the file ({self.data.size} bytes)"
            )
        return super()._get(offset, dtype, count, override_order)

    def _value_type(self, raw: Any, offs: int) -> gguf.GGUFValueType:
        """The GGUFValueType of a raw id, or GGUFError naming it."""
        try:
            return _V(int(raw))
        except ValueError:
            raise GGUFError(
                f"unknown value type {int(raw)} at offset {offs} (GGUF defines 0..12)"
            ) from None

    def _get_field_parts(self, orig_offs, raw_type):
        """Checked value parsing; arrays of strings or scalars take a vectorised fast path."""
        gtype = self._value_type(raw_type, orig_offs)
        if gtype == _V.STRING:
            n = int(self._get(orig_offs, np.uint64)[0])
            if n > MAX_STRING_BYTES:
                raise GGUFError(
                    f"string at offset {orig_offs} declares {n} bytes (limit {MAX_STRING_BYTES})"
                )
        if gtype != _V.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype = self._value_type(raw_itype[0], orig_offs)
        n, start = int(alen[0]), orig_offs + 12
        # Before looping: n elements need at least n * (smallest element) bytes.
        need, left = n * _MIN_VALUE_BYTES[itype], self.data.size - start
        if need > left:
            raise GGUFError(
                f"array at offset {orig_offs} declares {n} {itype.name} elements (at least "
                f"{need} bytes) but only {left} bytes follow: the file is truncated or corrupt"
            )
        if n > MAX_ARRAY_LEN or n > self._elems_left:
            raise GGUFError(
                f"array at offset {orig_offs} declares {n} elements; rwkv_jax reads at most "
                f"{MAX_ARRAY_LEN} per array and {MAX_ARRAY_TOTAL} in all (an rwkv7 "
                "vocabulary has 65536)"
            )
        self._elems_left -= n
        if itype == _V.ARRAY:
            if self._depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(
                    f"arrays nested deeper than {MAX_ARRAY_DEPTH} levels at offset {orig_offs}"
                )
            self._depth += 1
            try:
                return super()._get_field_parts(orig_offs, raw_type)
            finally:
                self._depth -= 1
        if self.byte_order != "I" or sys.byteorder != "little":
            return super()._get_field_parts(orig_offs, raw_type)  # fast path reads '<' only
        types = [_V.ARRAY] + ([itype] if n else [])  # the base records the element type once
        parts: list[np.ndarray] = [raw_itype, alen]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            # one view of all n values, split into n one-element views as the base makes them
            values = np.asarray(self._get(start, nptype, n))
            parts += list(values.reshape(n, 1))
            return 12 + values.nbytes, parts, list(range(2, 2 + n)), types
        # strings: walk the u64 lengths; each string is two parts (length, bytes)
        buf = self._plain()
        size, offs = buf.size, start
        unpack = _U64.unpack_from
        for _ in range(n):
            if offs + 8 > size:
                raise GGUFError(
                    f"truncated or corrupt: string length at offset {offs} runs past the end"
                )
            (slen,) = unpack(buf, offs)
            end = offs + 8 + slen
            if slen > MAX_STRING_BYTES or end > size:
                raise GGUFError(
                    f"string at offset {offs} declares {slen} bytes but only {size - offs - 8} "
                    "follow: the file is truncated or corrupt"
                )
            parts.append(buf[offs : offs + 8].view(np.uint64))
            parts.append(buf[offs + 8 : end])
            offs = end
        return offs - orig_offs, parts, list(range(3, 2 + 2 * n, 2)), types

    def _build_fields(self, offs, count):
        """Metadata entries one at a time, each failure re-raised naming its key."""
        count = int(count)
        left = self.data.size - offs
        if count > MAX_KV_COUNT or count * _MIN_KV_BYTES > left:
            raise GGUFError(
                f"header declares {count} metadata entries (GGUF.kv_count) but only {left} "
                f"bytes follow (limit {MAX_KV_COUNT} entries): the file is truncated or corrupt"
            )
        for i in range(count):
            try:
                n = int(self._get(offs, np.uint64)[0])
                if n > MAX_KEY_BYTES:
                    raise GGUFError(f"key length {n} exceeds {MAX_KEY_BYTES} bytes")
                offs = super()._build_fields(offs, 1)
            except KeyError:  # _push_field on a repeated key
                raise GGUFError(
                    f"metadata key {_key_at(self._plain(), offs)} appears twice"
                ) from None
            except UnicodeDecodeError:
                raise GGUFError(f"metadata entry {i} at offset {offs}: key is not UTF-8") from None
            except (GGUFError, ValueError, IndexError, OverflowError, TypeError) as exc:
                raise GGUFError(
                    f"metadata key {_key_at(self._plain(), offs)} (entry {i}, offset {offs}): {exc}"
                ) from None
        return offs

    def _build_tensor_info(self, offs, count):
        """Tensor infos, after checking their declared count against the remaining bytes."""
        count = int(count)
        left = self.data.size - offs
        if count > MAX_TENSOR_COUNT or count * _MIN_TENSOR_INFO_BYTES > left:
            raise GGUFError(
                f"header declares {count} tensors (GGUF.tensor_count) but only {left} bytes "
                f"follow (limit {MAX_TENSOR_COUNT} tensors): the file is truncated or corrupt"
            )
        return super()._build_tensor_info(offs, count)

    def _get_tensor_info_field(self, orig_offs):
        """One tensor info: name length and n_dims checked before the base reads them."""
        i = self._tensor_index
        self._tensor_index += 1
        try:
            n = int(self._get(orig_offs, np.uint64)[0])
            if n > MAX_NAME_BYTES:
                raise GGUFError(f"name length {n} exceeds ggml's {MAX_NAME_BYTES} bytes")
            n_dims = int(self._get(orig_offs + 8 + n, np.uint32)[0])
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"n_dims is {n_dims}, ggml tensors have 1..{MAX_DIMS}")
            return super()._get_tensor_info_field(orig_offs)
        except UnicodeDecodeError:
            raise GGUFError(f"tensor {i} (offset {orig_offs}): name is not UTF-8") from None
        except GGUFError as exc:
            raise GGUFError(
                f"tensor {i} {_key_at(self._plain(), orig_offs)} (info at offset {orig_offs}): "
                f"{exc}"
            ) from None

    def _build_tensors(self, start_offs, fields):
        """Check the tensor table (types, sizes, bounds, alignment, overlap) before the base."""
        table = [
            (f.name, tuple(int(x) for x in f.parts[3]), int(f.parts[4][0]), int(f.parts[5][0]))
            for f in fields
        ]
        check_tensor_table(table, int(start_offs), int(self.alignment), int(self.data.size))
        super()._build_tensors(start_offs, fields)


_U64 = struct.Struct("<Q")


def check_tensor_table(
    table: list[tuple[str, tuple[int, ...], int, int]], data_start: int, alignment: int, size: int
) -> None:
    """Validate (name, ne, ggml type, offset) rows: GGUFError naming the first bad tensor.

    Rows must have 1..4 positive dims, a ggml type gguf knows, whole blocks per row, an offset
    that is a multiple of the alignment, data inside the file, and no two may share a name or
    overlap.
    """
    from rwkv_jax.quant import block_info

    seen: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    for name, ne, ggml_type, offset in table:
        where = f"tensor {_quoted(name)}"
        if name in seen:
            raise GGUFError(f"{where} appears twice in the tensor table")
        seen.add(name)
        if not 1 <= len(ne) <= MAX_DIMS or any(d < 1 for d in ne):
            raise GGUFError(f"{where} has dims {list(ne)}; ggml needs 1..4 dims, each >= 1")
        try:
            blk, type_size = block_info(ggml_type)
        except UnsupportedTypeError as exc:
            raise UnsupportedTypeError(f"{where}: {exc}") from None
        if ne[0] % blk:
            raise GGUFError(
                f"{where} has ne[0]={ne[0]}, not a multiple of the {blk}-element blocks of "
                f"its type {gguf.GGMLQuantizationType(ggml_type).name}"
            )
        n_bytes = ne[0] // blk * type_size * math.prod(ne[1:])  # python ints: no overflow
        begin = data_start + offset
        if offset % alignment:
            raise GGUFError(f"{where}: data offset {offset} is not a multiple of {alignment}")
        if begin + n_bytes > size:
            raise GGUFError(
                f"{where}: {n_bytes} bytes at file offset {begin} run past the end of the file "
                f"({size} bytes); the file is truncated or its tensor table is corrupt"
            )
        spans.append((begin, begin + n_bytes, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise GGUFError(f"tensor {_quoted(b)} overlaps the data of tensor {_quoted(a)}")


def open_reader(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """A gguf.GGUFReader over `path` whose reads and declared sizes are all checked.

    Any malformed container raises GGUFError (message prefixed with the path); it never
    crawls through absurd counts or allocates more than the file's own size. With a gguf
    package whose reader internals differ from 0.19's, the plain reader is used and its
    exceptions are translated.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GGUFError(f"{path}: no such file")
    if os.path.isdir(path):
        raise GGUFError(f"{path}: is a directory, expected a .gguf file")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise GGUFError(f"{path}: the file is empty")
    if head[:4] != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
    if size < HEADER_BYTES:
        raise GGUFError(f"{path}: truncated: {size} bytes, a GGUF header alone is 24")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0:  # written on a host of the other byte order
        version = int.from_bytes(head[4:8], "big")
    supported = getattr(gguf.gguf_reader, "READER_SUPPORTED_VERSIONS", [2, 3])
    if version not in supported:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (only {supported})")
    cls = _CheckedReader if _CHECKED else gguf.GGUFReader
    try:
        return cls(path) if cls is _CheckedReader else cls(path, "r")
    except GGUFError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as exc:
        # the base reader's own checks (alignment type/value) and, without the fast path, junk
        raise GGUFError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


_CHECKED = _reader_internals_ok()


def _field_value(field: Any) -> Any:
    """Python value of a reader field (scalar, string or list)."""
    return field.contents()


# --------------------------------------------------------------------------------------------
# GGUFFile's fast path. gguf-py's reader makes a numpy view per header item (two per string of
# the 65536-entry vocabulary: 131k views, ~0.2 s) before ReaderField.contents() turns them into
# Python values. `_FastHeader` reads the same header with struct and bytes slices straight into
# the values contents() gives, and the tensor table straight into `check_tensor_table`. It only
# ever ACCEPTS: it takes a file when every check the checked reader makes passes, and on
# anything else (a bound, a limit, invalid UTF-8, a repeated key, a bad alignment, a big-endian
# file...) it gives up and GGUFFile reads the file again through `open_reader`. So each error,
# and its message, is still the checked reader's; tests compare the two paths value for value.
# --------------------------------------------------------------------------------------------

_FAST = True  # tests switch it off to compare GGUFFile with the checked reader's path


class _Unsure(Exception):
    """The fast path leaves this file to the checked reader (almost always: it is malformed)."""


_U32 = struct.Struct("<I")
_TYPE_AND_COUNT = struct.Struct("<IQ")  # an array's element type and length
_TYPE_AND_OFFSET = struct.Struct("<IQ")  # a tensor's ggml type and data offset
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, kv count
_DIMS = {n: struct.Struct(f"<{n}Q") for n in range(1, MAX_DIMS + 1)}
_PSEUDO_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # gguf-py's own fields
_NP_SCALAR = {t: np.dtype(d) for t, d in getattr(gguf.GGUFReader, "gguf_scalar_to_np", {}).items()}
_BYTE = np.dtype(np.uint8)
# A leaf of a nested array as gguf-py keeps it: (dtype, file offset, element count).
_Leaf = tuple[np.dtype, int, int]


@dataclass(frozen=True)
class _Mapped:
    """What GGUFFile keeps of a file the fast path read (the part of GGUFReader it uses)."""

    data: np.ndarray  # uint8, the whole file over its mmap
    alignment: int
    data_offset: int
    byte_order: str = "I"


class _FastHeader:
    """One pass of struct reads over a little-endian GGUF's header (see the section comment)."""

    def __init__(self, mm: mmap.mmap | bytes):
        self.mm = mm
        self.size = len(mm)
        self.elems_left = MAX_ARRAY_TOTAL  # as _CheckedReader counts them, in the same order

    def read(self) -> tuple[_Mapped, dict[str, Any], dict[str, TensorInfo]]:
        """(the mapping, metadata as GGUFFile holds it, tensors); _Unsure where not certain."""
        mm = self.mm
        magic, version, n_tensors, n_kv = _HEADER.unpack_from(mm, 0)
        supported = getattr(gguf.gguf_reader, "READER_SUPPORTED_VERSIONS", [2, 3])
        if magic != b"GGUF" or version not in supported or sys.byteorder != "little":
            raise _Unsure  # other byte order (version & 0xFFFF == 0) included
        meta, vtypes, offs = self._fields(HEADER_BYTES, n_kv)
        table, offs = self._tensor_infos(offs, n_tensors)
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        if "general.alignment" in vtypes:  # gguf-py: a UINT32, a non-zero power of two
            alignment = meta["general.alignment"]
            if vtypes["general.alignment"] != _V.UINT32 or not alignment:
                raise _Unsure
            if alignment & (alignment - 1):
                raise _Unsure
        data_offset = offs + (-offs % alignment)
        check_tensor_table(table, data_offset, alignment, self.size)
        plain = np.frombuffer(mm, np.uint8)
        sizes: dict[int, tuple[int, int]] = {}
        tensors: dict[str, TensorInfo] = {}
        for name, ne, ggml_type, offset in table:
            blk, type_size = sizes.get(ggml_type) or sizes.setdefault(
                ggml_type, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            )
            begin = data_offset + offset
            n_bytes = ne[0] // blk * type_size * math.prod(ne[1:])
            tensors[name] = TensorInfo(name, ggml_type, ne, plain[begin : begin + n_bytes])
        return _Mapped(plain, alignment, data_offset), meta, tensors

    def _fields(self, offs: int, count: int) -> tuple[dict[str, Any], dict[str, _V], int]:
        """Metadata values (keys "GGUF.*" left out), value type per key, and the offset after."""
        mm, size = self.mm, self.size
        if count > MAX_KV_COUNT or count * _MIN_KV_BYTES > size - offs:
            raise _Unsure
        meta: dict[str, Any] = {}
        vtypes: dict[str, _V] = dict.fromkeys(_PSEUDO_KEYS, _V.UINT64)
        for _ in range(count):
            (n,) = _U64.unpack_from(mm, offs)
            key_end = offs + 8 + n
            if n > MAX_KEY_BYTES:
                raise _Unsure
            (raw,) = _U32.unpack_from(mm, key_end)  # also proves the key lies inside
            key = str(mm[offs + 8 : key_end], "utf-8")
            if key in vtypes:  # gguf-py refuses a repeated key
                raise _Unsure
            vtypes[key] = vtype = _V(raw)
            value, offs = self._value(key_end + 4, vtype)
            if not key.startswith("GGUF."):
                meta[key] = value
        return meta, vtypes, offs

    def _value(self, offs: int, vtype: _V) -> tuple[Any, int]:
        """(value as ReaderField.contents() gives it, offset after it) of one metadata value."""
        mm = self.mm
        if vtype == _V.STRING:
            (n,) = _U64.unpack_from(mm, offs)
            end = offs + 8 + n
            if n > MAX_STRING_BYTES or end > self.size:
                raise _Unsure
            return str(mm[offs + 8 : end], "utf-8"), end
        if vtype != _V.ARRAY:
            dtype = _NP_SCALAR[vtype]
            end = offs + dtype.itemsize
            if end > self.size:
                raise _Unsure
            return np.frombuffer(mm, dtype, 1, offs).tolist()[0], end
        (raw_itype, _) = _TYPE_AND_COUNT.unpack_from(mm, offs)
        if _V(raw_itype) == _V.ARRAY:  # rare: gguf-py flattens nested arrays, see _contents
            types, leaves, end = self._nested(offs, 0)
            return self._contents(types, leaves), end
        itype, n, start = self._array_head(offs)
        if itype == _V.STRING:
            return self._strings(start, n)
        dtype = _NP_SCALAR[itype]
        end = start + n * dtype.itemsize
        if end > self.size:
            raise _Unsure
        return np.frombuffer(mm, dtype, n, start).tolist(), end

    def _array_head(self, offs: int) -> tuple[_V, int, int]:
        """(element type, length, first element's offset) of an array within every limit."""
        raw_itype, n = _TYPE_AND_COUNT.unpack_from(self.mm, offs)
        itype, start = _V(raw_itype), offs + 12
        if n * _MIN_VALUE_BYTES[itype] > self.size - start:
            raise _Unsure
        if n > MAX_ARRAY_LEN or n > self.elems_left:
            raise _Unsure
        self.elems_left -= n
        return itype, n, start

    def _strings(self, offs: int, n: int) -> tuple[list[str], int]:
        """n length-prefixed UTF-8 strings from offs (the vocabulary: the hot loop)."""
        mm, unpack, limit = self.mm, _U64.unpack_from, MAX_STRING_BYTES
        out: list[str] = []
        append = out.append
        for _ in range(n):
            (slen,) = unpack(mm, offs)  # struct.error past the end
            if slen > limit:
                raise _Unsure
            start, offs = offs + 8, offs + 8 + slen
            append(mm[start:offs].decode("utf-8"))
        if offs > self.size:  # only the last slice can have been cut short silently
            raise _Unsure
        return out, offs

    def _nested(self, offs: int, depth: int) -> tuple[list[_V], list[_Leaf], int]:
        """gguf-py's types list and data leaves of an array, at nesting depth `depth`."""
        itype, n, offs = self._array_head(offs)
        types = [_V.ARRAY]  # then the first element's types, as gguf-py records them
        leaves: list[_Leaf] = []
        if itype == _V.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise _Unsure
            for i in range(n):
                sub_types, sub_leaves, offs = self._nested(offs, depth + 1)
                if i == 0:
                    types += sub_types
                leaves += sub_leaves
            return types, leaves, offs
        types += [itype] if n else []
        if itype == _V.STRING:
            for _ in range(n):
                (slen,) = _U64.unpack_from(self.mm, offs)
                if slen > MAX_STRING_BYTES or offs + 8 + slen > self.size:
                    raise _Unsure
                leaves.append((_BYTE, offs + 8, slen))
                offs += 8 + slen
            return types, leaves, offs
        dtype = _NP_SCALAR[itype]
        if offs + n * dtype.itemsize > self.size:
            raise _Unsure
        leaves += [(dtype, offs + i * dtype.itemsize, 1) for i in range(n)]
        return types, leaves, offs + n * dtype.itemsize

    def _contents(self, types: list[_V], leaves: list[_Leaf]) -> list[Any]:
        """ReaderField.contents() of a nested array: its leaves flattened, read as types[-1]."""
        mm = self.mm
        if types[-1] == _V.STRING:  # every leaf's bytes as UTF-8, scalars' included
            return [str(mm[o : o + d.itemsize * c], "utf-8") for d, o, c in leaves]
        return [v for d, o, c in leaves if c for v in np.frombuffer(mm, d, c, o).tolist()]

    def _tensor_infos(self, offs: int, count: int) -> tuple[list[tuple], int]:
        """(name, ne, ggml type, data offset) rows for check_tensor_table, and the offset after."""
        mm = self.mm
        if count > MAX_TENSOR_COUNT or count * _MIN_TENSOR_INFO_BYTES > self.size - offs:
            raise _Unsure
        table = []
        for _ in range(count):
            (n,) = _U64.unpack_from(mm, offs)
            if n > MAX_NAME_BYTES:
                raise _Unsure
            name_end = offs + 8 + n
            (n_dims,) = _U32.unpack_from(mm, name_end)  # also proves the name lies inside
            if not 1 <= n_dims <= MAX_DIMS:
                raise _Unsure
            name = str(mm[offs + 8 : name_end], "utf-8")
            ne = _DIMS[n_dims].unpack_from(mm, name_end + 4)
            offs = name_end + 4 + 8 * n_dims
            ggml_type, offset = _TYPE_AND_OFFSET.unpack_from(mm, offs)
            table.append((name, ne, ggml_type, offset))
            offs += 12
        return table, offs


def _read_fast(path: str) -> tuple[_Mapped, dict[str, Any], dict[str, TensorInfo]] | None:
    """The fast path's reading of `path`, or None to leave it to the checked reader."""
    try:
        with open(path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # missing, a directory, empty...: open_reader says which
        return None
    try:
        return _FastHeader(mm).read()
    except (_Unsure, GGUFError, struct.error, ValueError, KeyError, IndexError, OverflowError):
        with contextlib.suppress(BufferError):  # a view may still hold it: then the GC will
            mm.close()
        return None


class GGUFFile:
    """An opened, validated `rwkv7` GGUF: metadata, config, and tensors over one mmap."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._reader: gguf.GGUFReader | _Mapped | None
        self.metadata: dict[str, Any]
        self.tensors: dict[str, TensorInfo]
        fast = _read_fast(self.path) if _FAST and _CHECKED else None
        if fast is None:
            self._read_checked()
        else:
            self._reader, self.metadata, self.tensors = fast
        self.config = self._read_config()
        self._check_tensors()
        self._check_tokenizer()

    def _read_checked(self) -> None:
        """Metadata and tensors through open_reader: gguf-py's parser, every read checked."""
        reader = open_reader(self.path)
        if reader.byte_order != "I":
            raise GGUFError(
                f"{self.path}: the file was written big-endian; rwkv_jax reads little-endian "
                "GGUF files (as llama.cpp does on little-endian hosts)"
            )
        self._reader = reader
        self.metadata: dict[str, Any] = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                self.metadata[name] = _field_value(field)
            except Exception as exc:  # invalid UTF-8 in a string value, mostly
                raise GGUFError(
                    f"{self.path}: metadata key {_quoted(name)} is unreadable: {exc}"
                ) from None
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            ne = tuple(int(x) for x in t.shape)
            data = np.asarray(t.data).reshape(-1).view(np.uint8)
            self.tensors[t.name] = TensorInfo(t.name, int(t.tensor_type), ne, data)
        if not _CHECKED:  # the plain reader did not check the table: do it now
            table = [
                (t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset))
                for t in reader.tensors
            ]
            check_tensor_table(table, 0, 1, int(reader.data.size))

    # ---- metadata ---------------------------------------------------------------------------

    def _get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        if key not in self.metadata:
            if required:
                raise GGUFError(
                    f"{self.path}: metadata key '{key}' is missing; an rwkv7 file written by "
                    "llama.cpp's converter always has it"
                )
            return default
        return self.metadata[key]

    def _int(self, key: str, *, required: bool = True, default: int = 0) -> int:
        value = self._get(key, default, required=required)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise GGUFError(
                f"{self.path}: metadata key '{key}' must be a non-negative integer, got {value!r}"
            )
        return int(value)

    def _read_config(self) -> ModelConfig:
        arch = self._get("general.architecture", required=True)
        if arch != ARCH:
            raise GGUFError(
                f"{self.path}: general.architecture is {_quoted(str(arch))}, rwkv_jax runs only "
                f"'{ARCH}' (RWKV-7) models"
            )
        n_embd = self._int(KEY["n_embd"])
        n_layer = self._int(KEY["n_layer"])
        head_size = self._int(KEY["head_size"])
        if n_layer < 1 or n_embd < 1 or head_size < 1 or n_embd % head_size:
            raise GGUFError(
                f"{self.path}: {KEY['n_embd']}={n_embd} must be a positive multiple of "
                f"{KEY['head_size']}={head_size}, and {KEY['n_layer']}={n_layer} positive"
            )
        # Ranks: metadata first; tensor shapes are checked against them below.
        ranks = {}
        for key, exp_mult in (
            ("rank_w", (0.5, 1.8)),
            ("rank_a", (0.5, 1.8)),
            ("rank_v", (0.5, 1.3)),
            ("rank_g", (0.8, 0.6)),
        ):
            default = lora_rank(n_embd, *exp_mult)
            ranks[key] = self._int(KEY[key], required=False, default=default)
        if ranks["rank_g"] == 0:
            raise GGUFError(
                f"{self.path}: {KEY['rank_g']}=0 (no output gate, an ARWKV7 hybrid); "
                "rwkv_jax supports RWKV-7 models with the gate LoRA"
            )
        emb = self.tensors.get("token_embd.weight")
        if emb is None or len(emb.ne) != 2:
            raise GGUFError(f"{self.path}: tensor 'token_embd.weight' is missing or not 2-D")
        eps = self._get(KEY["eps"], 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, float | int) or not 0 < eps < 1:
            raise GGUFError(f"{self.path}: {KEY['eps']}={eps!r} must be a number in (0, 1)")
        ffn = self._int(KEY["ffn"], required=False, default=4 * n_embd)
        name = self._get("general.name", os.path.basename(self.path))
        if not isinstance(name, str):
            raise GGUFError(f"{self.path}: metadata key 'general.name' must be a string")
        file_type = -1
        if "general.file_type" in self.metadata:
            file_type = self._int("general.file_type")
        return ModelConfig(
            n_layer=n_layer,
            n_embd=n_embd,
            ffn=ffn,
            head_size=head_size,
            vocab_size=emb.ne[1],
            layer_norm_eps=float(eps),
            file_type=file_type,
            name=name,
            **ranks,
        )

    # ---- tensors ----------------------------------------------------------------------------

    def _iter_expected(self) -> Iterator[tuple[str, TensorSpec, tuple[int, ...]]]:
        """(name, spec, expected ne) of every tensor the model needs, in llama.cpp's order."""
        dims = self.config.dims()
        for spec in GLOBAL_TENSORS:
            yield spec.gguf_name, spec, tuple(dims[d] for d in spec.ne)
        for layer in range(self.config.n_layer):
            for spec in LAYER_TENSORS:
                names = spec.ne
                if layer == 0 and spec.field in LAYER0_DUMMY_RANK:
                    names = tuple(LAYER0_DUMMY_RANK[spec.field] if d == "Dv" else d for d in names)
                yield f"blk.{layer}.{spec.gguf_name}", spec, tuple(dims[d] for d in names)

    def expected_tensors(self) -> dict[str, tuple[TensorSpec, tuple[int, ...]]]:
        """Every tensor name the model needs -> (spec, expected ne)."""
        return {name: (spec, ne) for name, spec, ne in self._iter_expected()}

    def _check_tensors(self) -> None:
        """Every expected tensor present, shaped as the metadata says, in a supported type."""
        from rwkv_jax.quant import FORMATS

        seen: set[str] = set()
        # Lazily: a block_count of 2^31 stops at the first missing layer, never builds a table.
        for name, spec, ne in self._iter_expected():
            info = self.tensors.get(name)
            if info is None:
                raise GGUFError(f"{self.path}: tensor '{name}' is missing")
            seen.add(name)
            got = _squeeze_trailing_ones(info.ne)
            if got != _squeeze_trailing_ones(ne):
                # llama.cpp also accepts the lerp vector of channel mix declared as [C, 1, 1].
                raise GGUFError(
                    f"{self.path}: tensor '{name}' has dims {list(info.ne)}, expected {list(ne)} "
                    f"from the metadata ({spec.field})"
                )
            allowed = FORMATS if spec.kind == "mat" else VECTOR_TYPES
            if info.ggml_type not in allowed:
                what = "matrix" if spec.kind == "mat" else "vector"
                names = ", ".join(_type_name(t) for t in allowed)
                raise UnsupportedTypeError(
                    f"{self.path}: tensor '{name}' is a {what} stored as {info.type_name}, which "
                    f"rwkv_jax cannot unpack (supported for a {what}: {names}); re-quantize "
                    "from the F16/BF16/F32 file to a supported type"
                )
        extra = sorted(set(self.tensors) - seen)
        # Tensors we do not know are an error: silently ignoring weights gives wrong logits.
        if extra:
            more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
            raise GGUFError(
                f"{self.path}: unexpected tensors {extra[:5]}{more}: not part of a llama.cpp "
                "rwkv7 model (another variant, e.g. DeepEmbed or ARWKV7?)"
            )

    def _check_tokenizer(self) -> None:
        """The vocabulary arrays, when present, are strings / ints with one entry per row."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        types = self.metadata.get("tokenizer.ggml.token_type")
        V = self.config.vocab_size
        for key, value, kind in (
            ("tokenizer.ggml.tokens", tokens, str),
            ("tokenizer.ggml.token_type", types, int),
        ):
            if value is None:
                continue
            # set(map(type, ...)): the exact-type test of every entry, at C speed (65536 of them)
            if not isinstance(value, list) or not set(map(type, value)) <= {kind}:
                raise GGUFError(
                    f"{self.path}: metadata key '{key}' must be an array of {kind.__name__}"
                )
            if len(value) != V:
                raise GGUFError(
                    f"{self.path}: metadata key '{key}' has {len(value)} entries but "
                    f"token_embd.weight has {V} rows (the vocabulary size); the file is "
                    "inconsistent"
                )

    def tensor(self, name: str) -> TensorInfo:
        """The tensor called ``name`` (GGUFError if absent)."""
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: tensor '{name}' is missing") from None

    def bytes_by_type(self) -> dict[str, tuple[int, int]]:
        """ggml type name -> (tensor count, bytes)."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.tensors.values():
            count, size = out.get(t.type_name, (0, 0))
            out[t.type_name] = (count + 1, size + t.n_bytes)
        return out

    def close(self) -> None:
        """Drop the mmap (tensors obtained earlier become invalid)."""
        self.tensors = {}
        mm = getattr(self._reader, "data", None)
        if mm is not None and hasattr(mm, "_mmap") and mm._mmap is not None:
            del mm
        self._reader = None

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {self.config})"


def _type_name(ggml_type: int) -> str:
    """ggml type name of an id ('GGML type 99' when gguf does not know it)."""
    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"GGML type {ggml_type}"


def _squeeze_trailing_ones(ne: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing size-1 dims (ggml treats [C] and [C,1,1] alike)."""
    out = list(ne)
    while len(out) > 1 and out[-1] == 1:
        out.pop()
    return tuple(out)


def layer_of(name: str) -> tuple[int, str] | None:
    """('blk.3.time_mix_key.weight') -> (3, 'time_mix_key.weight'); None for global tensors."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


# --------------------------------------------------------------------------------------------
# Writing (synth, quantize): tensors are declared up front as packed bytes, then streamed.
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], arch: str = ARCH) -> Iterator[gguf.GGUFWriter]:
    """A GGUFWriter on a hidden temporary file renamed onto `path` only when the block succeeds.

    An interrupted or failed write leaves no partial file and any previous `path` intact.
    """
    dst = os.fspath(path)
    tmp = os.path.join(os.path.dirname(dst) or ".", f".{os.path.basename(dst)}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        yield writer
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def add_packed_tensor_info(
    writer: gguf.GGUFWriter, name: str, ne: tuple[int, ...], ggml_type: int
) -> int:
    """Declare a tensor of ggml dims `ne` stored as `ggml_type`; returns its byte size."""
    blk, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    row_bytes = ne[0] // blk * size
    n_bytes = row_bytes * int(np.prod(ne[1:], dtype=np.int64))
    # GGUFWriter takes the numpy (reversed-ne) shape of the bytes, last axis in bytes
    writer.add_tensor_info(
        name,
        (*reversed(ne[1:]), row_bytes),
        np.dtype(np.uint8),
        n_bytes,
        raw_dtype=gguf.GGMLQuantizationType(ggml_type),
    )
    return n_bytes
