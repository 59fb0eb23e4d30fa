"""Raw ggml tensor bytes to device arrays: one upload per tensor, the block split on the device.

A packed weight's fields (quant.py) are the members of the ggml block struct. Splitting them on
the host (a numpy structured view, then a strided copy per field) plus JAX's own staging copy
cost two slow passes over every byte. Here each tensor's bytes go to the device as they lie in
the file (`to_device`: a contiguous view of the mmap, copied once by `device_put`; dense formats
travel already typed), and one jitted program per group of tensors (a layer, say) slices each
block member out of [rows, nb, block_bytes] and bitcasts its f16/f32 members (little-endian, as
ggml writes them). Layers are stacked on the device too: `put_layers` writes a layer's split
fields in place (donated buffers) into stacks preallocated by `empty_stacks`, so a load holds at
most the weights plus one layer's bytes in flight.

Groups are dicts name -> Layout / device array; one program serves every layer of a model (same
shapes), so a load compiles a handful of programs (and JAX's persistent compilation cache keeps
them across processes: compile_cache.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax


class Field(NamedTuple):
    """One member of a block struct: where it lies in the block and what the device holds."""

    name: str
    offset: int  # bytes from the block start
    nbytes: int  # bytes in one block
    shape: tuple[int, ...]  # per-block shape, () for a scalar member
    dtype: str  # device dtype name ('float16', 'uint8', 'int8', ...)


class Layout(NamedTuple):
    """How one format's block bytes become fields (hashable: a static argument of the jits)."""

    fields: tuple[Field, ...]
    block_bytes: int
    raw_dtype: str  # the bytes travel as 'uint8', or 'int8' where the device has no unsigned

    @property
    def dense(self) -> bool:
        """One scalar member filling the block (F32/F16/BF16): the values travel typed."""
        f = self.fields[0]
        return len(self.fields) == 1 and f.shape == () and f.nbytes == self.block_bytes


def layout(block: np.dtype, u8_as: np.dtype) -> Layout:
    """The layout of structured dtype `block`; uint8 members (and the raw bytes) as `u8_as`."""
    fields = []
    for name in block.names:
        sub, offset = block.fields[name][:2]  # type: ignore[index]
        base = np.dtype(u8_as) if sub.base == np.uint8 else sub.base
        fields.append(Field(name, int(offset), sub.itemsize, tuple(sub.shape), base.name))
    return Layout(tuple(fields), block.itemsize, np.dtype(u8_as).name)


def as_words(lay: Layout, names: tuple[str, ...]) -> Layout:
    """`lay` with byte members `names` stored as little-endian uint32 words ([n / 4] per block;
    `_field` bitcasts them)."""
    fields = tuple(
        f._replace(shape=(f.nbytes // 4,), dtype="uint32") if f.name in names else f
        for f in lay.fields
    )
    return lay._replace(fields=fields)


def to_device(raw: np.ndarray, lay: Layout) -> Array:
    """Copy one tensor's bytes [..., rows, row_bytes] (e.g. an mmap view) to the default device.

    Block formats travel as bytes ([..., rows, row_bytes], `lay.raw_dtype`) for `split`; dense
    formats as their values ([..., rows, in]), which already are the field. A contiguous view
    travels without a host copy of ours. On the CPU backend `device_put` wraps 64-byte aligned
    host memory without copying: the split program's outputs are fresh buffers anyway, but a
    dense tensor is copied once on the host, so no weight ever aliases the file's mapping
    (which can change under us; tests/test_load.py writes to the host bytes afterwards).
    """
    raw = np.ascontiguousarray(raw)
    if not lay.dense:
        return jax.device_put(raw.view(lay.raw_dtype))
    host = raw.view(lay.fields[0].dtype).reshape(raw.shape[:-1] + (-1,))
    dev = jax.device_put(host)
    on_cpu = next(iter(dev.devices())).platform == "cpu"  # (other plugins may lack the pointer)
    if on_cpu and host.size and dev.unsafe_buffer_pointer() == host.ctypes.data:  # a wrap
        # wrap a private copy instead (a host memcpy; a device-side copy would compile a
        # program per shape)
        dev = jax.device_put(np.array(host))
    return dev


def _field(blocks: Array, f: Field) -> Array:
    """Member `f` of every block: [..., nb, block_bytes] bytes -> [..., nb, *f.shape]."""
    part = lax.slice_in_dim(blocks, f.offset, f.offset + f.nbytes, axis=-1)  # [..., nb, nbytes]
    dtype = jnp.dtype(f.dtype)
    if dtype.itemsize == 1:  # byte members: at most a sign reinterpretation (u8 <-> i8)
        if part.dtype != dtype:
            part = lax.bitcast_convert_type(part, dtype)
        return part.reshape(part.shape[:-1] + f.shape)
    # wider scalars: [..., nb, n, itemsize] bytes -> [..., nb, n] values (bitcast drops an axis)
    n = f.nbytes // dtype.itemsize
    words = part.reshape(part.shape[:-1] + (n, dtype.itemsize))
    return lax.bitcast_convert_type(words, dtype).reshape(part.shape[:-1] + f.shape)


def _split_one(dev: Array, lay: Layout) -> dict[str, Array]:
    """Fields of one uploaded tensor (see `to_device`), each [..., rows, nb, *field shape]."""
    if lay.dense:
        return {lay.fields[0].name: dev}  # [..., rows, in] values: nb = in, no member axes
    nb = dev.shape[-1] // lay.block_bytes
    blocks = dev.reshape(dev.shape[:-1] + (nb, lay.block_bytes))
    return {f.name: _field(blocks, f) for f in lay.fields}


Layouts = tuple[tuple[str, Layout], ...]  # a group's (tensor key, layout) pairs, hashable


@functools.partial(jax.jit, static_argnames=("lays",))
def _split_group(devs: dict[str, Array], *, lays: Layouts) -> dict[str, dict[str, Array]]:
    """`split` for the block formats of a group, as one program."""
    return {k: _split_one(devs[k], lay) for k, lay in lays}


def split(devs: dict[str, Array], lays: dict[str, Layout]) -> dict[str, dict[str, Array]]:
    """Fields of a group of uploaded tensors: key -> field name -> [..., rows, nb, *shape].

    Dense tensors are their own field (no program runs for them); the block formats of the
    group are split by one jitted program, compiled once per (layouts, shapes).
    """
    out = {k: _split_one(devs[k], lay) for k, lay in lays.items() if lay.dense}
    blocked = tuple((k, lay) for k, lay in lays.items() if not lay.dense)
    if blocked:
        out |= _split_group({k: devs[k] for k, _ in blocked}, lays=blocked)
    return out


@functools.partial(jax.jit, static_argnames=("specs",))
def _zeros(*, specs: tuple[tuple[str, str, tuple[int, ...], str], ...]) -> dict:
    """Zero arrays for (key, field, shape, dtype) specs, as nested dicts key -> field."""
    out: dict[str, dict[str, Array]] = {}
    for key, name, shape, dtype in specs:
        out.setdefault(key, {})[name] = jnp.zeros(shape, dtype)
    return out


def empty_stacks(
    lays: dict[str, Layout], shapes: dict[str, tuple[int, int, int]]
) -> dict[str, dict[str, Array]]:
    """Zero stacks key -> field -> [L, rows, nb, *member shape] for `put_layers` to fill.

    shapes: key -> (L, rows, nb) with nb the blocks per row (the row length for dense formats).
    """
    specs = []
    for key, lay in lays.items():
        for f in lay.fields:
            specs.append((key, f.name, tuple(shapes[key]) + f.shape, f.dtype))
    return _zeros(specs=tuple(specs))


@functools.partial(jax.jit, static_argnames=("lays",), donate_argnums=0)
def _put(
    stacks: dict[str, dict[str, Array]], devs: dict[str, Array], layer: Array, *, lays: Layouts
) -> dict[str, dict[str, Array]]:
    """Write a layer's split fields into stacks[...][layer], in place (stacks donated)."""
    out: dict[str, dict[str, Array]] = {}
    for key, lay in lays:
        one = _split_one(devs[key], lay)
        out[key] = {k: _update(stacks[key][k], v, layer) for k, v in one.items()}
    return out


def _update(stack: Array, value: Array, layer: Array) -> Array:
    """stack[layer] = value, bit for bit: floats are written as same-width signed integers.

    XLA:CPU updates a bfloat16 array through float32 and canonicalizes NaN payloads on the way
    (seen with jax 0.10.2); the integer view keeps every bit, and the same-width bitcasts cost
    nothing (int16/int32: types every backend has, Metal's included).
    """
    if not jnp.issubdtype(stack.dtype, jnp.floating):
        return lax.dynamic_update_index_in_dim(stack, value, layer, 0)
    as_int = jnp.dtype(f"int{8 * stack.dtype.itemsize}")
    bits = lax.dynamic_update_index_in_dim(
        lax.bitcast_convert_type(stack, as_int), lax.bitcast_convert_type(value, as_int), layer, 0
    )
    return lax.bitcast_convert_type(bits, stack.dtype)


def put_layers(
    stacks: dict[str, dict[str, Array]],
    devs: dict[str, Array],
    layer: int,
    lays: dict[str, Layout],
) -> dict[str, dict[str, Array]]:
    """Split one layer's uploaded tensors into slot `layer` of `stacks` (donated: reuse the
    result, never the argument). One program for all layers of a model."""
    return _put(stacks, devs, np.int32(layer), lays=tuple(lays.items()))
