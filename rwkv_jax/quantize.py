"""Numpy ggml quantizers and the quantize-file command (llama-quantize's choices for RWKV-7).

Q4_K, Q5_K and Q6_K follow llama.cpp's reference quantizers (ggml-quants.c
``quantize_row_q{4,5,6}_K_ref``) step by step, vectorized over all blocks at once. Sub-blocks are
laid out ``[elements, n_sub]`` so every reduction runs over the leading axis, which numpy sums
sequentially — the C code's order. With float32 arithmetic and round-half-even (``nearest_int``
== ``np.rint``) the bytes match the C reference compiled without FMA contraction. The legacy
32-blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and BF16 come from ``gguf.quants``, which mirrors the
same reference functions. Block layouts: docs/rwkv7-spec.md §3. Little-endian hosts only (as
gguf.quants).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np

from rwkv_jax.errors import GGUFError, InputError, UnsupportedTypeError
from rwkv_jax.gguf import add_packed_tensor_info, atomic_writer, open_reader

T = gguf.GGMLQuantizationType
f32 = np.float32

QK_K = 256  # K-quant super-block
GROUP_MAX_EPS = f32(1e-15)  # ggml-quants.c: below this a group counts as all zero
QUANTIZATION_VERSION = 2  # general.quantization_version written by llama-quantize
# Elements handled per task: keeps each thread's ~15 temporaries at a few MB, near cache size.
CHUNK_ELEMS = 1 << 18
# Elements dequantized at once by quantize_file (bounded memory for multi-GB tensors).
FILE_BATCH_ELEMS = 1 << 24

# llama_ftype ids (llama.h, == gguf.LlamaFileType) of the presets this module writes.
FTYPES: dict[str, int] = {
    "F32": int(gguf.LlamaFileType.ALL_F32),
    "F16": int(gguf.LlamaFileType.MOSTLY_F16),
    "BF16": int(gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": int(gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": int(gguf.LlamaFileType.MOSTLY_Q4_0),
    "Q4_K_M": int(gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K_M": int(gguf.LlamaFileType.MOSTLY_Q5_K_M),
    "Q6_K": int(gguf.LlamaFileType.MOSTLY_Q6_K),
}

# llama-quant.cpp llama_ftype_get_default_type: the type of "everything else" per preset.
_FTYPE_DEFAULT_TYPE: dict[str, T] = {
    "F32": T.F32,
    "F16": T.F16,
    "BF16": T.BF16,
    "Q8_0": T.Q8_0,
    "Q4_0": T.Q4_0,
    "Q4_K_M": T.Q4_K,
    "Q5_K_M": T.Q5_K,
    "Q6_K": T.Q6_K,
}

# llama-quant.cpp tensor_allows_quantization: RWKV's "small yet 2D weights" (substring match).
_RWKV_NO_QUANT = tuple(
    f"time_mix_{n}.weight"
    for n in ("first w0 w1 w2 v0 v1 v2 a0 a1 a2 g1 g2 decay_w1 decay_w2 lerp_fused".split())
)
# convert_hf_to_gguf prepare_tensors: MODEL_TENSOR kinds always written as F32 (RWKV subset).
_CONVERTER_F32 = re.compile(
    r"^blk\.\d+\.time_mix_(first|w1|w2|decay_w1|decay_w2|lerp_fused)\.weight$"
)


# ----------------------------------------------------------------------------------------------
# K-quant building blocks (ggml-quants.c helpers), on sub-blocks laid out [n_elem, n_sub]
# ----------------------------------------------------------------------------------------------


def _make_qkx2_quants(
    xt: np.ndarray, wt: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants: weighted least-squares (scale, min) search for x ≈ scale·L − the_min.

    xt, wt: [n, S] values and weights of S sub-blocks. Returns (scale, the_min, l_iscale, l_min),
    each [S]; the chosen L is clip(rint(l_iscale·(x − l_min)), 0, nmax).
    """
    xmin = xt.min(axis=0)
    xmax = xt.max(axis=0)
    sum_w = wt.sum(axis=0)  # axis-0 sums are sequential, like the C loop
    sum_x = (wt * xt).sum(axis=0)
    np.minimum(xmin, 0, out=xmin)
    flat = xmax == xmin  # C: all L = 0, scale 0, the_min = -min
    nmax32 = f32(nmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = nmax32 / np.where(flat, f32(1), xmax - xmin)
        scale = f32(1) / iscale
        t = xt - xmin  # [n, S] scratch: L of the candidate
        t *= iscale
        np.rint(t, out=t)
        np.clip(t, 0, nmax32, out=t)
        tmp = t * scale
        tmp += xmin
        tmp -= xt
        tmp *= tmp
        tmp *= wt
        best_err = tmp.sum(axis=0)
        l_iscale, l_min = iscale, xmin
        cur_min = xmin  # C's `min`: updated when a candidate wins, then used by later steps
        wl = np.empty_like(xt)
        for step in range(nstep + 1):
            # C evaluates (rmin + rdelta*is) + nmax in float
            num = f32(f32(rmin) + f32(rdelta) * f32(step)) + nmax32
            iscale = num / (xmax - cur_min)
            np.subtract(xt, cur_min, out=t)
            t *= iscale
            np.rint(t, out=t)
            np.clip(t, 0, nmax32, out=t)
            np.multiply(wt, t, out=wl)
            sum_l = wl.sum(axis=0)
            np.multiply(wl, t, out=tmp)
            sum_l2 = tmp.sum(axis=0)
            np.multiply(wl, xt, out=tmp)
            sum_xl = tmp.sum(axis=0)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = this_min > 0  # a positive offset is not representable: refit scale alone
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, f32(0), this_min)
            np.multiply(t, this_scale, out=tmp)
            tmp += this_min
            tmp -= xt
            tmp *= tmp
            tmp *= wt
            cur_err = tmp.sum(axis=0)
            better = (det > 0) & (cur_err < best_err) & ~flat
            best_err = np.where(better, cur_err, best_err)
            scale = np.where(better, this_scale, scale)
            l_iscale = np.where(better, iscale, l_iscale)
            l_min = np.where(better, cur_min, l_min)
            cur_min = np.where(better, this_min, cur_min)
    scale = np.where(flat, f32(0), scale)
    l_iscale = np.where(flat, f32(0), l_iscale)
    return scale, -cur_min, l_iscale, l_min


def _make_qx_quants_rmse1(xt: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type=1): symmetric scale search weighted by x², 19 candidates.

    xt: [n, S]. Returns (scale, l_iscale, zero), each [S]: L = clip(rint(l_iscale·x), -nmax,
    nmax-1) + nmax, except all-zero sub-blocks (`zero`), whose L the reference sets to 0.
    """
    imax = np.abs(xt).argmax(axis=0)  # first index of max |x|, like the C strict '>'
    vmax = np.take_along_axis(xt, imax[None, :], axis=0)[0]  # signed value of largest |x|
    zero = np.abs(vmax) < GROUP_MAX_EPS
    vmax = np.where(zero, f32(1), vmax)
    w = xt * xt
    wx = w * xt
    t = np.empty_like(xt)
    tmp = np.empty_like(xt)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Σ w·x·l and Σ w·l² for l = clip(rint(iscale·x)), in the C product order."""
        np.multiply(xt, iscale, out=t)
        np.rint(t, out=t)
        np.clip(t, -nmax, nmax - 1, out=t)
        np.multiply(wx, t, out=tmp)
        sumlx = tmp.sum(axis=0)
        np.multiply(w, t, out=tmp)
        np.multiply(tmp, t, out=tmp)
        return sumlx, tmp.sum(axis=0)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(-nmax) / vmax
        sumlx, suml2 = sums(iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        l_iscale = iscale
        for step in (*range(-9, 0), *range(1, 10)):
            iscale = f32(-(f32(nmax) + f32(0.1) * f32(step))) / vmax
            sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
            l_iscale = np.where(better, iscale, l_iscale)
    return np.where(zero, f32(0), scale), l_iscale, zero


def _to_sub_major(blocks: np.ndarray, sub: int) -> np.ndarray:
    """[nb, 256] → [sub, nb·256/sub]: element-major layout of all sub-blocks."""
    return np.ascontiguousarray(blocks.reshape(-1, sub).T)


def _from_sub_major(xt: np.ndarray, nb: int) -> np.ndarray:
    """[sub, nb·256/sub] → [nb, 256/sub, sub]."""
    return xt.T.reshape(nb, QK_K // xt.shape[0], xt.shape[0])


def _check_finite(d: np.ndarray, qtype: str) -> None:
    """Raise InputError when a block scale is NaN/Inf (non-finite input or fp16 overflow)."""
    if not np.isfinite(d).all():
        raise InputError(
            f"cannot quantize to {qtype}: input contains NaN/Inf or values beyond the fp16 "
            "scale range; check the source weights"
        )


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """[nb] float → [nb, 2] little-endian fp16 bytes (round to nearest even, as ggml)."""
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


# ----------------------------------------------------------------------------------------------
# Q4_K / Q5_K (shared scale+min search and 6-bit scale packing)
# ----------------------------------------------------------------------------------------------


def _kx_scales_mins(
    blocks: np.ndarray, nmax: int, search: bool, rmin: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per 32-sub-block (scale, the_min) [nb, 8]; with search also the searched L [nb, 8, 32]."""
    nb = blocks.shape[0]
    if not search:
        # fast path: the min/max candidate make_qkx2_quants starts from, without search
        xt = _to_sub_major(blocks, 32)  # reductions over the leading axis are the fastest
        xmin = np.minimum(xt.min(axis=0), 0)
        scales = (xt.max(axis=0) - xmin) / f32(nmax)
        return scales.reshape(nb, 8), -xmin.reshape(nb, 8), None
    xt = _to_sub_major(blocks, 32)  # [32, nb·8]
    # quantize_row_q{4,5}_K_ref weights: av_x + |x| with av_x the sub-block RMS
    av_x = np.sqrt((xt * xt).sum(axis=0) / f32(32))
    wt = np.abs(xt)
    wt += av_x
    scale, the_min, l_iscale, l_min = _make_qkx2_quants(xt, wt, nmax, rmin, 0.1, nstep)
    # the L make_qkx2_quants chose; the ref keeps it for sub-blocks whose scale rounds to 0
    np.subtract(xt, l_min, out=wt)
    wt *= l_iscale
    np.rint(wt, out=wt)
    np.clip(wt, 0, nmax, out=wt)
    return scale.reshape(nb, 8), the_min.reshape(nb, 8), _from_sub_major(wt, nb)


def _quantize_kx(
    blocks: np.ndarray, nmax: int, search: bool, rmin: float, nstep: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Common Q4_K/Q5_K body: returns (header [nb, 16] = d, dmin, scales[12]; L [nb, 8, 32])."""
    nb = blocks.shape[0]
    scales, mins, l_search = _kx_scales_mins(blocks, nmax, search, rmin, nstep)
    max_scale = np.maximum(scales.max(axis=1), 0)  # C: running max starting at 0
    max_min = np.maximum(mins.max(axis=1), 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)
    _check_finite(d, name)
    _check_finite(dmin, name)
    # uint8_t ls = nearest_int(..); MIN(63, ls): the int wraps to 8 bits before the MIN
    ls = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int32) & 0xFF, 63)
    lm = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int32) & 0xFF, 63)
    header = np.empty((nb, 16), np.uint8)
    header[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    header[:, 2:4] = dmin.view(np.uint8).reshape(nb, 2)
    ls8, lm8 = ls.astype(np.uint8), lm.astype(np.uint8)
    # 6-bit packing read back by get_scale_min_k4: sub-blocks 4..7 split into nibble + 2 high bits
    header[:, 4:8] = ls8[:, :4] | ((ls8[:, 4:] >> 4) << 6)
    header[:, 8:12] = lm8[:, :4] | ((lm8[:, 4:] >> 4) << 6)
    header[:, 12:16] = (ls8[:, 4:] & 0xF) | ((lm8[:, 4:] & 0xF) << 4)
    # final L against the rounded scales: l = nearest_int((x + dm)/d), [nb, 8, 32]
    d_sub = d.astype(f32)[:, None] * ls.astype(f32)
    dm_sub = dmin.astype(f32)[:, None] * lm.astype(f32)
    zero_d = d_sub == 0
    lq = blocks.reshape(nb, 8, 32) + dm_sub[:, :, None]
    lq /= np.where(zero_d, f32(1), d_sub)[:, :, None]
    np.rint(lq, out=lq)
    np.clip(lq, 0, nmax, out=lq)
    if zero_d.any():
        keep = l_search if l_search is not None else np.zeros_like(lq)
        lq = np.where(zero_d[:, :, None], keep, lq)
    return header, lq.astype(np.uint8)


def _pack_nibbles(lq: np.ndarray) -> np.ndarray:
    """[nb, 8, 32] 4-bit values → [nb, 128]: qs[32g+l] = L[64g+l] | L[64g+32+l] << 4."""
    nb = lq.shape[0]
    pairs = lq.reshape(nb, 4, 2, 32)
    return (pairs[:, :, 0, :] | (pairs[:, :, 1, :] << 4)).reshape(nb, 128)


def _quantize_q4_k(blocks: np.ndarray, search: bool = True) -> np.ndarray:
    """quantize_row_q4_K_ref: [nb, 256] float32 → [nb, 144] block_q4_K bytes."""
    header, lq = _quantize_kx(blocks, 15, search, -1.0, 20, "Q4_K")
    return np.concatenate([header, _pack_nibbles(lq)], axis=1)


def _quantize_q5_k(blocks: np.ndarray, search: bool = True) -> np.ndarray:
    """quantize_row_q5_K_ref: [nb, 256] float32 → [nb, 176] block_q5_K bytes."""
    # the reference searches Q5_K with rmin=-0.5, nstep=15 (Q4_K: -1, 20)
    header, lq = _quantize_kx(blocks, 31, search, -0.5, 15, "Q5_K")
    nb = lq.shape[0]
    qh = np.zeros((nb, 32), np.uint8)
    for t in range(8):  # bit t of qh[l]: high bit of element 32t+l
        qh |= (lq[:, t, :] >> 4) << t
    return np.concatenate([header, qh, _pack_nibbles(lq & 0xF)], axis=1)


# ----------------------------------------------------------------------------------------------
# Q6_K
# ----------------------------------------------------------------------------------------------


def _quantize_q6_k(blocks: np.ndarray, search: bool = True) -> np.ndarray:
    """quantize_row_q6_K_ref: [nb, 256] float32 → [nb, 210] block_q6_K bytes."""
    nb = blocks.shape[0]
    l_search = None
    if search:
        xt = _to_sub_major(blocks, 16)  # [16, nb·16]
        scale, l_iscale, zero = _make_qx_quants_rmse1(xt, 32)
        xt *= l_iscale
        np.rint(xt, out=xt)
        np.clip(xt, -32, 31, out=xt)
        xt += 32
        xt[:, zero] = 0
        l_search = _from_sub_major(xt, nb)  # [nb, 16, 16]
        scales = scale.reshape(nb, 16)
    else:
        # fast path: make_qx_quants' first candidate, scale = max/-32 (signed largest |x|)
        xt = _to_sub_major(blocks, 16)
        hi, lo = xt.max(axis=0), xt.min(axis=0)
        scales = (np.where(hi >= -lo, hi, lo) / f32(-32)).reshape(nb, 16)
    # block scale from the sub-block scale of largest magnitude (first one on ties)
    imax = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, imax[:, None], axis=1)[:, 0]
    zero_blk = np.abs(max_scale) < GROUP_MAX_EPS  # C: whole block memset to 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(-128) / np.where(zero_blk, f32(1), max_scale)
        d = (f32(1) / iscale).astype(np.float16)
    _check_finite(d, "Q6_K")
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)  # [nb, 16]
    d_sub = d.astype(f32)[:, None] * sc.astype(f32)
    zero_d = d_sub == 0
    lq = blocks.reshape(nb, 16, 16) / np.where(zero_d, f32(1), d_sub)[:, :, None]
    np.rint(lq, out=lq)
    np.clip(lq, -32, 31, out=lq)
    lq += 32
    if zero_d.any():
        keep = l_search if l_search is not None else np.zeros_like(lq)
        lq = np.where(zero_d[:, :, None], keep, lq)
    lq8 = lq.astype(np.uint8).reshape(nb, 2, 4, 32)  # [block, half, quarter c, l]
    ql = np.empty((nb, 2, 2, 32), np.uint8)
    ql[:, :, 0] = (lq8[:, :, 0] & 0xF) | ((lq8[:, :, 2] & 0xF) << 4)
    ql[:, :, 1] = (lq8[:, :, 1] & 0xF) | ((lq8[:, :, 3] & 0xF) << 4)
    qh = np.zeros((nb, 2, 32), np.uint8)
    for c in range(4):  # bits 2c..2c+1 of qh[32h+l]: high 2 bits of element 128h+32c+l
        qh |= (lq8[:, :, c] >> 4) << (2 * c)
    out = np.concatenate(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), _fp16_bytes(d)], axis=1
    )
    out[zero_blk] = 0
    return out


# ----------------------------------------------------------------------------------------------
# dispatch over all types
# ----------------------------------------------------------------------------------------------


def _legacy(cls: type) -> Callable[[np.ndarray, bool], np.ndarray]:
    """Wrap a gguf.quants class (same math as quantize_row_*_ref) as a block quantizer."""

    def quantize(blocks: np.ndarray, search: bool) -> np.ndarray:
        """Block bytes from gguf.quants; non-finite scales raise InputError."""
        del search  # the legacy references have no search
        with np.errstate(invalid="ignore"):  # NaN input: reported just below instead
            out = cls.quantize_blocks(blocks)
        # every legacy block starts with fp16 d (the *_1 types follow it with fp16 m)
        n_half = 2 if cls in (gguf.quants.Q4_1, gguf.quants.Q5_1) else 1
        _check_finite(np.ascontiguousarray(out[:, : 2 * n_half]).view(np.float16), cls.__name__)
        return out

    return quantize


def _plain_f32(blocks: np.ndarray, search: bool) -> np.ndarray:
    """F32: the bytes themselves."""
    return np.ascontiguousarray(blocks, dtype=f32).view(np.uint8)


def _plain_f16(blocks: np.ndarray, search: bool) -> np.ndarray:
    """F16: IEEE binary16, round-to-nearest-even (numpy == ggml_fp32_to_fp16)."""
    return blocks.astype(np.float16).view(np.uint8)


def _plain_bf16(blocks: np.ndarray, search: bool) -> np.ndarray:
    """BF16: round-to-nearest-even with quiet NaNs (gguf.quants.BF16 == ggml_fp32_to_bf16)."""
    return gguf.quants.BF16.quantize_blocks(np.ascontiguousarray(blocks))


_QUANTIZERS: dict[T, Callable[[np.ndarray, bool], np.ndarray]] = {
    T.F32: _plain_f32,
    T.F16: _plain_f16,
    T.BF16: _plain_bf16,
    T.Q4_0: _legacy(gguf.quants.Q4_0),
    T.Q4_1: _legacy(gguf.quants.Q4_1),
    T.Q5_0: _legacy(gguf.quants.Q5_0),
    T.Q5_1: _legacy(gguf.quants.Q5_1),
    T.Q8_0: _legacy(gguf.quants.Q8_0),
    T.Q4_K: _quantize_q4_k,
    T.Q5_K: _quantize_q5_k,
    T.Q6_K: _quantize_q6_k,
}


def _ggml_type(qtype: int) -> T:
    """Validate a ggml type id that quantize_array can produce."""
    try:
        t = T(int(qtype))
    except ValueError:
        raise UnsupportedTypeError(f"unknown ggml type id {qtype}") from None
    if t not in _QUANTIZERS:
        names = ", ".join(k.name for k in _QUANTIZERS)
        raise UnsupportedTypeError(f"cannot quantize to {t.name}; supported: {names}")
    return t


def _n_cores() -> int:
    """CPU cores this process may run on (affinity-aware where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def quantize_array(x: np.ndarray, qtype: int, *, search: bool = True) -> np.ndarray:
    """Quantize rows x [rows, n] to ggml blocks of `qtype`: uint8 [rows, n/blk·type_size].

    search=False skips the K-quant scale searches (min/max scales only) for fast bulk work.
    Rows are processed in chunks of ~CHUNK_ELEMS on all cores (numpy releases the GIL).
    """
    t = _ggml_type(qtype)
    if x.ndim != 2:
        raise InputError(f"quantize_array wants a 2-D [rows, n] array, got shape {x.shape}")
    rows, n = x.shape
    blk, type_size = gguf.GGML_QUANT_SIZES[t]
    if n % blk != 0:
        raise InputError(
            f"row length {n} is not a multiple of the {t.name} block size {blk}; "
            "pick a type whose block divides the row (see tensor_type fallbacks)"
        )
    fn = _QUANTIZERS[t]
    row_bytes = n // blk * type_size
    out = np.empty((rows, row_bytes), np.uint8)
    step = max(1, CHUNK_ELEMS // max(n, 1))
    starts = range(0, rows, step)

    def run(a: int) -> None:
        """Quantize rows [a, a+step) into out."""
        b = min(a + step, rows)
        blocks = np.asarray(x[a:b], dtype=f32).reshape(-1, blk)
        out[a:b] = fn(blocks, search).reshape(b - a, row_bytes)

    workers = min(_n_cores(), len(starts))
    if workers <= 1:
        for a in starts:
            run(a)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, starts))  # list() re-raises worker exceptions
    return out


# ----------------------------------------------------------------------------------------------
# llama.cpp's per-tensor type rules for RWKV-7 (docs/rwkv7-spec.md §2.2, §2.5)
# ----------------------------------------------------------------------------------------------


def _ggml_n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: dimensions up to the last one > 1 (at least 1)."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def _allows_quantization(name: str, ne: tuple[int, ...]) -> bool:
    """llama-quant.cpp tensor_allows_quantization, the rules that can hit an RWKV-7 file."""
    return (
        _ggml_n_dims(ne) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and not any(s in name for s in _RWKV_NO_QUANT)
    )


def _fallback_type(new_type: T, ncols: int) -> T:
    """llama-quant.cpp tensor_type_fallback: a type whose block divides ne[0]."""
    if ncols % gguf.GGML_QUANT_SIZES[new_type][0] == 0:
        return new_type
    demote = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
    new_type = demote.get(new_type, new_type)  # 32-blocks stay, then fall to F16 below
    if ncols % gguf.GGML_QUANT_SIZES[new_type][0] != 0:
        return T.F16  # "must use F16 due to unusual shape"
    return new_type


def _converter_type(name: str, ne: tuple[int, ...], outtype: T) -> T:
    """convert_hf_to_gguf prepare_tensors: F32 for 1-D, norms, non-weights and RWKV kinds."""
    if len(ne) <= 1 or name.endswith("_norm.weight"):
        return T.F32
    if _CONVERTER_F32.match(name) or not name.endswith(".weight"):
        return T.F32
    return outtype


def tensor_type(name: str, shape_ne: tuple[int, ...], ftype: str, source_type: int) -> int:
    """The ggml type llama.cpp gives tensor `name` (dims in ggml ne order) in preset `ftype`.

    F32/F16/BF16 presets follow the converter (convert_hf_to_gguf.py prepare_tensors);
    quantized presets follow llama-quantize (llama-quant.cpp llama_tensor_get_type): tensors
    it refuses keep `source_type`; output.weight gets Q6_K (Q8_0 keeps Q8_0); shapes whose
    ne[0] the block does not divide fall back (tensor_type_fallback).
    """
    if ftype not in FTYPES:
        raise InputError(f"unknown ftype {ftype!r}; choose one of {', '.join(FTYPES)}")
    ne = tuple(int(v) for v in shape_ne)
    default = _FTYPE_DEFAULT_TYPE[ftype]
    if default in (T.F32, T.F16, T.BF16):
        return int(_converter_type(name, ne, default))
    if not _allows_quantization(name, ne):
        return int(source_type)
    new_type = default
    if name == "output.weight":
        # llama_tensor_get_type_impl, category OUTPUT (RWKV-7 has an untied output)
        if ne[0] % gguf.GGML_QUANT_SIZES[new_type][0] != 0:
            new_type = T.Q8_0
        elif new_type != T.Q8_0:
            new_type = T.Q6_K
    # every other RWKV-7 tensor is category OTHER/TOKEN_EMBD: the default type stays
    return int(_fallback_type(new_type, ne[0]))


# ----------------------------------------------------------------------------------------------
# quantize_file: GGUF → GGUF, streamed one tensor at a time
# ----------------------------------------------------------------------------------------------


def _open_reader(src: str) -> gguf.GGUFReader:
    """Open a GGUF over mmap with every read bounds-checked (rwkv_jax.gguf.open_reader)."""
    return open_reader(src)


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, ftype_id: int) -> None:
    """Copy every KV pair (typed as in the source), updating file_type and quantization_version."""
    overrides = {
        "general.file_type": ftype_id,
        "general.quantization_version": QUANTIZATION_VERSION,
    }
    V = gguf.GGUFValueType
    for key, field in reader.fields.items():
        # GGUF.* are the reader's header pseudo-keys; the writer emits the architecture itself
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key in overrides:
            writer.add_uint32(key, overrides.pop(key))
            continue
        vtype = field.types[0]
        if vtype == V.STRING:
            writer.add_key_value(key, field.parts[field.data[0]].tobytes(), V.STRING)
        elif vtype == V.ARRAY:
            if len(field.types) < 2:
                raise GGUFError(
                    f"metadata key {key!r} is an empty array, which gguf-py cannot write"
                )
            sub = field.types[1]
            if sub == V.ARRAY:
                raise GGUFError(f"metadata key {key!r} is a nested array, which is not supported")
            if sub == V.STRING:  # raw bytes: exact copy, no UTF-8 round trip
                vals: list = [field.parts[i].tobytes() for i in field.data]
            else:
                vals = np.concatenate([field.parts[i] for i in field.data]).tolist()
            writer.add_key_value(key, vals, V.ARRAY, sub_type=sub)
        else:
            writer.add_key_value(key, field.parts[field.data[0]][0].item(), vtype)
        if key == "general.alignment":
            writer.data_alignment = int(field.parts[field.data[0]][0])
    for key, val in overrides.items():
        writer.add_uint32(key, val)


def _convert_tensor(t: gguf.ReaderTensor, ne: tuple[int, ...], dst: T) -> np.ndarray:
    """Bytes of tensor t in type dst: raw copy if unchanged, else dequantize → quantize."""
    src = T(int(t.tensor_type))
    if dst == src:
        return t.data.reshape(-1).view(np.uint8)
    rows = math.prod(ne[1:])
    blk, type_size = gguf.GGML_QUANT_SIZES[dst]
    out = np.empty((rows, ne[0] // blk * type_size), np.uint8)
    src_rows = t.data.reshape(rows, -1)  # element rows (F32/F16) or byte rows (blocks)
    step = max(1, FILE_BATCH_ELEMS // ne[0])
    for a in range(0, rows, step):
        try:
            x = gguf.quants.dequantize(src_rows[a : a + step], src)
        except NotImplementedError as e:
            raise UnsupportedTypeError(f"tensor {t.name!r}: cannot dequantize {src.name}") from e
        try:
            out[a : a + step] = quantize_array(x.reshape(-1, ne[0]), dst, search=True)
        except InputError as e:
            raise InputError(f"tensor {t.name!r}: {e}") from e
    return out


def quantize_file(src: str, dst: str, ftype: str, *, progress: bool = True) -> None:
    """Re-quantize GGUF `src` into `dst` with llama-quantize's RWKV-7 choices for preset `ftype`.

    Metadata is copied (file_type and quantization_version updated); tensors stream one at a
    time into a temporary file next to dst, renamed over dst only when complete.
    """
    if ftype not in FTYPES:
        raise InputError(f"unknown ftype {ftype!r}; choose one of {', '.join(FTYPES)}")
    reader = _open_reader(src)
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if arch != "rwkv7":
        raise GGUFError(
            f"{src}: general.architecture is {arch!r}; the type rules here are llama.cpp's for "
            "'rwkv7' only"
        )
    plan: list[tuple[gguf.ReaderTensor, tuple[int, ...], T]] = []
    with atomic_writer(dst, arch) as writer:
        _copy_metadata(reader, writer, FTYPES[ftype])
        for t in reader.tensors:
            ne = tuple(int(v) for v in t.shape)
            new = T(tensor_type(t.name, ne, ftype, int(t.tensor_type)))
            add_packed_tensor_info(writer, t.name, ne, new)
            plan.append((t, ne, new))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (t, ne, new) in enumerate(plan):
            t0 = time.perf_counter()
            writer.write_tensor_data(_convert_tensor(t, ne, new))
            if progress:
                shape = "x".join(str(v) for v in ne)
                print(
                    f"[{i + 1:4d}/{len(plan)}] {t.name:<40} {shape:>14} "
                    f"{T(int(t.tensor_type)).name:>5} -> {new.name:<5} "
                    f"{time.perf_counter() - t0:6.2f}s",
                    file=sys.stderr,
                    flush=True,
                )
