"""The compiled decode step reads packed weights as they are: no dequantized copy of a packed
matrix exists in the optimized program (CPU: native custom calls take the packed fields; the
XLA fallback fuses unpacking into the reduction)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import rwkv_jax
from rwkv_jax import cpu_kernels, quant
from rwkv_jax.generate import decode_step


def _packed_shapes(params) -> set[tuple[int, int]]:
    """(out, in) of every block-quantized matrix in the model."""
    shapes = set()
    for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, quant.Weight)):
        if isinstance(w, quant._Blocked):
            shapes.add(w.shape)
    return shapes


def _float_buffers(hlo: str) -> set[tuple[int, ...]]:
    """Dims of every f32/bf16/f16 array shape named in an HLO text."""
    return {
        tuple(int(d) for d in m.group(2).split(",") if d)
        for m in re.finditer(r"\b(f32|bf16|f16)\[([\d,]*)\]", hlo)
    }


@pytest.mark.parametrize("stack_layers", [True, False])
def test_no_dequantized_weight_in_compiled_decode(synth_model, stack_layers):
    if not cpu_kernels.available():
        pytest.skip(f"native kernels unavailable: {cpu_kernels.reason()}")
    model = rwkv_jax.load(synth_model("tiny", "Q4_K_M"), stack_layers=stack_layers)
    packed = _packed_shapes(model.params)
    assert packed, "the Q4_K_M model must hold packed matrices"
    state = model.new_state(1)
    hlo = (
        decode_step.lower(
            model.params, jnp.zeros((1,), jnp.int32), state, cfg=model.config, dtype=model.dtype
        )
        .compile()
        .as_text()
    )
    floats = _float_buffers(hlo)
    # a dequantized matrix would appear as [out, in] (or [..., out, in] / [..., out, nb, 256])
    for out, n_in in packed:
        for dims in floats:
            assert dims[-2:] != (out, n_in), f"dequantized [{out}, {n_in}] in the decode program"
            assert not (len(dims) >= 3 and dims[-3] == out and dims[-2] * dims[-1] == n_in), dims
    assert cpu_kernels.TARGET_PREFIX in hlo  # the packed fields go to the native kernels


def test_stacked_decode_reads_layers_in_place(synth_model):
    """With stacked layers the native kernels get the whole [L, ...] fields and the layer index
    (quant.LayerOf): no packed field of one layer is copied out of the stack per token."""
    if not cpu_kernels.available():
        pytest.skip(f"native kernels unavailable: {cpu_kernels.reason()}")
    model = rwkv_jax.load(synth_model("tiny", "Q4_K_M"), stack_layers=True)
    L = model.config.n_layer
    hlo = (
        decode_step.lower(
            model.params,
            jnp.zeros((1,), jnp.int32),
            model.new_state(1),
            cfg=model.config,
            dtype=model.dtype,
        )
        .compile()
        .as_text()
    )
    layer_fields = set()  # one layer's shape of every stacked packed field, e.g. u8[64,1,128]
    for w in jax.tree.leaves(model.params.blocks, is_leaf=lambda x: isinstance(x, quant.Weight)):
        if isinstance(w, quant._Blocked):
            for a in jax.tree.leaves(w):
                layer_fields.add(",".join(map(str, a.shape[1:])))
    copies = []  # a layer's field sliced or copied out of its stack (leading 1s dropped)
    for ln in hlo.splitlines():
        m = re.search(r"= (?:u8|s8|f16)\[([\d,]*)\]\S* (?:copy|dynamic-slice)\(", ln)
        dims = m.group(1).split(",") if m else []
        while len(dims) > 1 and dims[0] == "1":
            dims.pop(0)
        if ",".join(dims) in layer_fields:
            copies.append(ln.strip())
    assert not copies, copies[:3]
    assert f"u8[{L}," in hlo  # stacked fields reach the custom calls whole
