"""Peak multiply-add rates of this CPU, the ceiling any matmul on it works under.

Run:  python -m experiments.cpu_peak [--threads 1 2] [--seconds 1.0]

Compiles a small C++ probe with the system compiler (-O3 -march=native): per thread, 12
independent accumulator chains of one instruction in a loop (enough to cover its latency on
every x86 core with two multiply-add pipes), on 1..N threads at once. Instructions, where
-march=native has them: AVX-512 float32 FMA (vfmadd231ps, 16 multiply-adds per instruction),
AVX-512 bfloat16 dot products (vdpbf16ps, 32), AVX-512 VNNI int8 dot products (vpdpbusd, 64);
on AVX2 CPUs (no AVX-512): AVX2 float32 FMA (ymm vfmadd231ps, 8) and the int8 pair llama.cpp's
AVX2 kernels use (vpmaddubsw, vpmaddwd, vpaddd: 32 per round; each chain also takes a vpxor so
the compiler cannot hoist the product, so this one is a lower bound). Reported as GMAC/s (and
GFLOP/s = 2 x GMAC/s). The float32 figure bounds the engine's float32 prefill: a pp512 of the
0.1b model multiplies 12 x 7.08 M layer weights by 512 rows (43.5 GMAC) through the native
float32 GEMM (BENCHMARKS.md, "The float32 prefill's floor").
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from rwkv_jax import cpu_kernels

SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

template <class Body>
double chains(long n, Body body) {  // seconds for n rounds of 12 independent instructions
  auto t0 = std::chrono::steady_clock::now();
  body(n);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

static volatile float sink_f;
static volatile int sink_i;

void fma_f32(long n) {
#ifdef __AVX512F__
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1.0f + i * 1e-7f);
  const __m512 b = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
  for (long k = 0; k < n; ++k)
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  float s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(a[i]);
  sink_f = s;
#endif
}

void dp_bf16(long n) {
#ifdef __AVX512BF16__
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(0.0f);
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3f80);
  for (long k = 0; k < n; ++k)
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbf16_ps(a[i], b, b);
  float s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(a[i]);
  sink_f = s;
#endif
}

void fma_f32_avx2(long n) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1.0f + i * 1e-7f);
  const __m256 b = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
  for (long k = 0; k < n; ++k)
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  float s = 0;
  for (int i = 0; i < 12; ++i)
    for (int l = 0; l < 8; ++l) s += a[i][l];
  sink_f = s;
#endif
}

void dp_int8_avx2(long n) {  // one round: 12 x (vpmaddubsw + vpmaddwd + vpaddd), 32 MACs each
#if defined(__AVX2__)
  __m256i a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_epi32(i);
  const __m256i b = _mm256_set1_epi8(1), one = _mm256_set1_epi16(1);
  for (long k = 0; k < n; ++k)
    for (int i = 0; i < 12; ++i) {
      const __m256i p = _mm256_maddubs_epi16(_mm256_xor_si256(b, a[i]), b);
      a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(p, one));
    }
  int s = 0;
  for (int i = 0; i < 12; ++i) s += _mm256_extract_epi32(a[i], 0);
  sink_i = s;
#endif
}

void dp_int8(long n) {
#ifdef __AVX512VNNI__
  __m512i a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_epi32(i);
  const __m512i b = _mm512_set1_epi8(1);
  for (long k = 0; k < n; ++k)
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbusd_epi32(a[i], b, b);
  int s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_epi32(a[i]);
  sink_i = s;
#endif
}

int main(int argc, char** argv) {
  const int threads = std::atoi(argv[1]);
  const double seconds = std::atof(argv[2]);
  struct Kind { const char* name; void (*fn)(long); int macs; bool have; };
  const Kind kinds[] = {
#ifdef __AVX512F__
    {"avx512 fma f32", fma_f32, 16, true},
#endif
#ifdef __AVX512BF16__
    {"avx512 vdpbf16ps", dp_bf16, 32, true},
#endif
#ifdef __AVX512VNNI__
    {"avx512 vpdpbusd int8", dp_int8, 64, true},
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
    {"avx2 fma f32", fma_f32_avx2, 8, true},
    {"avx2 vpmaddubsw int8", dp_int8_avx2, 32, true},
#endif
    {nullptr, nullptr, 0, false}};
  for (const Kind* k = kinds; k->name; ++k) {
    long n = 1000000;
    while (chains(n, k->fn) < 0.05 * seconds) n *= 2;  // calibrate on one thread
    n = static_cast<long>(n * seconds / (chains(n, k->fn) + 1e-9));
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back([&] { k->fn(n); });
    for (auto& t : pool) t.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double gmac = threads * 12.0 * n * k->macs / s / 1e9;
    std::printf("%-22s threads %d: %8.1f GMAC/s (%8.1f GFLOP/s)\n", k->name, threads, gmac,
                2 * gmac);
  }
  return 0;
}
"""


def build(out_dir: Path) -> Path:
    """Compile the probe with the system C++ compiler; returns the executable's path."""
    cxx = cpu_kernels._compiler()
    if cxx is None:
        raise SystemExit("cpu_peak needs a C++ compiler (g++ or clang++) on PATH")
    src, exe = out_dir / "cpu_peak.cc", out_dir / "cpu_peak"
    src.write_text(SOURCE)
    cmd = [cxx, "-O3", "-march=native", "-pthread", str(src), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"compiling the probe failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=1.0, help="per instruction and thread count")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rwkv_cpu_peak_") as d:
        exe = build(Path(d))
        for t in a.threads:
            out = subprocess.run([str(exe), str(t), str(a.seconds)], capture_output=True, text=True)
            print(out.stdout, end="")
            if out.returncode != 0:
                raise SystemExit(f"the probe failed: {out.stderr[-2000:]}")
            if not out.stdout:
                print(f"threads {t}: no AVX-512 or AVX2 multiply-add instruction on this CPU")


if __name__ == "__main__":
    main()
