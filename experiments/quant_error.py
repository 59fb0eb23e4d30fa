"""Quantization error of rwkv_jax.quantize vs llama.cpp's own reference quantizers.

Run:  python -m experiments.quant_error --llama-src /tmp/lcp/llama_cpp_python-0.3.36

`--llama-src` is an extracted llama.cpp tree or llama-cpp-python sdist (which vendors one, e.g.
from `pip download --no-deps --no-binary :all: llama-cpp-python`). The script compiles that
tree's ggml/src/ggml-quants.c into a shared library under /tmp (plus a few stubs of our own for
symbols only the non-reference paths use) and calls quantize_row_*_ref through ctypes. No
llama.cpp source is copied into this repository. Without --llama-src only our numbers print.

Inputs: real-shaped weight matrices (2560x2560): normal(0, 0.02) and a heavier-tailed
Student-t(3)·0.02. Output: one table row per (matrix, type): our RMSE (search on and off),
llama.cpp's RMSE, the ratio, the fraction of byte-identical blocks, and throughput.
`--golden` prints sha256 digests of llama.cpp's bytes for the deterministic input used by
tests/test_quantize.py::test_k_quants_match_llama_cpp_bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from rwkv_jax.quantize import quantize_array

T = gguf.GGMLQuantizationType
REF_FUNCS = {
    T.Q4_K: "quantize_row_q4_K_ref",
    T.Q5_K: "quantize_row_q5_K_ref",
    T.Q6_K: "quantize_row_q6_K_ref",
    T.Q8_0: "quantize_row_q8_0_ref",
    T.Q4_0: "quantize_row_q4_0_ref",
    T.Q5_0: "quantize_row_q5_0_ref",
    T.Q5_1: "quantize_row_q5_1_ref",
}
# Symbols ggml-quants.c references only from its non-reference paths (row-size helpers, abort).
STUBS_C = r"""
#include <stddef.h>
#include <stdlib.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { abort(); }
size_t ggml_row_size(int type, long long ne) { abort(); }
const char *ggml_type_name(int type) { return "?"; }
size_t ggml_type_size(int type) { abort(); }
"""


def build_reference(llama_src: Path, native: bool = False) -> ctypes.CDLL:
    """Compile <llama_src>/…/ggml/src/ggml-quants.c into /tmp and load it."""
    found = sorted(llama_src.glob("**/ggml/src/ggml-quants.c"))
    if not found:
        sys.exit(f"no ggml/src/ggml-quants.c under {llama_src}; pass an extracted llama.cpp tree")
    src = found[0]
    ggml = src.parent.parent  # …/ggml
    out_dir = Path(tempfile.gettempdir()) / "rwkv_jax_ggml_quants"
    out_dir.mkdir(exist_ok=True)
    stubs = out_dir / "stubs.c"
    stubs.write_text(STUBS_C)
    lib = out_dir / f"libggml_quants_ref{'_native' if native else ''}.so"
    # -O2 without -march: no FMA contraction, so the float32 arithmetic is plain IEEE.
    # --native mimics llama.cpp's default GGML_NATIVE build, where gcc contracts a*b+c to FMA.
    opt = ["-O3", "-march=native"] if native else ["-O2"]
    cmd = ["gcc", *opt, "-DNDEBUG", "-fPIC", "-shared", "-std=gnu11"]
    cmd += [f"-I{ggml / 'include'}", f"-I{ggml / 'src'}", str(src), str(stubs), "-o", str(lib)]
    subprocess.run([*cmd, "-lm"], check=True)
    print(f"built {lib} from {src}", file=sys.stderr)
    return ctypes.CDLL(str(lib))


def reference_quantize(lib: ctypes.CDLL, x: np.ndarray, qtype: T) -> np.ndarray:
    """llama.cpp quantize_row_<type>_ref over all of x (rows are whole blocks)."""
    blk, type_size = gguf.GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // blk * type_size), np.uint8)
    fn = getattr(lib, REF_FUNCS[qtype])
    fn.restype = None
    fn(
        x.ctypes.data_as(ctypes.c_void_p),
        out.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int64(x.size),
    )
    return out


def golden_input() -> np.ndarray:
    """Deterministic [16, 512] float32 input from integer arithmetic (no RNG, no libm)."""
    i = np.arange(16 * 512, dtype=np.int64)
    u = ((i * 1103515245 + 12345) % (1 << 16)).astype(np.float64) / (1 << 16) - 0.5  # exact
    x = u * u * u * 0.5 + u * 0.01  # heavy-ish tails; IEEE basic ops only
    x[:256] = 0.0  # an all-zero super-block
    x[1024:1040] = 0.0  # zero sub-blocks inside a live block
    return x.astype(np.float32).reshape(16, 512)


def rmse(q: np.ndarray, qtype: T, x: np.ndarray) -> float:
    """RMSE of the dequantized bytes (gguf.quants.dequantize) against x."""
    d = gguf.quants.dequantize(q, qtype).astype(np.float64)
    return float(np.sqrt(np.mean((d - x) ** 2)))


def main() -> None:
    """Print the error table (and optionally the golden digests)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--llama-src", type=Path, help="extracted llama.cpp tree / sdist")
    ap.add_argument("--size", type=int, default=2560, help="matrix is size x size")
    ap.add_argument("--all-types", action="store_true", help="also Q8_0/Q4_0/Q5_0/Q5_1")
    ap.add_argument("--golden", action="store_true", help="print llama.cpp digests for tests")
    ap.add_argument("--native", action="store_true", help="build the reference -march=native")
    args = ap.parse_args()
    lib = build_reference(args.llama_src, args.native) if args.llama_src else None

    if args.golden:
        if lib is None:
            sys.exit("--golden needs --llama-src")
        g = golden_input()
        for t in (T.Q4_K, T.Q5_K, T.Q6_K):
            ref = reference_quantize(lib, g, t).tobytes()
            ours = quantize_array(g, t).tobytes()
            digest = hashlib.sha256(ref).hexdigest()
            print(f"{t.name}: {digest}  (ours identical: {ours == ref})")
        return

    rng = np.random.default_rng(0)
    n = args.size
    mats = {
        "normal(0,0.02)": (rng.standard_normal((n, n)) * 0.02).astype(np.float32),
        "student-t3*0.02": (rng.standard_t(3, (n, n)) * 0.02).astype(np.float32),
    }
    types = list(REF_FUNCS) if args.all_types else [T.Q4_K, T.Q5_K, T.Q6_K]
    print(
        "| matrix | type | ours RMSE | ours no-search RMSE | llama.cpp RMSE | ratio "
        "| identical blocks | ours Mel/s | llama.cpp Mel/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mname, x in mats.items():
        for t in types:
            t0 = time.perf_counter()
            ours = quantize_array(x, t, search=True)
            t_ours = time.perf_counter() - t0
            fast = quantize_array(x, t, search=False)
            e_ours, e_fast = rmse(ours, t, x), rmse(fast, t, x)
            if lib is None:
                print(
                    f"| {mname} | {t.name} | {e_ours:.4e} | {e_fast:.4e} | - | - | - "
                    f"| {x.size / t_ours / 1e6:.1f} | - |"
                )
                continue
            t0 = time.perf_counter()
            ref = reference_quantize(lib, x, t)
            t_ref = time.perf_counter() - t0
            e_ref = rmse(ref, t, x)
            type_size = gguf.GGML_QUANT_SIZES[t][1]
            same = (ours.reshape(-1, type_size) == ref.reshape(-1, type_size)).all(axis=1).mean()
            print(
                f"| {mname} | {t.name} | {e_ours:.4e} | {e_fast:.4e} | {e_ref:.4e} "
                f"| {e_ours / e_ref:.4f} | {same * 100:.2f}% | {x.size / t_ours / 1e6:.1f} "
                f"| {x.size / t_ref / 1e6:.1f} |"
            )


if __name__ == "__main__":
    main()
