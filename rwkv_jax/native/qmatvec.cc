// qmatvec.cc: y[M, out] = x[M, in] · Wᵀ over packed ggml weight blocks, as XLA FFI custom calls
// for the CPU (rwkv_jax/cpu_kernels.py builds, loads and registers this file).
//
// Every weight element is dequantized to exactly the float32 value ggml's dequantize_row_* gives
// (the same values as rwkv_jax/quant.py), multiplied by float32 x and accumulated in float32
// (bfloat16 x: see below). Only the summation order differs from a plain dot, except Q4_K and
// Q6_K at one float32 activation row (AVX-512 or AVX2, decode): there each sub-block's scale
// (and Q4_K's min) is factored out of its sum (q4k_row1, q6k_row1 and their _avx2 versions), the
// same weight values with another rounding; on AVX2 the sums over x are exact int32 sums over x
// held as 26-bit fixed point per 32 values (x_int16_digits: within 2^-26 of the group's largest
// |x|, finer than float32's own rounding of it), which vpmaddwd multiplies 16 values at a time.
//
// Why fused multiply-adds keep the ggml values: contraction (-ffp-contract=fast) may turn
// `dl * q - ml` into fma(dl, q, -ml), which rounds once instead of twice. In every format here the
// product is exact in float32 (an f16 scale has 11 significant bits; d*sc adds at most 8 bits of
// the integer sub-scale, *q at most 6 more: <= 24 bits), so the fused and unfused results agree.
// Formats whose value is a single product (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K) round exactly once
// anyway. Products with x and the accumulation may fuse freely: that only changes rounding
// inside the dot product, which the float32 dot error bound already covers.
//
// Layout of the weight: each format's block struct is split into its fields (quant.py
// `from_raw`), each a C-contiguous array [out, nb, *per_block] with nb = in / QK blocks per row
// (dense formats: one array w [out, in]); optionally a stack [L, ...] of such weights plus a
// layer index (see the FFI glue at the end).
//
// Code: each format's `block` dequantizes one block into runs of 16 floats (`emit`); the kernel
// multiplies each run into 16-lane accumulators for MB activation rows at once (a weight block is
// unpacked once for all MB rows), and sums lanes for 16 weight rows together. From
// kTiledMinRows activation rows (prefill) the blocks are unpacked into float32 tiles instead and
// multiplied by a register-blocked microkernel (`rows_tiled`). The vectors are
// GCC/clang vector extensions (AVX-512, AVX2, NEON or plain C++, whatever -march gives), or
// under GCC without 64-byte registers a struct of native-width ones (Wide, below); the
// decode-critical Q4_K (16-entry lookup tables via vpermps) and Q6_K (whole-half bit unpacking)
// have AVX-512 paths, and at one row their own factored kernels (AVX-512 and AVX2); AVX2 has
// its own tile microkernel (tile_block_ymm). Rows of W are split between a thread pool
// (created on first use) and the calling thread; a call takes the pool only if no other call
// holds it (XLA may run independent custom calls concurrently), otherwise it runs on its own
// thread.
//
// bfloat16 activations (the rwkv_qmatvec_bf16_* targets, engine dtype bfloat16): the product
// XLA's bfloat16 path computes, y = bf16(x) · bf16(W)ᵀ with float32 accumulation, where bf16(W)
// rounds ggml's float32 values to nearest even (XLA's dequantize(bf16)). Products of two
// bfloat16 values are exact in float32, so every path below differs only in summation order:
// with avx512_bf16, vdpbf16ps (two products per float32 lane, 2x the FMA rate) on bfloat16
// tiles (prefill; rows_short_bf16 for short rows) or on pairs of runs rounded by vcvtne2ps2bf16
// (decode; Q4_K via 32-entry bfloat16 tables, vpermw); elsewhere the float32 kernels over the
// rounded values (Bf16Of, the portable path). vdpbf16ps treats bfloat16 subnormals as zero.

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------------------------
// 16-lane vectors: zmm with AVX-512, 2 ymm with AVX2, 4 q-registers with NEON.
//
// GCC/clang vector extensions of 64 bytes where the target has 64-byte registers (AVX-512) or
// the compiler splits them into registers itself (clang). GCC without 64-byte registers gives a
// 64-byte vector type no machine mode: every variable of it lives on the stack and each
// operation moves its halves through memory and general registers (GCC 12, AVX2: the tiled
// prefill kernel's accumulators stored and reloaded around every multiply-add). There the 16
// lanes are a struct of native-width vectors (Wide, below) with the same operators, so the
// code using them reads the same on every target. RWKV_WIDE_STRUCT=0/1 forces either.
#ifndef RWKV_WIDE_STRUCT
#if defined(__AVX512F__) || defined(__clang__)
#define RWKV_WIDE_STRUCT 0
#else
#define RWKV_WIDE_STRUCT 1
#endif
#endif

#if RWKV_WIDE_STRUCT
#if defined(__AVX__)
constexpr int kPartBytes = 32;  // ymm
#else
constexpr int kPartBytes = 16;  // xmm (SSE2) or a q-register (NEON)
#endif
template <class E>
struct PartOf {  // the native vector of elements E
  typedef E type __attribute__((vector_size(kPartBytes)));
};

// 16 lanes of E as 64 / kPartBytes native vectors; an aggregate (E{} is all zeros).
template <class E>
struct Wide {
  using P = typename PartOf<E>::type;
  using Elem = E;
  static constexpr int kParts = 64 / kPartBytes, kLanes = kPartBytes / sizeof(E);
  P v[kParts];
  E operator[](int i) const { return v[i / kLanes][i % kLanes]; }
};

// Element-wise operators: vector op vector, vector op scalar, scalar op vector, op=.
#define RWKV_WIDE_BINARY(op)                                                            \
  template <class E>                                                                    \
  inline Wide<E> operator op(Wide<E> a, const Wide<E>& b) {                             \
    for (int k = 0; k < Wide<E>::kParts; ++k) a.v[k] = a.v[k] op b.v[k];                \
    return a;                                                                           \
  }                                                                                     \
  template <class E, class S, class = std::enable_if_t<std::is_arithmetic_v<S>>>        \
  inline Wide<E> operator op(Wide<E> a, S s) {                                          \
    for (int k = 0; k < Wide<E>::kParts; ++k) a.v[k] = a.v[k] op static_cast<E>(s);     \
    return a;                                                                           \
  }                                                                                     \
  template <class E, class S, class = std::enable_if_t<std::is_arithmetic_v<S>>>        \
  inline Wide<E> operator op(S s, Wide<E> a) {                                          \
    for (int k = 0; k < Wide<E>::kParts; ++k) a.v[k] = static_cast<E>(s) op a.v[k];     \
    return a;                                                                           \
  }                                                                                     \
  template <class E, class B>                                                           \
  inline Wide<E>& operator op##=(Wide<E>& a, const B& b) {                              \
    return a = a op b;                                                                  \
  }
RWKV_WIDE_BINARY(+)
RWKV_WIDE_BINARY(-)
RWKV_WIDE_BINARY(*)
RWKV_WIDE_BINARY(/)
RWKV_WIDE_BINARY(&)
RWKV_WIDE_BINARY(|)
RWKV_WIDE_BINARY(<<)
RWKV_WIDE_BINARY(>>)
#undef RWKV_WIDE_BINARY

template <class E>
inline Wide<E> operator-(Wide<E> a) {
  for (int k = 0; k < Wide<E>::kParts; ++k) a.v[k] = -a.v[k];
  return a;
}

// Comparisons give lane masks (-1 / 0 in int32 lanes), as the vector extensions do.
#define RWKV_WIDE_COMPARE(op)                                                                \
  template <class E>                                                                         \
  inline Wide<int32_t> operator op(const Wide<E>& a, const Wide<E>& b) {                     \
    Wide<int32_t> m;                                                                         \
    for (int k = 0; k < Wide<E>::kParts; ++k) m.v[k] = a.v[k] op b.v[k];                     \
    return m;                                                                                \
  }
RWKV_WIDE_COMPARE(<)
RWKV_WIDE_COMPARE(>)
#undef RWKV_WIDE_COMPARE

typedef Wide<float> v16f;
typedef Wide<int32_t> v16i;
typedef Wide<uint32_t> v16u;

// Same bits, other lane type (reinterpret_cast between vector types).
template <class To, class From>
inline To vcast(const From& a) {
  To t;
  for (int k = 0; k < From::kParts; ++k) t.v[k] = reinterpret_cast<typename To::P>(a.v[k]);
  return t;
}
// Lane-wise value conversion (__builtin_convertvector).
template <class To, class From>
inline To vconvert(const From& a) {
  To t;
  for (int k = 0; k < From::kParts; ++k) t.v[k] = __builtin_convertvector(a.v[k], typename To::P);
  return t;
}
// mask ? a : b per lane.
template <class V>
inline V vselect(const v16i& mask, const V& a, const V& b) {
  V t;
  for (int k = 0; k < V::kParts; ++k) t.v[k] = mask.v[k] ? a.v[k] : b.v[k];
  return t;
}
#else
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

template <class To, class From>
inline To vcast(const From& a) {
  return reinterpret_cast<To>(a);
}
template <class To, class From>
inline To vconvert(const From& a) {
  return __builtin_convertvector(a, To);
}
template <class V>
inline V vselect(const v16i& mask, const V& a, const V& b) {
  return mask ? a : b;
}
#endif
typedef uint8_t v16b __attribute__((vector_size(16)));
typedef int8_t v16sb __attribute__((vector_size(16)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

#if defined(__AVX512F__)
constexpr int kMaxRows = 8;  // activation rows per pass: 8 x NA accumulators fit 32 zmm
#else
constexpr int kMaxRows = 4;  // 16 ymm (AVX2) / 32 q-registers (NEON) hold fewer v16f
#endif

// Loads and stores by parts under the struct: one memcpy of the whole struct goes through a
// stack copy in 16-byte pieces, and the 32-byte loads after them wait for store forwarding.
inline v16f load_f32(const float* p) {
  v16f v;
#if RWKV_WIDE_STRUCT
  for (int k = 0; k < v16f::kParts; ++k) std::memcpy(&v.v[k], p + k * v16f::kLanes, kPartBytes);
#else
  std::memcpy(&v, p, sizeof v);
#endif
  return v;
}

inline void store_f32(float* p, v16f v) {
#if RWKV_WIDE_STRUCT
  for (int k = 0; k < v16f::kParts; ++k) std::memcpy(p + k * v16f::kLanes, &v.v[k], kPartBytes);
#else
  std::memcpy(p, &v, sizeof v);
#endif
}

#if defined(__AVX__)
// A 16-lane vector from two 8-lane halves.
template <class V, class H>
inline V join(H lo, H hi) {
  V v;
#if RWKV_WIDE_STRUCT
  v.v[0] = reinterpret_cast<typename V::P>(lo);
  v.v[1] = reinterpret_cast<typename V::P>(hi);
#else
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
#endif
  return v;
}
#endif

inline v16b load_u8(const uint8_t* p) {
  v16b v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Byte -> int32 widening. GCC scalarizes __builtin_convertvector of signed bytes, so the x86
// paths use the pmovzx/pmovsx intrinsics.
inline v16i u8_to_i32(v16b q) {
#if defined(__AVX512F__)
  return reinterpret_cast<v16i>(_mm512_cvtepu8_epi32(reinterpret_cast<__m128i>(q)));
#elif defined(__AVX2__)
  const __m128i b = reinterpret_cast<__m128i>(q);
  return join<v16i>(_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
#elif RWKV_WIDE_STRUCT
  alignas(64) int32_t t[16];
  for (int i = 0; i < 16; ++i) t[i] = q[i];
  v16i v;
  std::memcpy(&v, t, sizeof v);
  return v;
#else
  return __builtin_convertvector(q, v16i);
#endif
}

inline v16i s8_to_i32(v16sb q) {
#if defined(__AVX512F__)
  return reinterpret_cast<v16i>(_mm512_cvtepi8_epi32(reinterpret_cast<__m128i>(q)));
#elif defined(__AVX2__)
  const __m128i b = reinterpret_cast<__m128i>(q);
  return join<v16i>(_mm256_cvtepi8_epi32(b), _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
#elif RWKV_WIDE_STRUCT
  alignas(64) int32_t t[16];
  for (int i = 0; i < 16; ++i) t[i] = q[i];
  v16i v;
  std::memcpy(&v, t, sizeof v);
  return v;
#else
  return __builtin_convertvector(q, v16i);
#endif
}

inline v16f i32_to_f32(v16i q) { return vconvert<v16f>(q); }  // exact here

inline v16f u8_to_f32(v16b q) { return i32_to_f32(u8_to_i32(q)); }

// The same pointer, opaque to the optimizer: loads through it are not replaced by register
// shuffles of the values just stored (a broadcast load is cheaper than a permute).
template <class T>
inline const T* launder(const T* p) {
  asm("" : "+r"(p));
  return p;
}

inline float hsum(v16f v) {
  v8f lo, hi;
#if RWKV_WIDE_STRUCT && defined(__AVX__)
  lo = v.v[0];  // the same halves, without a trip through memory
  hi = v.v[1];
#else
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
#endif
  v8f s8 = lo + hi;
  v4f a, b;
  std::memcpy(&a, &s8, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof a, sizeof b);
  v4f s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

#if defined(__AVX__)
// The lane sum of 8 floats (hsum after its first step).
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  return (s[0] + s[2]) + (s[1] + s[3]);
}
#endif

// IEEE binary16 -> binary32, exact (subnormals, inf and NaN included).
inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    const float f = static_cast<float>(man) * 5.9604644775390625e-08f;  // man * 2^-24, exact
    return sign ? -f : f;
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

inline v16f f16x16_to_f32(const uint16_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<v16f>(
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
  return join<v16f>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                    _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))));
#else
  float t[16];
  for (int i = 0; i < 16; ++i) t[i] = f16_to_f32(p[i]);
  return load_f32(t);
#endif
}

inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline v16f bf16x16_to_f32(const uint16_t* p) {
#if RWKV_WIDE_STRUCT
  typedef uint16_t half_part __attribute__((vector_size(kPartBytes / 2)));
  v16u bits;
  for (int k = 0; k < v16u::kParts; ++k) {
    half_part h;
    std::memcpy(&h, p + k * v16u::kLanes, sizeof h);
    bits.v[k] = __builtin_convertvector(h, v16u::P) << 16;
  }
#else
  v16h h;
  std::memcpy(&h, p, sizeof h);
  v16u bits = __builtin_convertvector(h, v16u) << 16;
#endif
  return vcast<v16f>(bits);
}

// Round-to-nearest-even to bfloat16, kept in float32 (low 16 bits cleared): for every finite
// float32 the value XLA's convert f32 -> bf16 gives (and vcvtne(2)ps2bf16 for normal inputs).
inline v16f round_bf16(v16f v) {
  v16u u = vcast<v16u>(v);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  return vcast<v16f>(u);
}

inline float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// ---------------------------------------------------------------------------------------------
// Formats. Each declares its fields (dtype, per-block trailing size; 0 = none) and a `block`
// function that dequantizes block b of weight row r and calls emit(c, w) for each run of 16
// elements (elements 16c .. 16c+15 of the block, w their float32 values).

struct Problem {
  const float* x;     // [m, in]
  float* y;           // [m, out]
  const void* f[5];   // field base pointers
  int64_t m, in, out;
  int64_t nb;         // blocks per weight row (dense: full 16-element runs per row)
  int64_t xs;         // floats from one activation row to the next (in, or padded: see run)
  // one activation row, Q4_K (AVX-512, AVX2): per block 16 floats, 0 x 8 then the sums of x
  // over the 8 sub-blocks (see q4k_row1); nullptr elsewhere
  const float* xsum = nullptr;
  // one activation row, Q6_K (AVX-512 BW): x permuted and summed per block (see q6k_row1)
  const float* xperm = nullptr;
  // one activation row, Q6_K (AVX2): the sums of x over each 16-value sub-block (q6k_row1_avx2)
  const float* xsub = nullptr;
  // one activation row, Q4_K and Q6_K (AVX2): x as int16 digits, their scales (x_int16_digits)
  const int16_t* xq = nullptr;
  const float* xq_scale = nullptr;
  // bfloat16 activations (the *_bf16 targets): x is nullptr, xb [m, in] with rows xbs apart
  const uint16_t* xb = nullptr;
  int64_t xbs = 0;
  bool portable = false;  // bf16: take the portable path even where avx512_bf16 exists (tests)
};

struct FieldSpec {
  ffi::DataType dtype;
  int64_t trail;  // per-block trailing axis length, 0 if the field is [out, nb]
};

template <class T>
inline const T* field(const Problem& p, int k) {
  return static_cast<const T*>(p.f[k]);
}

// Q4_0 {f16 d; u8 qs[16]}: x = d * (nibble - 8); low nibbles are elements 0-15.
struct Q4_0 {
  static constexpr const char* kName = "Q4_0";
  static constexpr int QK = 32, NF = 2;
  static constexpr bool kDense = false;
  static constexpr FieldSpec kFields[NF] = {{ffi::DataType::F16, 0}, {ffi::DataType::U8, 16}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    const int64_t i = r * p.nb + b;
    const float d = f16_to_f32(field<uint16_t>(p, 0)[i]);
    const v16b q = load_u8(field<uint8_t>(p, 1) + 16 * i);
    emit(0, d * i32_to_f32(u8_to_i32(q & 15) - 8));
    emit(1, d * i32_to_f32(u8_to_i32(q >> 4) - 8));
  }
};

// Q4_1 {f16 d; f16 m; u8 qs[16]}: x = d * nibble + m.
struct Q4_1 {
  static constexpr const char* kName = "Q4_1";
  static constexpr int QK = 32, NF = 3;
  static constexpr bool kDense = false;
  static constexpr FieldSpec kFields[NF] = {
      {ffi::DataType::F16, 0}, {ffi::DataType::F16, 0}, {ffi::DataType::U8, 16}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    const int64_t i = r * p.nb + b;
    const float d = f16_to_f32(field<uint16_t>(p, 0)[i]);
    const float m = f16_to_f32(field<uint16_t>(p, 1)[i]);
    const v16b q = load_u8(field<uint8_t>(p, 2) + 16 * i);
    emit(0, d * u8_to_f32(q & 15) + m);
    emit(1, d * u8_to_f32(q >> 4) + m);
  }
};

// The fifth bits of a q5_0/q5_1 block: element e takes bit e of the little-endian u32 qh.
inline void q5_high_bits(const uint8_t* qh, v16i& h_lo, v16i& h_hi) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  alignas(64) static constexpr uint32_t kLane[16] = {0, 1, 2,  3,  4,  5,  6,  7,
                                                     8, 9, 10, 11, 12, 13, 14, 15};
  v16u lane;
  std::memcpy(&lane, kLane, sizeof lane);
  const v16u all = v16u{} + bits;
  h_lo = vcast<v16i>(((all >> lane) & 1u) << 4);
  h_hi = vcast<v16i>(((all >> (lane + 16u)) & 1u) << 4);
}

// Q5_0 {f16 d; u8 qh[4]; u8 qs[16]}: x = d * (q5 - 16).
struct Q5_0 {
  static constexpr const char* kName = "Q5_0";
  static constexpr int QK = 32, NF = 3;
  static constexpr bool kDense = false;
  static constexpr FieldSpec kFields[NF] = {
      {ffi::DataType::F16, 0}, {ffi::DataType::U8, 4}, {ffi::DataType::U8, 16}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    const int64_t i = r * p.nb + b;
    const float d = f16_to_f32(field<uint16_t>(p, 0)[i]);
    v16i h_lo, h_hi;
    q5_high_bits(field<uint8_t>(p, 1) + 4 * i, h_lo, h_hi);
    const v16b q = load_u8(field<uint8_t>(p, 2) + 16 * i);
    emit(0, d * i32_to_f32((u8_to_i32(q & 15) | h_lo) - 16));
    emit(1, d * i32_to_f32((u8_to_i32(q >> 4) | h_hi) - 16));
  }
};

// Q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]}: x = d * q5 + m.
struct Q5_1 {
  static constexpr const char* kName = "Q5_1";
  static constexpr int QK = 32, NF = 4;
  static constexpr bool kDense = false;
  static constexpr FieldSpec kFields[NF] = {{ffi::DataType::F16, 0},
                                            {ffi::DataType::F16, 0},
                                            {ffi::DataType::U8, 4},
                                            {ffi::DataType::U8, 16}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    const int64_t i = r * p.nb + b;
    const float d = f16_to_f32(field<uint16_t>(p, 0)[i]);
    const float m = f16_to_f32(field<uint16_t>(p, 1)[i]);
    v16i h_lo, h_hi;
    q5_high_bits(field<uint8_t>(p, 2) + 4 * i, h_lo, h_hi);
    const v16b q = load_u8(field<uint8_t>(p, 3) + 16 * i);
    emit(0, d * i32_to_f32(u8_to_i32(q & 15) | h_lo) + m);
    emit(1, d * i32_to_f32(u8_to_i32(q >> 4) | h_hi) + m);
  }
};

// Q8_0 {f16 d; i8 qs[32]}: x = d * q.
struct Q8_0 {
  static constexpr const char* kName = "Q8_0";
  static constexpr int QK = 32, NF = 2;
  static constexpr bool kDense = false;
  static constexpr FieldSpec kFields[NF] = {{ffi::DataType::F16, 0}, {ffi::DataType::S8, 32}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    const int64_t i = r * p.nb + b;
    const float d = f16_to_f32(field<uint16_t>(p, 0)[i]);
    const int8_t* qs = field<int8_t>(p, 1) + 32 * i;
    v16sb q0, q1;
    std::memcpy(&q0, qs, 16);
    std::memcpy(&q1, qs + 16, 16);
    emit(0, d * i32_to_f32(s8_to_i32(q0)));
    emit(1, d * i32_to_f32(s8_to_i32(q1)));
  }
};

// Q2_K {u8 scales[16]; u8 qs[64]; f16 d; f16 dmin}: x = (d*sc)*q - (dmin*mn) per 16 elements.
struct Q2_K {
  static constexpr const char* kName = "Q2_K";
  static constexpr int QK = 256, NF = 4;
  static constexpr bool kDense = false;
  static constexpr FieldSpec kFields[NF] = {{ffi::DataType::U8, 16},
                                            {ffi::DataType::U8, 64},
                                            {ffi::DataType::F16, 0},
                                            {ffi::DataType::F16, 0}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    const int64_t i = r * p.nb + b;
    const uint8_t* sc = field<uint8_t>(p, 0) + 16 * i;
    const uint8_t* qs = field<uint8_t>(p, 1) + 64 * i;
    const float d = f16_to_f32(field<uint16_t>(p, 2)[i]);
    const float dmin = f16_to_f32(field<uint16_t>(p, 3)[i]);
    // run c = 8*half + 2*j + k: bytes qs[32*half + 16*k ..], shift 2j, scale sc[c]
    for (int h = 0; h < 2; ++h) {
      for (int k = 0; k < 2; ++k) {
        const v16b q = load_u8(qs + 32 * h + 16 * k);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const int c = 8 * h + 2 * j + k;
          const float dl = d * static_cast<float>(sc[c] & 0xF);
          const float ml = dmin * static_cast<float>(sc[c] >> 4);
          emit(c, dl * u8_to_f32((q >> (2 * j)) & 3) - ml);
        }
      }
    }
  }
};

// Q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}: x = (d*(sc-32)) * (q2 - 4*!hbit).
struct Q3_K {
  static constexpr const char* kName = "Q3_K";
  static constexpr int QK = 256, NF = 4;
  static constexpr bool kDense = false;
  static constexpr FieldSpec kFields[NF] = {{ffi::DataType::U8, 32},
                                            {ffi::DataType::U8, 64},
                                            {ffi::DataType::U8, 12},
                                            {ffi::DataType::F16, 0}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    const int64_t i = r * p.nb + b;
    const uint8_t* hm = field<uint8_t>(p, 0) + 32 * i;
    const uint8_t* qs = field<uint8_t>(p, 1) + 64 * i;
    const float d = f16_to_f32(field<uint16_t>(p, 3)[i]);
    // 16 6-bit scales from 12 bytes, as ggml's dequantize_row_q3_K (kmask1/kmask2 shuffle)
    uint32_t aux[4];
    std::memcpy(aux, field<uint8_t>(p, 2) + 12 * i, 12);
    const uint32_t tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & 0x0f0f0f0fu) | (((tmp >> 4) & 0x03030303u) << 4);
    aux[3] = ((aux[1] >> 4) & 0x0f0f0f0fu) | (((tmp >> 6) & 0x03030303u) << 4);
    aux[0] = (aux[0] & 0x0f0f0f0fu) | (((tmp >> 0) & 0x03030303u) << 4);
    aux[1] = (aux[1] & 0x0f0f0f0fu) | (((tmp >> 2) & 0x03030303u) << 4);
    int8_t sc[16];
    std::memcpy(sc, aux, 16);
    // run c = 8*half + 2*j + k: low bits qs[32*half + 16*k ..] >> 2j, high bit 4*half + j of
    // hmask[16*k ..]
    for (int k = 0; k < 2; ++k) {
      const v16b hk = load_u8(hm + 16 * k);
      for (int h = 0; h < 2; ++h) {
        const v16b q = load_u8(qs + 32 * h + 16 * k);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const int c = 8 * h + 2 * j + k;
          const float dl = d * static_cast<float>(sc[c] - 32);
          const v16i q2 = u8_to_i32((q >> (2 * j)) & 3);
          const v16i hb = u8_to_i32((hk >> (4 * h + j)) & 1);
          emit(c, dl * i32_to_f32(q2 + (hb << 2) - 4));
        }
      }
    }
  }
};

// get_scale_min_k4 for all 8 sub-blocks of a Q4_K/Q5_K super-block: d*sc and dmin*mn.
inline void k4_scales(const uint8_t* s, float d, float dmin, float* dl, float* ml) {
  for (int j = 0; j < 4; ++j) {
    dl[j] = d * static_cast<float>(s[j] & 63);
    ml[j] = dmin * static_cast<float>(s[j + 4] & 63);
    dl[j + 4] = d * static_cast<float>((s[j + 8] & 0xF) | ((s[j] >> 6) << 4));
    ml[j + 4] = dmin * static_cast<float>((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
  }
}

// The 6-bit fields of a K4 scales[12] regrouped into bytes sc[0..7], mn[0..7].
inline void k4_regroup(const uint8_t* s12, uint32_t* u) {
  std::memcpy(u, s12, 12);
  const uint32_t lo6 = 0x3f3f3f3fu, lo4 = 0x0f0f0f0fu, top2 = 0x03030303u;
  u[3] = ((u[2] >> 4) & lo4) | (((u[1] >> 6) & top2) << 4);  // mn[4..7]
  const uint32_t mn03 = u[1] & lo6;                            // mn[0..3]
  u[1] = (u[2] & lo4) | (((u[0] >> 6) & top2) << 4);          // sc[4..7]
  u[2] = mn03;
  u[0] &= lo6;  // sc[0..3]
}

#if defined(__AVX512F__)
// The same 16 numbers with vector arithmetic: s[0..7] = d*sc, s[8..15] = -(dmin*mn) (the sign
// flip is exact); s 64-byte aligned.
inline void k4_scales_vec(const uint8_t* s12, float d, float dmin, float* s) {
  uint32_t u[4];
  k4_regroup(s12, u);
  const __m512 v = _mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u))));
  const __m512 scale = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(d), _mm512_set1_ps(-dmin));
  _mm512_store_ps(s, _mm512_mul_ps(v, scale));
}
#elif defined(__AVX2__)
// k4_regroup in a vector register: bytes sc[0..7], mn[0..7] from the 12 scale bytes s12.
inline __m128i k4_regroup_vec(const uint8_t* s12) {
  uint32_t tail;
  std::memcpy(&tail, s12 + 8, 4);
  const __m128i s = _mm_insert_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s12)),
                                     static_cast<int>(tail), 2);
  // low 6 bits: s[0..3] (sc 0-3), s[4..7] (mn 0-3); low / high nibbles of s[8..11] (sc / mn 4-7)
  const __m128i a = _mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9,
                                                      10, 11));
  const __m128i a4 = _mm_blend_epi16(a, _mm_srli_epi16(a, 4), 0xC0);  // bytes 12-15 >> 4
  const __m128i low = _mm_and_si128(
      a4, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
  // bits 4-5 of sc / mn 4-7: the top two bits of s[0..3] / s[4..7]
  const __m128i b = _mm_shuffle_epi8(s, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1,
                                                      4, 5, 6, 7));
  return _mm_or_si128(low, _mm_and_si128(_mm_srli_epi16(b, 2), _mm_set1_epi8(0x30)));
}
#endif

// Q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}: x = (d*sc)*q - (dmin*mn) per 32 elements;
// bytes qs[32g ..] hold sub-block 2g in their low nibbles and 2g+1 in their high nibbles.
struct Q4_K {
  static constexpr const char* kName = "Q4_K";
  static constexpr int QK = 256, NF = 4;
  static constexpr bool kDense = false;
  static constexpr FieldSpec kFields[NF] = {{ffi::DataType::F16, 0},
                                            {ffi::DataType::F16, 0},
                                            {ffi::DataType::U8, 12},
                                            {ffi::DataType::U8, 128}};

  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    const int64_t i = r * p.nb + b;
    const float d = f16_to_f32(field<uint16_t>(p, 0)[i]);
    const float dmin = f16_to_f32(field<uint16_t>(p, 1)[i]);
    const uint8_t* qs = field<uint8_t>(p, 3) + 128 * i;
#if defined(__AVX512F__)
    // A 16-entry table per sub-block, T[k] = d*sc*k - dmin*mn (exact, see the top of the file),
    // indexed by the nibbles themselves: vpermps reads only the low 4 bits of each index lane.
    alignas(64) float s[16];  // d*sc[0..7], -dmin*mn[0..7]
    k4_scales_vec(field<uint8_t>(p, 2) + 12 * i, d, dmin, s);
    // T = iota * d*sc + (-dmin*mn) as a multiply and an add whose scalar operands are
    // broadcast by the loads ({1to16}): a fused multiply-add (same value: the product is
    // exact) would need one broadcast on the shuffle pipes that vpermps already keeps busy.
    // The masked intrinsics keep -ffp-contract from fusing them; loads through `sl` keep GCC
    // from replacing the broadcast loads with shuffles of the vector just stored.
    const float* sl = launder(s);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    auto table = [&](int t) {
      const __m512 prod = _mm512_maskz_mul_ps(0xffff, iota, _mm512_set1_ps(sl[t]));
      return _mm512_maskz_add_ps(0xffff, prod, _mm512_set1_ps(sl[8 + t]));
    };
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m512 t_lo = table(2 * g), t_hi = table(2 * g + 1);
#pragma GCC unroll 2
      for (int k = 0; k < 2; ++k) {
        const __m512i q = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 32 * g + 16 * k)));
        emit(4 * g + k, reinterpret_cast<v16f>(_mm512_permutexvar_ps(q, t_lo)));
        emit(4 * g + 2 + k,
             reinterpret_cast<v16f>(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t_hi)));
      }
    }
#else
    float dl[8], ml[8];
    k4_scales(field<uint8_t>(p, 2) + 12 * i, d, dmin, dl, ml);
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 2
      for (int k = 0; k < 2; ++k) {
        const v16b q = load_u8(qs + 32 * g + 16 * k);
        emit(4 * g + k, dl[2 * g] * u8_to_f32(q & 15) - ml[2 * g]);
        emit(4 * g + 2 + k, dl[2 * g + 1] * u8_to_f32(q >> 4) - ml[2 * g + 1]);
      }
    }
#endif
  }
};

// Q5_K {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: as Q4_K with a fifth bit:
// bit t of qh[l] belongs to element 32t + l.
struct Q5_K {
  static constexpr const char* kName = "Q5_K";
  static constexpr int QK = 256, NF = 5;
  static constexpr bool kDense = false;
  static constexpr FieldSpec kFields[NF] = {{ffi::DataType::F16, 0},
                                            {ffi::DataType::F16, 0},
                                            {ffi::DataType::U8, 12},
                                            {ffi::DataType::U8, 32},
                                            {ffi::DataType::U8, 128}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    const int64_t i = r * p.nb + b;
    float dl[8], ml[8];
    k4_scales(field<uint8_t>(p, 2) + 12 * i, f16_to_f32(field<uint16_t>(p, 0)[i]),
              f16_to_f32(field<uint16_t>(p, 1)[i]), dl, ml);
    const uint8_t* qh = field<uint8_t>(p, 3) + 32 * i;
    const uint8_t* qs = field<uint8_t>(p, 4) + 128 * i;
#pragma GCC unroll 2
    for (int k = 0; k < 2; ++k) {
      const v16b h = load_u8(qh + 16 * k);
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const v16b q = load_u8(qs + 32 * g + 16 * k);
        const v16b lo = (q & 15) | (((h >> (2 * g)) & 1) << 4);
        const v16b hi = (q >> 4) | (((h >> (2 * g + 1)) & 1) << 4);
        emit(4 * g + k, dl[2 * g] * u8_to_f32(lo) - ml[2 * g]);
        emit(4 * g + 2 + k, dl[2 * g + 1] * u8_to_f32(hi) - ml[2 * g + 1]);
      }
    }
  }
};

#if defined(__AVX512BW__)
// Q6_K half h (128 values) of a block's bits: its 64 ql bytes (runs 0, 1 of 32 values in the low
// nibbles, runs 2, 3 in the high ones) in l, and its 32 qh bytes doubled as [qh, qh >> 2] in hs,
// which line up with them: bits 0-1 for the low nibbles, bits 4-5 for the high ones.
inline void q6k_half(const uint8_t* ql, const uint8_t* qh, int h, __m512i& l, __m512i& hs) {
  l = _mm512_loadu_si512(ql + 64 * h);
  const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * h));
  hs = _mm512_inserti64x4(_mm512_castsi256_si512(hb), _mm256_srli_epi16(hb, 2), 1);
}
#endif

// Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: x = (d*sc)*(q6 - 32) per 16 elements.
// Per half h of 128 elements, run c (0..3) of 32: low 4 bits from ql[64h + 32(c&1) ..] (low
// nibble for c < 2, high for c >= 2), high 2 bits from qh[32h ..] >> 2c.
struct Q6_K {
  static constexpr const char* kName = "Q6_K";
  static constexpr int QK = 256, NF = 4;
  static constexpr bool kDense = false;
  static constexpr FieldSpec kFields[NF] = {{ffi::DataType::U8, 128},
                                            {ffi::DataType::U8, 64},
                                            {ffi::DataType::S8, 16},
                                            {ffi::DataType::F16, 0}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    const int64_t i = r * p.nb + b;
    const uint8_t* ql = field<uint8_t>(p, 0) + 128 * i;
    const uint8_t* qh = field<uint8_t>(p, 1) + 64 * i;
    const int8_t* sc = field<int8_t>(p, 2) + 16 * i;
    const float d = f16_to_f32(field<uint16_t>(p, 3)[i]);
#if defined(__AVX512BW__)
    // Whole halves at once: 64 ql bytes hold runs 0, 1 (low nibbles) and 2, 3 (high nibbles);
    // the 32 qh bytes, doubled as [qh, qh >> 2], give runs 0, 1 (bits 0-1) and 2, 3 (bits 4-5).
    // q6 - 32 goes to a stack buffer in run order (16 bytes per run s), then widens from there.
    alignas(64) int8_t q[256];  // q6 - 32 in run order
    alignas(64) float dl[16];  // d * sc[s], exact
    _mm512_store_ps(dl, _mm512_mul_ps(_mm512_set1_ps(d),
                                      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                          reinterpret_cast<const __m128i*>(sc))))));
    const __m512i m0f = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    const __m512i c32 = _mm512_set1_epi8(32);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m512i l, hs;
      q6k_half(ql, qh, h, l, hs);
      // (a & b) | c is ternary-logic 0xEA
      const __m512i lo = _mm512_ternarylogic_epi32(
          l, m0f, _mm512_and_si512(_mm512_slli_epi16(hs, 4), m30), 0xEA);
      const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(l, 4), m0f,
                                                   _mm512_and_si512(hs, m30), 0xEA);
      _mm512_store_si512(q + 128 * h, _mm512_sub_epi8(lo, c32));
      _mm512_store_si512(q + 128 * h + 64, _mm512_sub_epi8(hi, c32));
    }
    // reload q and dl from memory (widening loads, broadcast loads) instead of the extracts
    // and shuffles GCC would substitute
    const int8_t* qm = launder(q);
    const float* dlm = launder(dl);
#pragma GCC unroll 16
    for (int s = 0; s < 16; ++s) {
      const __m512i q32 =
          _mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(qm + 16 * s)));
      const __m512 qf = _mm512_cvtepi32_ps(q32);
      emit(s, reinterpret_cast<v16f>(_mm512_mul_ps(_mm512_set1_ps(dlm[s]), qf)));
    }
#else
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
#pragma GCC unroll 2
      for (int k = 0; k < 2; ++k) {
        const v16b l0 = load_u8(ql + 64 * h + 16 * k);
        const v16b l1 = load_u8(ql + 64 * h + 32 + 16 * k);
        const v16b hb = load_u8(qh + 32 * h + 16 * k);
        const v16b q[4] = {(l0 & 15) | ((hb & 3) << 4), (l1 & 15) | (((hb >> 2) & 3) << 4),
                           (l0 >> 4) | (((hb >> 4) & 3) << 4), (l1 >> 4) | ((hb >> 6) << 4)};
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const int s = 8 * h + 2 * c + k;  // run of 16 = scale index
          const float dl = d * static_cast<float>(sc[s]);
          emit(s, dl * i32_to_f32(u8_to_i32(q[c]) - 32));
        }
      }
    }
#endif
  }
};

// Dense formats: a "block" is a run of 16 consecutive values; the row tail (in % 16) is scalar.
struct F32 {
  static constexpr const char* kName = "F32";
  static constexpr int QK = 16, NF = 1;
  static constexpr bool kDense = true;
  static constexpr FieldSpec kFields[NF] = {{ffi::DataType::F32, 0}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    emit(0, load_f32(field<float>(p, 0) + r * p.in + 16 * b));
  }
  static inline float scalar(const Problem& p, int64_t r, int64_t e) {
    return field<float>(p, 0)[r * p.in + e];
  }
};

struct F16 {
  static constexpr const char* kName = "F16";
  static constexpr int QK = 16, NF = 1;
  static constexpr bool kDense = true;
  static constexpr FieldSpec kFields[NF] = {{ffi::DataType::F16, 0}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    emit(0, f16x16_to_f32(field<uint16_t>(p, 0) + r * p.in + 16 * b));
  }
  static inline float scalar(const Problem& p, int64_t r, int64_t e) {
    return f16_to_f32(field<uint16_t>(p, 0)[r * p.in + e]);
  }
};

struct BF16 {
  static constexpr const char* kName = "BF16";
  static constexpr int QK = 16, NF = 1;
  static constexpr bool kDense = true;
  static constexpr FieldSpec kFields[NF] = {{ffi::DataType::BF16, 0}};
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    emit(0, bf16x16_to_f32(field<uint16_t>(p, 0) + r * p.in + 16 * b));
  }
  static inline float scalar(const Problem& p, int64_t r, int64_t e) {
    return bf16_to_f32(field<uint16_t>(p, 0)[r * p.in + e]);
  }
};

// Format F with every weight value rounded to bfloat16 (round-to-nearest-even): the weights of
// the bfloat16 path (XLA's dequantize(bf16) before its dot) for the float32 kernels, which then
// compute bf16(W) x (bf16 x widened to float32) with float32 accumulation: the products of two
// bfloat16 values are exact in float32, so only the summation order differs from vdpbf16ps.
template <class F>
struct Bf16Of {
  static constexpr const char* kName = F::kName;
  static constexpr int QK = F::QK, NF = F::NF;
  static constexpr bool kDense = F::kDense;
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    F::block(p, r, b,
             [&](int c, v16f w) __attribute__((always_inline)) { emit(c, round_bf16(w)); });
  }
  static inline float scalar(const Problem& p, int64_t r, int64_t e) {
    return round_bf16(F::scalar(p, r, e));
  }
};

// ---------------------------------------------------------------------------------------------
// The kernel: weight rows [r0, r1) against activation rows [m0, m0 + MB).

#if defined(__AVX512F__)
// Lane sums of 16 vectors at once, lane r of the result = sum of v[r] (a shuffle-add tree:
// 45 vector ops for 16 rows instead of ~11 dependent ones per row).
__attribute__((always_inline)) inline v16f reduce16(const v16f* v) {
  __m512 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k) {  // a[k]: 8 partial sums of row 2k, then 8 of row 2k+1
    const __m512 x = reinterpret_cast<__m512>(v[2 * k]), y = reinterpret_cast<__m512>(v[2 * k + 1]);
    a[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
  for (int k = 0; k < 4; ++k) {  // b[k]: quarter j = 4 partial sums of row 4k + j
    b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xDD));
  }
  for (int k = 0; k < 2; ++k) {  // c[k]: quarter j = 2 sums of row 8k + j, 2 of row 8k + 4 + j
    c[k] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0xEE));
  }
  // lane 4j + t = row 4t + j; permute back to row order
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88),
                                 _mm512_shuffle_ps(c[0], c[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return reinterpret_cast<v16f>(_mm512_permutexvar_ps(order, d));
}
#endif

// Row r of W against activation rows m0 .. m0+MB-1: the 16-lane partial sums, per row m.
template <class F, int MB>
inline void row_partials(const Problem& p, const float* x0, int64_t r, v16f* out) {
  // independent accumulators per activation row, so that few rows still hide FMA latency;
  // formats with short blocks take U blocks per step to use them all
  constexpr int NA = MB >= 4 ? 1 : 4 / MB;
  constexpr int CPB = F::QK / 16;  // runs of 16 per block
  constexpr int U = CPB >= NA ? 1 : NA / CPB;
  v16f acc[MB][NA];
  for (int m = 0; m < MB; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = v16f{};
  auto step = [&](int64_t b, int u) __attribute__((always_inline)) {
    const float* xb = x0 + b * F::QK;
    auto emit = [&](int c, v16f w) __attribute__((always_inline)) {
      const int k = (u * CPB + c) % NA;
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[m][k] += w * load_f32(xb + m * p.xs + 16 * c);
    };
    F::block(p, r, b, emit);
  };
  int64_t b = 0;
  for (; b + U <= p.nb; b += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) step(b + u, u);
  }
  for (; b < p.nb; ++b) step(b, 0);
  for (int m = 0; m < MB; ++m) {
    v16f s = acc[m][0];
    for (int a = 1; a < NA; ++a) s += acc[m][a];
    out[m] = s;
  }
}

// Weight rows [r0, r1) against activation rows [m0, m0 + MB): y[m, r] for each pair.
template <class F, int MB>
void rows_kernel(const Problem& p, int64_t m0, int64_t r0, int64_t r1) {
  const float* x0 = p.x + m0 * p.xs;
  for (int64_t g = r0; g < r1; g += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, r1 - g));
    v16f part[MB][16];  // [m][row in group]: partial sums still to be reduced over lanes
    for (int k = 0; k < n; ++k) {
      v16f row[MB];
      row_partials<F, MB>(p, x0, g + k, row);
      for (int m = 0; m < MB; ++m) part[m][k] = row[m];
    }
    for (int m = 0; m < MB; ++m) {
      float* y = p.y + (m0 + m) * p.out + g;
#if defined(__AVX512F__)
      if (n == 16) {
        const v16f sums = reduce16(part[m]);
        std::memcpy(y, &sums, sizeof sums);
      } else
#endif
      {
        for (int k = 0; k < n; ++k) y[k] = hsum(part[m][k]);
      }
      if constexpr (F::kDense) {  // the row tails, in % 16 values
        const float* xm = x0 + m * p.xs;
        for (int k = 0; k < n; ++k) {
          for (int64_t e = p.nb * F::QK; e < p.in; ++e) y[k] += F::scalar(p, g + k, e) * xm[e];
        }
      }
    }
  }
}

// Kernels exist for 1-4 and kMaxRows activation rows per pass (fewer instantiations, a faster
// build); 5-7 leftover rows take two passes.
template <class F>
void rows_dispatch(int mb, const Problem& p, int64_t m0, int64_t r0, int64_t r1) {
  switch (mb) {
    case 1: return rows_kernel<F, 1>(p, m0, r0, r1);
    case 2: return rows_kernel<F, 2>(p, m0, r0, r1);
    case 3: return rows_kernel<F, 3>(p, m0, r0, r1);
    case 4: return rows_kernel<F, 4>(p, m0, r0, r1);
#if defined(__AVX512F__)
    case kMaxRows: return rows_kernel<F, kMaxRows>(p, m0, r0, r1);
#endif
    default: return;
  }
}

// One-row kernels (decode) read each weight once, from memory: they prefetch the block
// kRowPrefetch blocks ahead (~2 KiB for Q4_K / Q6_K) into L1. The hardware prefetchers restart
// at every chunk of rows a thread takes (for_rows) and ramp up over its first lines; measured on
// 2 Zen 4 cores, cold weights: C x C Q4_K 24 -> 20 us, C -> F 76 -> 65 us, the Q6_K head
// 65536 x 768 1.70 -> 1.47 ms (28 GB/s, about the 2-thread read bandwidth there); 8..32 blocks
// ahead measured alike.
#ifndef RWKV_ROW_PREFETCH
#define RWKV_ROW_PREFETCH 16
#endif
constexpr int64_t kRowPrefetch = RWKV_ROW_PREFETCH;

// Prefetch `lines` cache lines from p (a hint: it never faults, past the end of a weight too).
inline void prefetch(const void* p, int lines) {
#if defined(__x86_64__) || defined(__i386__)
  for (int k = 0; k < lines; ++k) _mm_prefetch(static_cast<const char*>(p) + 64 * k, _MM_HINT_T0);
#else
  for (int k = 0; k < lines; ++k) __builtin_prefetch(static_cast<const char*>(p) + 64 * k);
#endif
}

#if defined(__AVX512F__)
// Q4_K at one activation row (decode), factored per sub-block j of 32 elements:
//   sum_l (dl_j q_l - ml_j) x_l = dl_j * (sum_l q_l x_l) - ml_j * X_j,  X_j = sum_l x_l,
// with X_j computed once per call (p.xsum) for all weight rows. Per 16 weights this costs one
// int->float conversion and one multiply-add, against a table lookup (vpermps, slow on Zen 4)
// plus a multiply-add for the dequantized values: measured 33 vs 41 cycles per block on one
// Zen 4 core. The weight values are the same (q, dl_j, ml_j exact), only the rounding of the
// sum differs: its error stays within gamma_{n+2} * sum_l (|dl_j q_l| + |ml_j|) |x_l|.
// Returns the 16 partial sums of row r (lanes summed by the caller).
inline __m512 q4k_row1(const Problem& p, int64_t r) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), accb = _mm512_setzero_ps();
  const __m512i m15 = _mm512_set1_epi32(15);
  for (int64_t b = 0; b < p.nb; ++b) {
    const int64_t i = r * p.nb + b;
    alignas(64) float s[16];  // d*sc[0..7], -dmin*mn[0..7]
    k4_scales_vec(field<uint8_t>(p, 2) + 12 * i, f16_to_f32(field<uint16_t>(p, 0)[i]),
                  f16_to_f32(field<uint16_t>(p, 1)[i]), s);
    const float* sl = launder(s);
    // lanes 0-7: d*sc * 0; lanes 8-15: -dmin*mn_j * X_j
    accb = _mm512_fmadd_ps(_mm512_load_ps(sl), _mm512_loadu_ps(p.xsum + 16 * b), accb);
    const uint8_t* qs = field<uint8_t>(p, 3) + 128 * i;
    const float* x = p.x + 256 * b;
    // block i + kRowPrefetch (rows are contiguous in memory): see kRowPrefetch
    prefetch(qs + 128 * kRowPrefetch, 2);
    prefetch(field<uint8_t>(p, 2) + 12 * (i + kRowPrefetch), 1);
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {  // bytes 32g..32g+31: sub-block 2g (low), 2g+1 (high nibbles)
      const __m512i q0 =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 32 * g)));
      const __m512i q1 = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 32 * g + 16)));
      const __m512 l0 = _mm512_cvtepi32_ps(_mm512_and_si512(q0, m15));
      const __m512 l1 = _mm512_cvtepi32_ps(_mm512_and_si512(q1, m15));
      const __m512 h0 = _mm512_cvtepi32_ps(_mm512_srli_epi32(q0, 4));
      const __m512 h1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(q1, 4));
      const __m512 t = _mm512_fmadd_ps(l1, _mm512_loadu_ps(x + 64 * g + 16),
                                       _mm512_mul_ps(l0, _mm512_loadu_ps(x + 64 * g)));
      const __m512 u = _mm512_fmadd_ps(h1, _mm512_loadu_ps(x + 64 * g + 48),
                                       _mm512_mul_ps(h0, _mm512_loadu_ps(x + 64 * g + 32)));
      acc0 = _mm512_fmadd_ps(_mm512_set1_ps(sl[2 * g]), t, acc0);
      acc1 = _mm512_fmadd_ps(_mm512_set1_ps(sl[2 * g + 1]), u, acc1);
    }
  }
  return _mm512_add_ps(_mm512_add_ps(acc0, acc1), accb);
}

// p.xsum for q4k_row1: per block b, 8 zeros then X_j for sub-blocks j = 0..7 of row 0 of x.
inline void q4k_xsum(const float* x, int64_t nb, float* xsum) {
  for (int64_t b = 0; b < nb; ++b) {
    alignas(64) float v[16] = {};
    for (int j = 0; j < 8; ++j) {
      const float* xj = x + 256 * b + 32 * j;
      const __m512 pair = _mm512_add_ps(_mm512_loadu_ps(xj), _mm512_loadu_ps(xj + 16));
      v[8 + j] = _mm512_reduce_add_ps(pair);
    }
    std::memcpy(xsum + 16 * b, v, sizeof v);
  }
}

// Rows [r0, r1) of y = x · Wᵀ for one activation row through a one-row kernel `row` (the 16
// partial sums of row r), 16 rows per lane sum.
template <class Row>
inline void rows1(const Problem& p, int64_t r0, int64_t r1, Row row) {
  for (int64_t g = r0; g < r1; g += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, r1 - g));
    v16f part[16];
    for (int k = 0; k < n; ++k) part[k] = reinterpret_cast<v16f>(row(p, g + k));
    if (n == 16) {
      const v16f sums = reduce16(part);
      std::memcpy(p.y + g, &sums, sizeof sums);
    } else {
      for (int k = 0; k < n; ++k) p.y[g + k] = hsum(part[k]);
    }
  }
}
#endif

#if defined(__AVX512BW__)
// Q6_K at one activation row (decode), each 16-value sub-block's scale factored out of its sum.
// The 6-bit q (0..63) is placed under the exponent of 1.0f, f = 1 + q/64 (exact, no
// int->float conversion), so with dl_s = d * sc_s and X_s = sum_l x_l over sub-block s:
//   sum_l dl_s (q_l - 32) x_l = (64 dl_s) * sum_l f_l x_l - (96 dl_s) * X_s.
// Lanes run over sub-blocks, not over the values of one: per half h of 128 values, v[k] holds
// 0x80 | q << 1 of values 128h + 64k + 4t + b in byte b of dword t (k = 0: low nibbles of ql,
// 1: high), all in sub-block 8h + 4k + t/4. One vpshufb of byte b into byte 2 of every dword
// (merged into 0x3F800000) gives 16 values f, 4 per sub-block, for one multiply-add against x
// permuted once per call (q6k_xprep); lane t of accumulator 2h + k keeps sub-block
// 8h + 4k + t/4 for the whole block, so 64 dl_s (vpermps of the 16 scales) multiplies each of
// the 4 accumulators once per block, and the 16 scales times X_s once more. Per 16 values: a
// shuffle and a multiply-add, against a widening load, a conversion, a multiply and a
// multiply-add in Q6_K::block (Zen 4, the 65536 x 768 head: 3.1 vs 4.2 ms on one core, 1.85
// vs 2.2 ms on two, near their memory bandwidth). Placing (q - 32) << 24 instead and converting
// it exactly (vcvtdq2ps: the unfactored error bound) measured ~10% slower on one core.
// The weight values are the same (q, dl_s exact; 64 dl_s and 96 dl_s exact too: dl_s has at
// most 11 + 8 significant bits), only the rounding of the sum differs: its error stays within
//   gamma_{n+2} * sum_l (|64 dl_s f_l| + |96 dl_s|) |x_l|
//     = gamma_{n+2} * sum_l |dl_s| (q_l + 160) |x_l|,
// a bound on the parts instead of on |w| = |dl_s (q_l - 32)|: at least 5x the unfactored bound
// (q + 160 >= 5 |q - 32| for q in 0..63), ~12x for uniform q.
// Returns the 16 partial sums of row r (lanes summed by the caller).
inline __m512 q6k_row1(const Problem& p, int64_t r) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // dword t of a 128-bit lane sits at byte 4 (t % 4) of it (vpshufb indexes within the lane)
  const __m512i at = _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(3)), 2);
  __m512i sub[4];   // lane t of accumulator c = 2h + k: sub-block 4c + t/4
  __m512i pick[4];  // vpshufb index: byte b of each dword to byte 2 (the rest is masked off)
  for (int k = 0; k < 4; ++k) {
    sub[k] = _mm512_add_epi32(_mm512_set1_epi32(4 * k), _mm512_srli_epi32(lane, 2));
    pick[k] = _mm512_slli_epi32(_mm512_add_epi32(_mm512_set1_epi32(k), at), 16);
  }
  const __mmask64 byte2 = 0x4444444444444444ull;
  const __m512i one = _mm512_set1_epi32(0x3F800000);
  const __m512i m1e = _mm512_set1_epi8(0x1e), m60 = _mm512_set1_epi8(0x60);
  const __m512i m80 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 tot[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  __m512 accb = _mm512_setzero_ps();  // -96 dl_s X_s
  for (int64_t b = 0; b < p.nb; ++b) {
    const int64_t i = r * p.nb + b;
    const uint8_t* ql = field<uint8_t>(p, 0) + 128 * i;
    const uint8_t* qh = field<uint8_t>(p, 1) + 64 * i;
    prefetch(ql + 128 * kRowPrefetch, 2);  // see kRowPrefetch
    prefetch(qh + 64 * kRowPrefetch, 1);
    prefetch(field<int8_t>(p, 2) + 16 * (i + kRowPrefetch), 1);
    const __m512 dl = _mm512_mul_ps(
        _mm512_set1_ps(f16_to_f32(field<uint16_t>(p, 3)[i])),
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(field<int8_t>(p, 2) + 16 * i)))));
    const float* xb = p.xperm + 272 * b;
    accb = _mm512_fmadd_ps(_mm512_mul_ps(dl, _mm512_set1_ps(-96.0f)), _mm512_loadu_ps(xb + 256),
                           accb);
    const __m512 dl64 = _mm512_mul_ps(dl, _mm512_set1_ps(64.0f));
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      // ql byte p: low nibble of value 128h + p, high of 128h + 64 + p (p < 64)
      __m512i l, hs;
      q6k_half(ql, qh, h, l, hs);
      // 0x80 | q << 1: the nibble to bits 1-4, the high bits to 5-6 ((a & b) | c is 0xEA)
      const __m512i v[2] = {
          _mm512_ternarylogic_epi32(
              _mm512_slli_epi16(l, 1), m1e,
              _mm512_ternarylogic_epi32(_mm512_slli_epi16(hs, 5), m60, m80, 0xEA), 0xEA),
          _mm512_ternarylogic_epi32(
              _mm512_srli_epi16(l, 3), m1e,
              _mm512_ternarylogic_epi32(_mm512_slli_epi16(hs, 1), m60, m80, 0xEA), 0xEA)};
#pragma GCC unroll 2
      for (int k = 0; k < 2; ++k) {
        const float* xc = xb + 128 * h + 64 * k;
        __m512 s = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int bb = 0; bb < 4; ++bb) {
          const __m512 f =
              _mm512_castsi512_ps(_mm512_mask_shuffle_epi8(one, byte2, v[k], pick[bb]));
          s = _mm512_fmadd_ps(f, _mm512_loadu_ps(xc + 16 * bb), s);
        }
        const int c = 2 * h + k;
        tot[c] = _mm512_fmadd_ps(_mm512_permutexvar_ps(sub[c], dl64), s, tot[c]);
      }
    }
  }
  return _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(tot[0], tot[1]), _mm512_add_ps(tot[2], tot[3])),
                       accb);
}

// p.xperm for q6k_row1: per block 272 floats, each run of 64 values 4t + b (t < 16, b < 4)
// stored at 16b + t, then X_s, the sum of x over sub-block s = 0..15.
inline void q6k_xprep(const float* x, int64_t nb, float* xp) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + 256 * b;
    float* o = xp + 272 * b;
    for (int c = 0; c < 4; ++c)
      for (int bb = 0; bb < 4; ++bb)
        for (int t = 0; t < 16; ++t) o[64 * c + 16 * bb + t] = xb[64 * c + 4 * t + bb];
    for (int s = 0; s < 16; ++s) o[256 + s] = _mm512_reduce_add_ps(_mm512_loadu_ps(xb + 16 * s));
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// ---------------------------------------------------------------------------------------------
// One-row kernels for AVX2 (decode), 8-lane: the factored forms of the AVX-512 kernels above,
// the same arithmetic per term (hence the same error bounds), lanes over 8 values. GCC keeps
// these in ymm registers itself (no 16-lane type involved).

// Lane sums of 8 vectors: lane k of the result = sum of v[k] (hadd tree, then 128-bit halves).
inline __m256 reduce8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a: rows 0-3 over lanes 0-3 (low half) and 4-7 (high half); b: rows 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Rows [r0, r1) of y = x · Wᵀ for one activation row through an 8-lane one-row kernel `row`.
template <class Row>
inline void rows1_avx2(const Problem& p, int64_t r0, int64_t r1, Row row) {
  for (int64_t g = r0; g < r1; g += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, r1 - g));
    if (n == 8) {
      __m256 part[8];
      for (int k = 0; k < 8; ++k) part[k] = row(p, g + k);
      _mm256_storeu_ps(p.y + g, reduce8(part));
    } else {
      for (int k = 0; k < n; ++k) p.y[g + k] = hsum8(row(p, g + k));
    }
  }
}

// 32 quant bytes q (values 0-31 of a group, each < 64) against the group's x digits xq
// (x_int16_digits): fh += float(sum q hi) * scale and fl += float(sum q lo) * scale per int32
// lane, lanes 0-3 over values 0-15 and lanes 4-7 over 16-31 (4 products each, exact: < 2^24).
inline void bytes_dot_xq(__m256i q, const int16_t* xq, __m256 scale, __m256& fh, __m256& fl) {
  // int16 q: values 0-7 | 16-23 and 8-15 | 24-31 (per 128-bit half), as xq holds them
  const __m256i qa = _mm256_unpacklo_epi8(q, _mm256_setzero_si256());
  const __m256i qb = _mm256_unpackhi_epi8(q, _mm256_setzero_si256());
  const __m256i* d = reinterpret_cast<const __m256i*>(xq);
  const __m256i hi = _mm256_add_epi32(_mm256_madd_epi16(qa, _mm256_load_si256(d)),
                                      _mm256_madd_epi16(qb, _mm256_load_si256(d + 1)));
  const __m256i lo = _mm256_add_epi32(_mm256_madd_epi16(qa, _mm256_load_si256(d + 2)),
                                      _mm256_madd_epi16(qb, _mm256_load_si256(d + 3)));
  fh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), scale, fh);
  fl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), scale, fl);
}

// Q4_K at one activation row with integer sums: per sub-block j of 32 values,
//   dl_j * (sum_l q_l x_l) - ml_j * X_j,
// X_j from p.xsum (q4k_xsum_avx2), x as two int16 digits per value (p.xq, x_int16_digits: x^_l =
// 2^e_j (4096 hi_l + lo_l)), so sum_l q_l x^_l is two vpmaddwd sums per 16 values, exact in int32
// and in float32 (|sum| < 32 * 15 * 2^14 < 2^24). The float work per sub-block is one
// multiply-add per digit (the sum times sc_j 2^e_j, exact: a power of two times a 6-bit
// integer); per block (4096 fh + fl) * d. Fewer vector operations per value than a float32
// multiply-add after an int -> float conversion of each quant (BENCHMARKS.md: "AVX2 one-row
// Q4_K / Q6_K kernels with integer sums over x"). Returns 8 partial sums of row r.
inline __m256 q4k_row1_avx2(const Problem& p, int64_t r) {
  __m256 acc = _mm256_setzero_ps(), accb = _mm256_setzero_ps();
  const __m256i m0f = _mm256_set1_epi8(0x0f);
  for (int64_t b = 0; b < p.nb; ++b) {
    const int64_t i = r * p.nb + b;
    const uint8_t* s12 = field<uint8_t>(p, 2) + 12 * i;
    const __m128i bytes = k4_regroup_vec(s12);  // sc[0..7], mn[0..7]
    const float dmin = f16_to_f32(field<uint16_t>(p, 1)[i]);
    const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
    accb = _mm256_fmadd_ps(_mm256_mul_ps(mn, _mm256_set1_ps(-dmin)),
                           _mm256_loadu_ps(p.xsum + 16 * b + 8), accb);
    alignas(32) float s[8];  // sc_j 2^e_j, exact
    _mm256_store_ps(s, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)),
                                     _mm256_loadu_ps(p.xq_scale + 8 * b)));
    const float* sl = launder(s);
    const uint8_t* qs = field<uint8_t>(p, 3) + 128 * i;
    const int16_t* xq = p.xq + 512 * b;
    prefetch(qs + 128 * kRowPrefetch, 2);  // see kRowPrefetch
    prefetch(s12 + 12 * kRowPrefetch, 1);
    __m256 fh = _mm256_setzero_ps(), fl = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {  // bytes 32g..32g+31: sub-block 2g (low), 2g+1 (high nibbles)
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * g));
      const __m256i nib[2] = {_mm256_and_si256(v, m0f),
                              _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f)};
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * g + h;
        bytes_dot_xq(nib[h], xq + 64 * j, _mm256_set1_ps(sl[j]), fh, fl);
      }
    }
    const float d = f16_to_f32(field<uint16_t>(p, 0)[i]);
    acc = _mm256_fmadd_ps(_mm256_fmadd_ps(fh, _mm256_set1_ps(4096.0f), fl), _mm256_set1_ps(d),
                          acc);
  }
  return _mm256_add_ps(acc, accb);
}

// Q6_K at one activation row with integer sums, as q4k_row1_avx2: per 16-value sub-block s,
//   sum_l dl_s (q_l - 32) x_l = dl_s * sum_l q_l x^_l - 32 dl_s * X_s,
// X_s from p.xsub (q6k_xsub), x^ from p.xq (x_int16_digits). The 6-bit values are assembled 32
// at a time in value order (ggml's dequantize_row_q6_K: per half, ql low / high nibbles and qh
// bit pairs), widened to int16 and multiplied into two vpmaddwd sums per digit; each int32 lane
// holds 4 products of one sub-block (|sum| < 4 * 63 * 2^14 < 2^24: exact in float32), lanes 0-3
// sub-block 2c and 4-7 sub-block 2c + 1 of the 32 values c, so one multiply-add per digit takes
// both sub-scales [sc_2c x 4, sc_2c+1 x 4] * 2^e_c (exact: normal floats, d applied per block as
// in q4k_row1_avx2; d * sc * 2^e_c could be subnormal). Returns 8 partial sums of row r.
inline __m256 q6k_row1_avx2(const Problem& p, int64_t r) {
  const __m256i m0f = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30);
  __m256 acc = _mm256_setzero_ps(), accb = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.nb; ++b) {
    const int64_t i = r * p.nb + b;
    const uint8_t* ql = field<uint8_t>(p, 0) + 128 * i;
    const uint8_t* qh = field<uint8_t>(p, 1) + 64 * i;
    prefetch(ql + 128 * kRowPrefetch, 2);  // see kRowPrefetch
    prefetch(qh + 64 * kRowPrefetch, 1);
    prefetch(field<int8_t>(p, 2) + 16 * (i + kRowPrefetch), 1);
    const float d = f16_to_f32(field<uint16_t>(p, 3)[i]);
    const __m128i sc8 =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(field<int8_t>(p, 2) + 16 * i));
    const __m256 sc[2] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8)),
                          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8)))};
    // -32 dl_s = -32 d * sc_s, exact
    const float* xs = p.xsub + 16 * b;
    const __m256 m32d = _mm256_set1_ps(-32.0f * d);
    accb = _mm256_fmadd_ps(_mm256_mul_ps(sc[0], m32d), _mm256_loadu_ps(xs), accb);
    accb = _mm256_fmadd_ps(_mm256_mul_ps(sc[1], m32d), _mm256_loadu_ps(xs + 8), accb);
    const int16_t* xq = p.xq + 512 * b;
    const float* xe = p.xq_scale + 8 * b;
    __m256 fh = _mm256_setzero_ps(), fl = _mm256_setzero_ps();
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h + 32));
      const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * h));
      // values 128h + l, + 32, + 64, + 96 (l < 32): low nibble of l0 / l1 then high nibbles,
      // with qh bits 0-1, 2-3, 4-5, 6-7 of byte l as bits 4-5
      const __m256i v[4] = {
          _mm256_or_si256(_mm256_and_si256(l0, m0f),
                          _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30)),
          _mm256_or_si256(_mm256_and_si256(l1, m0f),
                          _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m0f),
                          _mm256_and_si256(hb, m30)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m0f),
                          _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30))};
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const int c = 4 * h + t;  // values 32c .. 32c + 31: sub-blocks 2c, 2c + 1
        const int s0 = (2 * c) % 8;
        const __m256i pick = _mm256_setr_epi32(s0, s0, s0, s0, s0 + 1, s0 + 1, s0 + 1, s0 + 1);
        const __m256 scale = _mm256_mul_ps(_mm256_permutevar8x32_ps(sc[c / 4], pick),
                                           _mm256_set1_ps(xe[c]));
        bytes_dot_xq(v[t], xq + 64 * c, scale, fh, fl);
      }
    }
    acc = _mm256_fmadd_ps(_mm256_fmadd_ps(fh, _mm256_set1_ps(4096.0f), fl), _mm256_set1_ps(d),
                          acc);
  }
  return _mm256_add_ps(acc, accb);
}

// p.xsum for q4k_row1_avx2, as q4k_xsum.
inline void q4k_xsum_avx2(const float* x, int64_t nb, float* xsum) {
  for (int64_t b = 0; b < nb; ++b) {
    alignas(32) float v[16] = {};
    for (int j = 0; j < 8; ++j) {
      const float* xj = x + 256 * b + 32 * j;
      const __m256 lo = _mm256_add_ps(_mm256_loadu_ps(xj), _mm256_loadu_ps(xj + 8));
      const __m256 hi = _mm256_add_ps(_mm256_loadu_ps(xj + 16), _mm256_loadu_ps(xj + 24));
      const __m256 q = _mm256_add_ps(lo, hi);
      v[8 + j] = hsum8(q);
    }
    std::memcpy(xsum + 16 * b, v, sizeof v);
  }
}

// p.xq / p.xq_scale for q4k_row1_avx2 and q6k_row1_avx2: x as x^ = 2^e_j (4096 hi + lo), exact
// integers against the quants. Per group j of 32 values, with M_j = max |x_l| < 2^E_j and
// e_j = max(E_j, -100) - 26: N_l = round(x_l / 2^e_j) (|N_l| < 2^26; the largest value exact),
// split as N_l = 4096 hi_l + lo_l (lo_l in [-2048, 2048), |hi_l| <= 2^14), so x^_l = 2^e_j N_l
// is within 2^(e_j - 1) <= max(2^-26 M_j, 2^-127) of x_l: finer than float32's own rounding
// of the group's largest value (2^-24 relative). Stored per group as int16 [hi of values 0-7,
// 16-23 | hi of 8-15, 24-31 | lo the same], the order vpunpck{l,h}bw gives 32 quant bytes, and
// 2^e_j (p.xq_scale, 8 per block; e_j in [-126, 102]: normal floats). False where some x is
// infinite or NaN (the caller then takes the float path, which propagates them).
inline bool x_int16_digits(const float* x, int64_t nb, int16_t* xq, float* scale) {
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff), half = _mm256_set1_epi32(2048);
  for (int64_t j = 0; j < 8 * nb; ++j) {
    __m256 v[4];
    __m256i u = _mm256_setzero_si256();  // the largest |x| bit pattern per lane
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_loadu_ps(x + 32 * j + 8 * k);
      // |x| bit patterns order as the values do, infinity and then NaN above every finite one
      u = _mm256_max_epu32(u, _mm256_and_si256(_mm256_castps_si256(v[k]), absmask));
    }
    u = _mm256_max_epu32(u, _mm256_shuffle_epi32(u, 0x4e));
    u = _mm256_max_epu32(u, _mm256_shuffle_epi32(u, 0xb1));
    const uint32_t top = std::max(static_cast<uint32_t>(_mm256_extract_epi32(u, 0)),
                                  static_cast<uint32_t>(_mm256_extract_epi32(u, 4)));
    if (top >= 0x7f800000u) return false;
    const int e = std::max(static_cast<int>(top >> 23) - 126, -100) - 26;  // M_j < 2^(e+26)
    const __m256 up = _mm256_castsi256_ps(_mm256_set1_epi32((127 - e) << 23));  // 2^-e
    const uint32_t down = static_cast<uint32_t>(127 + e) << 23;                  // 2^e
    std::memcpy(scale + j, &down, 4);
    __m256i hi[4], lo[4];
    for (int k = 0; k < 4; ++k) {
      const __m256i n = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], up));  // exact product, rounded
      hi[k] = _mm256_srai_epi32(_mm256_add_epi32(n, half), 12);
      lo[k] = _mm256_sub_epi32(n, _mm256_slli_epi32(hi[k], 12));
    }
    // int32 values 0-7, 8-15, 16-23, 24-31 -> int16 [0-7 | 16-23] and [8-15 | 24-31]
    auto pack = [](const __m256i* w, int a, int c) {
      return _mm256_packs_epi32(_mm256_permute2x128_si256(w[a], w[c], 0x20),
                                _mm256_permute2x128_si256(w[a], w[c], 0x31));
    };
    __m256i* o = reinterpret_cast<__m256i*>(xq + 64 * j);
    _mm256_store_si256(o, pack(hi, 0, 2));
    _mm256_store_si256(o + 1, pack(hi, 1, 3));
    _mm256_store_si256(o + 2, pack(lo, 0, 2));
    _mm256_store_si256(o + 3, pack(lo, 1, 3));
  }
  return true;
}

// p.xsub for q6k_row1_avx2: per block the sums of x over its 16 sub-blocks of 16 values.
inline void q6k_xsub(const float* x, int64_t nb, float* xsub) {
  for (int64_t s = 0; s < 16 * nb; ++s) {
    xsub[s] = hsum8(_mm256_add_ps(_mm256_loadu_ps(x + 16 * s), _mm256_loadu_ps(x + 16 * s + 8)));
  }
}
#endif

// Weight rows [r0, r1) against all activation rows. With several activation passes the rows go
// in tiles small enough to stay in L1 while every pass goes over them.
template <class F>
void rows_all(const Problem& p, int64_t r0, int64_t r1) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<F, Q4_K>) {
    if (p.xsum) return rows1(p, r0, r1, q4k_row1);
  }
#endif
#if defined(__AVX512BW__)
  if constexpr (std::is_same_v<F, Q6_K>) {
    if (p.xperm) return rows1(p, r0, r1, q6k_row1);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<F, Q4_K>) {
    if (p.xsum) return rows1_avx2(p, r0, r1, q4k_row1_avx2);
  }
  if constexpr (std::is_same_v<F, Q6_K>) {
    if (p.xsub) return rows1_avx2(p, r0, r1, q6k_row1_avx2);
  }
#endif
  const int64_t tile = p.m > kMaxRows ? 16 : std::max<int64_t>(r1 - r0, 1);
  for (int64_t t0 = r0; t0 < r1; t0 += tile) {
    const int64_t t1 = std::min(t0 + tile, r1);
    for (int64_t m0 = 0; m0 < p.m;) {
      const int64_t left = p.m - m0;
      const int mb = static_cast<int>(left >= kMaxRows ? kMaxRows : std::min<int64_t>(left, 4));
      rows_dispatch<F>(mb, p, m0, t0, t1);
      m0 += mb;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Many activation rows (prefill): a blocked matrix product over dequantized weight tiles.
// A panel of kPanel weight rows x kKc inputs is dequantized once into a float32 tile (per
// thread; 16 x 768 floats = 48 KiB for the 0.1b model, L2-resident); a register-blocked
// microkernel then multiplies it with every activation row, kMr activation rows x kNr weight
// rows at a time (kMr * kNr 16-lane accumulators: per 16 inputs kMr + kNr loads feed
// kMr * kNr fused multiply-adds). Lanes run along the inputs, so the weights need no
// transposition; each accumulator is reduced over its lanes once, after the last input block
// (partial sums of earlier blocks wait in a per-thread buffer). Every weight element is unpacked
// once per call instead of once per kMaxRows activation rows. Measured on one Zen 4 core (peak
// ~58 GFMA/s), Q4_K 768 x 768 / 768 x 3072: 44 / 46 GMAC/s at M = 16, 51 / 52 at M = 64,
// against 38 / 25 for the direct 8-row passes; those stay faster below kTiledMinRows rows. A
// whole row of inputs per tile (kKc >= in) beat 256-768 input blocks: each block reloads and
// stores the kMr * kNr partial sums.
// The RWKV_* macros here and below are tuning knobs for experiments, e.g.
// RWKV_JAX_NATIVE_ARCH="-march=native -DRWKV_TILE_MIN_ROWS=16" (a separate cached build).

#ifndef RWKV_TILE_PANEL
#define RWKV_TILE_PANEL 16
#endif
#ifndef RWKV_TILE_PANEL_BF16
#define RWKV_TILE_PANEL_BF16 32
#endif
#ifndef RWKV_TILE_KC
#define RWKV_TILE_KC 4096
#endif
#ifndef RWKV_TILE_MIN_ROWS
#define RWKV_TILE_MIN_ROWS 8
#endif

#if defined(__AVX512F__)
#ifndef RWKV_TILE_MR
#define RWKV_TILE_MR 4
#endif
#ifndef RWKV_TILE_NR
#define RWKV_TILE_NR 4
#endif
constexpr int kMr = RWKV_TILE_MR, kNr = RWKV_TILE_NR;  // 16 accumulators + 4 x + 1 w of 32 zmm
#elif RWKV_WIDE_STRUCT && defined(__AVX2__) && defined(__FMA__)
// 8-lane accumulators (tile_block_ymm): 12 + 3 x + 1 w of 16 ymm
#define RWKV_TILE_YMM 1
#ifndef RWKV_TILE_MR
#define RWKV_TILE_MR 3
#endif
#ifndef RWKV_TILE_NR
#define RWKV_TILE_NR 4
#endif
constexpr int kMr = RWKV_TILE_MR, kNr = RWKV_TILE_NR;
#else
constexpr int kMr = 2, kNr = 2;  // 4 v16f accumulators (8 ymm / 16 q-registers)
#endif
constexpr int kPanel = RWKV_TILE_PANEL;     // weight rows per tile (a multiple of kNr)
// bfloat16 tiles: twice the rows in the same bytes, so each pass over the activations (from L2)
// feeds twice the products (Q4_K 3072 x 768, M = 128, one core: 3.3 vs 3.5 ms)
constexpr int kPanelBf16 = RWKV_TILE_PANEL_BF16;
constexpr int64_t kKc = RWKV_TILE_KC;       // inputs per tile (a multiple of every QK)
constexpr int64_t kTileStride = kKc + 16;   // floats per tile row: +64 bytes against set aliasing
constexpr int64_t kTiledMinRows = RWKV_TILE_MIN_ROWS;  // from this many activation rows

// Keeps v in a register: GCC would otherwise fold its load into every instruction using it.
template <class V>
inline void in_register(V& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// y[m0 + m, g + n] = lane sums of a[m][n].
template <int MR, int NR>
inline void store_sums(const Problem& p, v16f (&a)[MR][NR], int64_t m0, int64_t g) {
#if defined(__AVX512F__)
  if constexpr (MR * NR == 16) {
    alignas(64) float s[16];
    const v16f sums = reduce16(&a[0][0]);
    std::memcpy(s, &sums, sizeof s);
    for (int m = 0; m < MR; ++m)
      std::memcpy(p.y + (m0 + m) * p.out + g, s + m * NR, NR * sizeof(float));
    return;
  }
#endif
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) p.y[(m0 + m) * p.out + g + n] = hsum(a[m][n]);
}

// Activation and tile element: float (float32 path) or uint16_t (bfloat16 bits, the
// avx512_bf16 path, where vdpbf16ps multiplies pairs of bfloat16 into float32 lanes).
template <class T>
constexpr bool kBf16 = std::is_same_v<T, uint16_t>;

#if defined(RWKV_TILE_YMM)
// AVX2: tile_block with one 8-lane accumulator per output. With 16-lane ones (2 ymm each) the
// 16 ymm registers hold only 2 x 2 outputs, whose 8 loads per 8 multiply-adds bound the loop
// at half the FMA rate; 3 x 4 outputs take 7 loads per 12. Partial sums between input blocks
// go to part[] as {acc, 0}.
template <int MR, int NR>
__attribute__((noinline)) void tile_block_ymm(const Problem& p, const float* x, int64_t xs,
                                              const float* w, int64_t ws, int64_t kc,
                                              v16f* part, bool first, bool last, int64_t m0,
                                              int64_t g) {
  __m256 a[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n)
      a[m][n] = first ? _mm256_setzero_ps()
                      : _mm256_add_ps(part[m * NR + n].v[0], part[m * NR + n].v[1]);
  for (int64_t k = 0; k < kc; k += 8) {
    __m256 xv[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      xv[m] = _mm256_loadu_ps(x + m * xs + k);
      asm("" : "+x"(xv[m]));  // in a register: GCC would fold this load into every use
    }
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) {
      __m256 wv = _mm256_loadu_ps(w + n * ws + k);
      asm("" : "+x"(wv));
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) a[m][n] = _mm256_fmadd_ps(wv, xv[m], a[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int n = 0; n < NR; ++n) {
      if (last) {
        p.y[(m0 + m) * p.out + g + n] = hsum8(a[m][n]);
      } else {
        part[m * NR + n].v[0] = a[m][n];
        part[m * NR + n].v[1] = _mm256_setzero_ps();
      }
    }
  }
}
#endif

// One block of MR activation rows (from x, rows xs apart) times NR weight rows (from w, rows
// ws apart) over kc inputs (a multiple of 16, of 32 for bfloat16): partial sums start at zero
// (first) or from part, and end as y (last) or in part.
// (Not inlined: inside the tile loop GCC spills the accumulators.)
template <int MR, int NR, class T>
__attribute__((noinline)) void tile_block(const Problem& p, const T* x, int64_t xs, const T* w,
                                          int64_t ws, int64_t kc, v16f* part, bool first,
                                          bool last, int64_t m0, int64_t g) {
#if defined(RWKV_TILE_YMM)
  if constexpr (!kBf16<T>) {
    return tile_block_ymm<MR, NR>(p, x, xs, w, ws, kc, part, first, last, m0, g);
  }
#endif
  v16f a[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) a[m][n] = first ? v16f{} : part[m * NR + n];
  if constexpr (kBf16<T>) {
#if defined(__AVX512BF16__)
    // 32 inputs per step: 16 lanes of bfloat16 pairs (the same pairs in x and w)
    for (int64_t k = 0; k < kc; k += 32) {
      __m512i xv[MR];
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        xv[m] = _mm512_loadu_si512(x + m * xs + k);
        in_register(xv[m]);
      }
#pragma GCC unroll 4
      for (int n = 0; n < NR; ++n) {
        __m512i wv = _mm512_loadu_si512(w + n * ws + k);
        in_register(wv);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
          a[m][n] = reinterpret_cast<v16f>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(a[m][n]),
                                                            reinterpret_cast<__m512bh>(xv[m]),
                                                            reinterpret_cast<__m512bh>(wv)));
        }
      }
    }
#endif
  } else {
    for (int64_t k = 0; k < kc; k += 16) {
      v16f xv[MR];
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        xv[m] = load_f32(x + m * xs + k);
        in_register(xv[m]);
      }
#pragma GCC unroll 4
      for (int n = 0; n < NR; ++n) {
        v16f wv = load_f32(w + n * ws + k);
        in_register(wv);  // one load, not one memory operand per multiply-add
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) a[m][n] += wv * xv[m];
      }
    }
  }
  if (last) {
    store_sums<MR, NR>(p, a, m0, g);
  } else {
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) part[m * NR + n] = a[m][n];
  }
}

// Edge blocks (fewer than kMr activation rows or kNr weight rows left).
template <int MR, class T, int NR = kNr>
inline void tile_block_nr(int nr, const Problem& p, const T* x, int64_t xs, const T* w,
                          int64_t ws, int64_t kc, v16f* part, bool first, bool last, int64_t m0,
                          int64_t g) {
  if (nr == NR) return tile_block<MR, NR>(p, x, xs, w, ws, kc, part, first, last, m0, g);
  if constexpr (NR > 1) {
    return tile_block_nr<MR, T, NR - 1>(nr, p, x, xs, w, ws, kc, part, first, last, m0, g);
  }
}

template <class T, int MR = kMr>
inline void tile_block_any(int mr, int nr, const Problem& p, const T* x, int64_t xs, const T* w,
                           int64_t ws, int64_t kc, v16f* part, bool first, bool last, int64_t m0,
                           int64_t g) {
  if (mr == MR) return tile_block_nr<MR>(nr, p, x, xs, w, ws, kc, part, first, last, m0, g);
  if constexpr (MR > 1) {
    return tile_block_any<T, MR - 1>(mr, nr, p, x, xs, w, ws, kc, part, first, last, m0, g);
  }
}

// A buffer of at least n elements, 64-byte aligned, kept per thread (grows, never shrinks).
template <class T>
inline T* scratch(std::vector<T>& buf, int64_t n) {
  constexpr int64_t pad = 64 / sizeof(T);
  if (static_cast<int64_t>(buf.size()) < n + pad) buf.resize(n + pad);
  const auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((64 - addr % 64) % 64) / sizeof(T);
}

// Weight rows [r0, r1) against all activation rows through dequantized tiles: float32 tiles
// (T = float) or, for bfloat16 activations on avx512_bf16, tiles of the weights rounded to
// bfloat16 by vcvtneps2bf16 (T = uint16_t; round-to-nearest-even as XLA's convert).
template <class F, class T = float>
void rows_tiled(const Problem& p, int64_t r0, int64_t r1) {
  static thread_local std::vector<T> tile_buf;
  static thread_local std::vector<float> part_buf;
  constexpr bool kDirect = std::is_same_v<F, F32> && !kBf16<T>;  // float32 rows: their own tile
  constexpr int64_t kStride = kKc + 64 / sizeof(T);  // tile row: +64 bytes against set aliasing
  constexpr int kP = kBf16<T> ? kPanelBf16 : kPanel;  // weight rows per tile
  const int64_t K = p.nb * F::QK;                    // == p.in (dense: in % 16 == 0 here)
  const int64_t kc_max = std::min<int64_t>(kKc, K);
  T* tile = kDirect ? nullptr : scratch(tile_buf, kP * kStride);
  // partial sums: [m block][n block] of kMr * kNr vectors, only when K spans several blocks
  const int64_t m_blocks = (p.m + kMr - 1) / kMr;
  v16f* part = K > kc_max ? reinterpret_cast<v16f*>(scratch(
                                part_buf, m_blocks * (kP / kNr) * kMr * kNr * 16))
                          : nullptr;
  alignas(64) v16f dummy[kMr * kNr];
  const T* x_base;
  int64_t xs;
  if constexpr (kBf16<T>) {
    x_base = p.xb;
    xs = p.xbs;
  } else {
    x_base = p.x;
    xs = p.xs;
  }
  for (int64_t g = r0; g < r1; g += kP) {
    const int np = static_cast<int>(std::min<int64_t>(kP, r1 - g));
    for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, K - k0);
      const bool first = k0 == 0, last = k0 + kc >= K;
      const T* w;
      int64_t ws;
      if constexpr (kDirect) {
        w = field<float>(p, 0) + g * p.in + k0;
        ws = p.in;
      } else {
        // dequantize rows g .. g+np, inputs k0 .. k0+kc into the tile
        const int64_t b0 = k0 / F::QK, b1 = (k0 + kc) / F::QK;
        for (int n = 0; n < np; ++n) {
          T* row = tile + n * kStride;
          for (int64_t b = b0; b < b1; ++b) {
            T* dst = row + (b - b0) * F::QK;
            F::block(p, g + n, b, [&](int c, v16f v) __attribute__((always_inline)) {
              if constexpr (kBf16<T>) {
#if defined(__AVX512BF16__)
                const __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(v));
                std::memcpy(dst + 16 * c, &h, sizeof h);
#endif
              } else {
                store_f32(dst + 16 * c, v);
              }
            });
          }
        }
        w = tile;
        ws = kStride;
      }
      for (int64_t mb = 0; mb < m_blocks; ++mb) {
        const int64_t m0 = mb * kMr;
        const int mr = static_cast<int>(std::min<int64_t>(kMr, p.m - m0));
        const T* x = x_base + m0 * xs + k0;
        for (int n0 = 0; n0 < np; n0 += kNr) {
          const int nr = std::min(kNr, np - n0);
          v16f* pp = part ? part + (mb * (kP / kNr) + n0 / kNr) * kMr * kNr : dummy;
          if (mr == kMr && nr == kNr) {
            tile_block<kMr, kNr>(p, x, xs, w + n0 * ws, ws, kc, pp, first, last, m0, g + n0);
          } else {
            tile_block_any(mr, nr, p, x, xs, w + n0 * ws, ws, kc, pp, first, last, m0, g + n0);
          }
        }
      }
    }
  }
}

#if defined(__AVX512BF16__)
// bfloat16, many activation rows, short weight rows (in <= kShortK: the LoRA up-projections,
// in = 32..128): lanes along the outputs instead of the inputs. The lanes-along-inputs
// microkernel above ends every block of kMr x kNr outputs with a 16-lane reduction, which for
// a few input steps costs more than the products. Here a panel of 32 weight rows is
// dequantized and rounded to bfloat16 as above, then transposed to pairs: wt[k/2][n] = the
// bfloat16 pair (W[n, k], W[n, k+1]) as one 32-bit word; per input pair each activation row's
// pair is broadcast and vdpbf16ps accumulates 16 outputs per register; sums are stored as
// they are. Same products, float32 accumulation (over k pairs: another summation order).
#ifndef RWKV_SHORT_K
#define RWKV_SHORT_K 256
#endif
constexpr int64_t kShortK = RWKV_SHORT_K;
constexpr int kShortPanel = 32;  // weight rows per panel: 2 vectors of 16 outputs
constexpr int kShortMr = 8;      // activation rows per block: 16 accumulators

// Activation rows [m0, m0 + MR) x panel outputs [g, g + np) (np <= 32; lanes past np masked).
template <int MR>
__attribute__((noinline)) void short_block(const Problem& p, const uint32_t* wt, int64_t kp_n,
                                           int64_t m0, int64_t g, int np) {
  __m512 a[MR][2];
  for (int m = 0; m < MR; ++m) a[m][0] = a[m][1] = _mm512_setzero_ps();
  const uint16_t* x = p.xb + m0 * p.xbs;
  for (int64_t kp = 0; kp < kp_n; ++kp) {
    const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_load_si512(wt + 32 * kp));
    const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_load_si512(wt + 32 * kp + 16));
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      uint32_t pair;
      std::memcpy(&pair, x + m * p.xbs + 2 * kp, 4);
      const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
      a[m][0] = _mm512_dpbf16_ps(a[m][0], xb, w0);
      a[m][1] = _mm512_dpbf16_ps(a[m][1], xb, w1);
    }
  }
  const __mmask16 k0 = np >= 16 ? 0xffff : static_cast<__mmask16>((1u << np) - 1);
  const __mmask16 k1 = np >= 32 ? 0xffff : np <= 16 ? 0 : static_cast<__mmask16>((1u << (np - 16)) - 1);
  for (int m = 0; m < MR; ++m) {
    float* y = p.y + (m0 + m) * p.out + g;
    _mm512_mask_storeu_ps(y, k0, a[m][0]);
    _mm512_mask_storeu_ps(y + 16, k1, a[m][1]);
  }
}

template <int MR = kShortMr>
inline void short_block_any(int mr, const Problem& p, const uint32_t* wt, int64_t kp_n,
                            int64_t m0, int64_t g, int np) {
  if constexpr (MR >= 1) {
    if (mr == MR) return short_block<MR>(p, wt, kp_n, m0, g, np);
    if constexpr (MR > 1) return short_block_any<MR - 1>(mr, p, wt, kp_n, m0, g, np);
  }
}

// Weight rows [r0, r1) against all activation rows, in = K <= kShortK, K % 32 == 0.
template <class F>
void rows_short_bf16(const Problem& p, int64_t r0, int64_t r1) {
  static thread_local std::vector<uint16_t> tile_buf;
  static thread_local std::vector<uint32_t> wt_buf;
  const int64_t K = p.in, kp_n = K / 2;
  uint16_t* tile = scratch(tile_buf, kShortPanel * K);
  uint32_t* wt = scratch(wt_buf, kShortPanel * kp_n);
  for (int64_t g = r0; g < r1; g += kShortPanel) {
    const int np = static_cast<int>(std::min<int64_t>(kShortPanel, r1 - g));
    for (int n = 0; n < kShortPanel; ++n) {
      uint16_t* row = tile + n * K;
      if (n >= np) {  // rows past the end: zeros (their lanes are not stored)
        std::memset(row, 0, K * sizeof(uint16_t));
        continue;
      }
      for (int64_t b = 0; b < p.nb; ++b) {
        uint16_t* dst = row + b * F::QK;
        F::block(p, g + n, b, [&](int c, v16f v) __attribute__((always_inline)) {
          const __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(v));
          std::memcpy(dst + 16 * c, &h, sizeof h);
        });
      }
    }
    // transpose 32-bit pairs: wt[kp][n] = tile[n][2kp .. 2kp+1]
    const uint32_t* t32 = reinterpret_cast<const uint32_t*>(tile);
    for (int64_t kp = 0; kp < kp_n; ++kp) {
      const __m512i idx0 = _mm512_add_epi32(
          _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                               15),
                             _mm512_set1_epi32(static_cast<int>(kp_n))),
          _mm512_set1_epi32(static_cast<int>(kp)));
      const __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32(static_cast<int>(16 * kp_n)));
      _mm512_store_si512(wt + 32 * kp, _mm512_i32gather_epi32(idx0, t32, 4));
      _mm512_store_si512(wt + 32 * kp + 16, _mm512_i32gather_epi32(idx1, t32, 4));
    }
    for (int64_t m0 = 0; m0 < p.m; m0 += kShortMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kShortMr, p.m - m0));
      if (mr == kShortMr) {
        short_block<kShortMr>(p, wt, kp_n, m0, g, np);
      } else {
        short_block_any(mr, p, wt, kp_n, m0, g, np);
      }
    }
  }
}
#endif

// Weight rows [r0, r1) against all activation rows: tiles for many rows, else direct passes.
template <class F>
inline bool tiled(const Problem& p) {
  return p.m >= kTiledMinRows && (!F::kDense || p.in % 16 == 0);
}

template <class F>
void rows_any(const Problem& p, int64_t r0, int64_t r1) {
  if (tiled<F>(p)) {
    rows_tiled<F>(p, r0, r1);
  } else {
    rows_all<F>(p, r0, r1);
  }
}

#if defined(__AVX512BF16__)
// ---------------------------------------------------------------------------------------------
// bfloat16 activations, few rows (decode), avx512_bf16: each block is dequantized as in the
// float32 kernels, consecutive runs of 16 (in the order the format emits them) are rounded to
// bfloat16 in pairs by vcvtne2ps2bf16 and multiplied with the matching 32 activations by
// vdpbf16ps. The activations are permuted once per call into that emission order (xperm).

// Block formats whose runs pair up (QK a multiple of 32) take these kernels; dense ones through
// PairOf (two 16-value runs as one 32-value block) where in % 32 == 0, else the portable path.
template <class F>
constexpr bool kBf16Direct = !F::kDense && F::QK % 32 == 0;

// Dense format F seen as blocks of 32 values (runs 2b and 2b+1 of a row); p.nb = in / 32.
template <class F>
struct PairOf {
  static constexpr const char* kName = F::kName;
  static constexpr int QK = 32, NF = F::NF;
  static constexpr bool kDense = false;
  template <class E>
  static inline void block(const Problem& p, int64_t r, int64_t b, E&& emit) {
    F::block(p, r, 2 * b, [&](int, v16f w) __attribute__((always_inline)) { emit(0, w); });
    F::block(p, r, 2 * b + 1, [&](int, v16f w) __attribute__((always_inline)) { emit(1, w); });
  }
};

// c of the k-th run F::block emits (the order is the same for every block: fixed loops).
template <class F>
const int8_t* emit_order() {
  static const auto order = [] {
    std::array<int8_t, F::QK / 16> o{};
    alignas(64) static const uint8_t zeros[1024] = {};
    Problem p{};
    for (int k = 0; k < F::NF; ++k) p.f[k] = zeros;
    p.nb = 1;
    int k = 0;
    F::block(p, 0, 0, [&](int c, v16f) { o[k++] = static_cast<int8_t>(c); });
    return o;
  }();
  return order.data();
}

// Q4_K block b of row r as 8 runs of 32 bfloat16 weights in element order: emit32(j, w) for
// sub-block j. Per pair of sub-blocks (2g, 2g+1) one 32-entry bfloat16 table, T[k] =
// bf16(d*sc*k - dmin*mn) (k < 16: sub-block 2g; k >= 16: 2g+1; the float32 values as in
// Q4_K::block, then rounded), looked up by vpermw with the nibbles (+16 for the high ones).
template <class E>
inline void q4k_block_bf16(const Problem& p, int64_t r, int64_t b, E&& emit32) {
  const int64_t i = r * p.nb + b;
  alignas(64) float s[16];  // d*sc[0..7], -dmin*mn[0..7]
  k4_scales_vec(field<uint8_t>(p, 2) + 12 * i, f16_to_f32(field<uint16_t>(p, 0)[i]),
                f16_to_f32(field<uint16_t>(p, 1)[i]), s);
  const float* sl = launder(s);
  const uint8_t* qs = field<uint8_t>(p, 3) + 128 * i;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  auto table = [&](int t) {  // unfused multiply and add, as Q4_K::block (exact either way)
    const __m512 prod = _mm512_maskz_mul_ps(0xffff, iota, _mm512_set1_ps(sl[t]));
    return _mm512_maskz_add_ps(0xffff, prod, _mm512_set1_ps(sl[8 + t]));
  };
  const __m512i m15 = _mm512_set1_epi16(15), hi = _mm512_set1_epi16(16);
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512i tab =
        reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(table(2 * g + 1), table(2 * g)));
    const __m512i q = _mm512_cvtepu8_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * g)));  // 32 bytes
    const __m512i lo = _mm512_permutexvar_epi16(_mm512_and_si512(q, m15), tab);
    const __m512i up = _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi16(q, 4), hi), tab);
    emit32(2 * g, reinterpret_cast<__m512bh>(lo));
    emit32(2 * g + 1, reinterpret_cast<__m512bh>(up));
  }
}

// Row r of W against activation rows 0 .. MB-1 of xp (permuted, rows p.xbs apart): the 16-lane
// partial sums per activation row.
template <class F, int MB>
inline void row_partials_bf16(const Problem& p, const uint16_t* xp, int64_t r, v16f* out) {
  constexpr int NA = MB >= 4 ? 1 : 4 / MB;  // accumulators per row: hide the dot latency
  constexpr int PPB = F::QK / 32;           // run pairs per block
  constexpr int U = PPB >= NA ? 1 : NA / PPB;
  __m512 acc[MB][NA];
  for (int m = 0; m < MB; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
  auto step = [&](int64_t b, int u) __attribute__((always_inline)) {
    const uint16_t* xb = xp + b * F::QK;
    int k = 0;  // emissions so far (constant once the block's loops are unrolled)
    __m512 held = _mm512_setzero_ps();
    auto emit = [&](int, v16f w) __attribute__((always_inline)) {
      if ((k & 1) == 0) {
        held = reinterpret_cast<__m512>(w);
      } else {
        // [held, w] as 32 bfloat16, against activations [16(k-1), 16(k+1)) of the permuted row
        const __m512bh wv = _mm512_cvtne2ps_pbh(reinterpret_cast<__m512>(w), held);
        const int a = (u * PPB + (k >> 1)) % NA;
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const __m512i xv = _mm512_loadu_si512(xb + m * p.xbs + 16 * (k - 1));
          acc[m][a] = _mm512_dpbf16_ps(acc[m][a], reinterpret_cast<__m512bh>(xv), wv);
        }
      }
      ++k;
    };
    if constexpr (std::is_same_v<F, Q4_K>) {
      // runs in element order (xp not permuted)
      q4k_block_bf16(p, r, b, [&](int j, __m512bh wv) __attribute__((always_inline)) {
        const int a = (u * PPB + j) % NA;
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) {
          const __m512i xv = _mm512_loadu_si512(xb + m * p.xbs + 32 * j);
          acc[m][a] = _mm512_dpbf16_ps(acc[m][a], reinterpret_cast<__m512bh>(xv), wv);
        }
      });
    } else {
      F::block(p, r, b, emit);
    }
  };
  int64_t b = 0;
  for (; b + U <= p.nb; b += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) step(b + u, u);
  }
  for (; b < p.nb; ++b) step(b, 0);
  for (int m = 0; m < MB; ++m) {
    __m512 s = acc[m][0];
    for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[m][a]);
    out[m] = reinterpret_cast<v16f>(s);
  }
}

// Weight rows [r0, r1) against permuted activation rows [m0, m0 + MB).
template <class F, int MB>
void rows_kernel_bf16(const Problem& p, int64_t m0, int64_t r0, int64_t r1) {
  const uint16_t* x0 = p.xb + m0 * p.xbs;
  for (int64_t g = r0; g < r1; g += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, r1 - g));
    v16f part[MB][16];  // [m][row in group]
    for (int k = 0; k < n; ++k) {
      v16f row[MB];
      row_partials_bf16<F, MB>(p, x0, g + k, row);
      for (int m = 0; m < MB; ++m) part[m][k] = row[m];
    }
    for (int m = 0; m < MB; ++m) {
      float* y = p.y + (m0 + m) * p.out + g;
      if (n == 16) {
        const v16f sums = reduce16(part[m]);
        std::memcpy(y, &sums, sizeof sums);
      } else {
        for (int k = 0; k < n; ++k) y[k] = hsum(part[m][k]);
      }
    }
  }
}

// Weight rows [r0, r1) against all (fewer than kTiledMinRows) permuted activation rows, in
// passes of up to 4 rows.
template <class F>
void rows_all_bf16(const Problem& p, int64_t r0, int64_t r1) {
  for (int64_t m0 = 0; m0 < p.m;) {
    switch (std::min<int64_t>(p.m - m0, 4)) {
      case 1: rows_kernel_bf16<F, 1>(p, m0, r0, r1); m0 += 1; break;
      case 2: rows_kernel_bf16<F, 2>(p, m0, r0, r1); m0 += 2; break;
      case 3: rows_kernel_bf16<F, 3>(p, m0, r0, r1); m0 += 3; break;
      default: rows_kernel_bf16<F, 4>(p, m0, r0, r1); m0 += 4; break;
    }
  }
}

// xperm[m, b*QK + 16k + j] = x[m, b*QK + 16*order[k] + j]: each block's runs in emission order.
template <class F>
void permute_bf16(const Problem& p, uint16_t* xperm) {
  const int8_t* order = emit_order<F>();
  for (int64_t m = 0; m < p.m; ++m) {
    for (int64_t b = 0; b < p.nb; ++b) {
      const uint16_t* src = p.xb + m * p.xbs + b * F::QK;
      uint16_t* dst = xperm + m * p.in + b * F::QK;
      for (int k = 0; k < F::QK / 16; ++k) std::memcpy(dst + 16 * k, src + 16 * order[k], 32);
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Thread pool: N-1 workers plus the caller share a job's chunks through one atomic ticket
// (generation << 32 | next chunk). The caller takes chunks too, so a descheduled worker (an
// oversubscribed machine) only costs the chunk it holds; one job at a time.

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers live as long as the process
    return *pool;
  }

  int size() const { return n_; }

  // Runs fn(c) for every chunk c in [0, chunks) on the caller and the workers; false (nothing
  // run) if another call holds the pool.
  template <class Fn>
  bool run(int chunks, Fn& fn) {
    if (n_ < 2) return false;
    start();
    std::unique_lock<std::mutex> busy(submit_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    ctx_.store(&fn, std::memory_order_relaxed);
    call_.store([](void* ctx, int c) { (*static_cast<Fn*>(ctx))(c); }, std::memory_order_relaxed);
    chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
    ticket_.store(gen << 32, std::memory_order_seq_cst);  // publishes the job
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    work(gen);
    // only chunks a worker already took remain; yield if one takes long (preempted worker)
    for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 4096) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
    return true;
  }

 private:
  Pool() {
    int n = static_cast<int>(std::thread::hardware_concurrency());
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
#endif
    if (const char* env = std::getenv("RWKV_JAX_NATIVE_THREADS")) n = std::atoi(env);
    n_ = std::clamp(n, 1, 64);
  }

  // Our workers start on first use (calls on XLA's pool never need them).
  void start() {
    std::call_once(started_, [this] {
      for (int t = 1; t < n_; ++t) std::thread([this] { worker(); }).detach();
    });
  }

  // Take and run chunks of job `gen` until none is left or a newer job replaced it.
  void work(uint64_t gen) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while ((t >> 32) == gen) {
      const int c = static_cast<int>(t & 0xffffffffu);
      if (c >= chunks_.load(std::memory_order_relaxed)) return;
      // read before the CAS: if it succeeds, chunk c was untaken, so the job had not completed
      // and no newer job had replaced these fields
      void (*call)(void*, int) = call_.load(std::memory_order_relaxed);
      void* ctx = ctx_.load(std::memory_order_relaxed);
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) {
        call(ctx, c);
        done_.fetch_add(1, std::memory_order_acq_rel);
        t = ticket_.load(std::memory_order_acquire);
      }
    }
  }

  void worker() {
    uint64_t seen = 0;
    for (;;) {
      // Spin between calls (a decode step makes ~170 of them, a few to a hundred us apart) and
      // sleep only after kSpin idle. A worker that sleeps is woken onto the caller's core (the
      // scheduler's wake-affine placement; this VM's scheduler also packs threads onto few
      // vCPUs), where the two share one core: measured with a 100 us spin, 2 threads ran a
      // 768 x 768 matvec no faster than one, and pinning the worker did not help. Two busy
      // threads are spread over the cores.
      const auto t0 = std::chrono::steady_clock::now();
      uint64_t gen;
      int spins = 0;
      while ((gen = ticket_.load(std::memory_order_acquire) >> 32) == seen) {
        cpu_relax();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - t0 > kSpin) {
          std::unique_lock<std::mutex> lk(m_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return (ticket_.load(std::memory_order_seq_cst) >> 32) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        }
      }
      seen = gen;
      work(gen);
    }
  }

#ifndef RWKV_SPIN_US
#define RWKV_SPIN_US 5000
#endif
  // idle time before a worker sleeps (pp512 measured ~650 vs ~600 tok/s with 300 us)
  static constexpr std::chrono::microseconds kSpin{RWKV_SPIN_US};
  int n_ = 1;
  std::once_flag started_;
  std::mutex submit_;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int> done_{0};
  std::atomic<int> sleepers_{0};
  // the current job (written only while no chunk of the previous job is outstanding)
  std::atomic<void (*)(void*, int)> call_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int> chunks_{0};
  std::mutex m_;
  std::condition_variable cv_;
};

// Below this many multiply-adds (~2 us on one core) a call stays on the calling thread. The
// 0.1b's LoRA matrices (32..128 x 768, F16/F32, read from memory once per token) gain from two
// threads in chunks of at least kChunkMacs each (2 Zen 4 cores, cold weights: F32 64 x 768
// 8.5 -> 6.4 us, F16 768 x 128 10.0 -> 7.7 us, F32 768 x 64 12.2 -> 10.7 us; F16 768 x 64
// 4.1 -> 4.7 us; in the decode step, trace medians: the 96 LoRA calls per token 0.69 -> 0.65
// ms); with 16 chunks per call, as the large calls take, they lost (~0.6 ms/token once).
#ifndef RWKV_PARALLEL_MACS
#define RWKV_PARALLEL_MACS (1 << 16)
#endif
constexpr double kParallelMacs = RWKV_PARALLEL_MACS;
#ifndef RWKV_CHUNK_MACS
#define RWKV_CHUNK_MACS (1 << 16)
#endif
constexpr double kChunkMacs = RWKV_CHUNK_MACS;
#ifndef RWKV_Q4K_FACTORED
#define RWKV_Q4K_FACTORED 1
#endif
constexpr bool kQ4kFactored = RWKV_Q4K_FACTORED;  // q4k_row1 at one activation row
#ifndef RWKV_Q6K_FACTORED
#define RWKV_Q6K_FACTORED 1
#endif
constexpr bool kQ6kFactored = RWKV_Q6K_FACTORED;  // q6k_row1 at one activation row
#ifndef RWKV_SHORT_ROWS
#define RWKV_SHORT_ROWS 1
#endif
constexpr bool kShortRows = RWKV_SHORT_ROWS;  // rows_short_bf16 for in <= kShortK (bf16)

// rows(r0, r1) over all weight rows, split between the pool and the caller when the call is
// large enough to pay for the hand-off.
template <class Rows>
void for_rows(const Problem& p, Rows&& rows) {
  Pool& pool = Pool::get();
  const int n = pool.size();  // threads this call may use (RWKV_JAX_NATIVE_THREADS, CPUs)
  const double macs = static_cast<double>(p.out) * p.in * (p.m + 2);  // +2: unpacking work
  if (n > 1 && p.out >= 32 && macs >= kParallelMacs) {
    // a few chunks per thread (balance when a thread is slow; long runs of rows keep the
    // hardware prefetchers streaming), multiples of 16 rows, each of at least ~kChunkMacs
    // multiply-adds (a small call: one or two chunks per thread)
    constexpr int per = 8;
    const int64_t want = std::clamp<int64_t>(static_cast<int64_t>(macs / kChunkMacs), n, per * n);
    const int64_t step = std::max<int64_t>(16, (p.out + want - 1) / want / 16 * 16);
    const int chunks = static_cast<int>((p.out + step - 1) / step);
    auto task = [&](int c) { rows(c * step, std::min<int64_t>(p.out, (c + 1) * step)); };
    if (pool.run(chunks, task)) return;
  }
  rows(int64_t{0}, p.out);
}

template <class F>
void run_f32(const Problem& p_in);

// bfloat16 activations (p.xb): y = bf16(x) · bf16(W)ᵀ in float32, W rounded to bfloat16 as
// XLA's dequantize(bf16) does. With avx512_bf16: bfloat16 tiles and vdpbf16ps (many rows;
// rows_short_bf16 for in <= kShortK) or paired runs and vdpbf16ps (few rows). Elsewhere (other
// ISAs, in % 32 != 0, p.portable): the float32 kernels over Bf16Of<F> with x widened exactly.
// Every path multiplies the same bfloat16 values exactly and accumulates in float32; they
// differ only in summation order (and vdpbf16ps treats bfloat16 subnormals, |x| < 2^-126, as 0).
template <class F>
void run_bf16(const Problem& p_in) {
  Problem p = p_in;
  p.xbs = p.in;
#if defined(__AVX512BF16__)
  static thread_local std::vector<uint16_t> xb_buf;
  const bool tiled_bf16 = p.m >= kTiledMinRows && p.nb * F::QK == p.in && p.in % 32 == 0;
  if (!p.portable && tiled_bf16 && p.in <= kShortK && kShortRows) {
    return for_rows(p, [&](int64_t r0, int64_t r1) { rows_short_bf16<F>(p, r0, r1); });
  }
  if (!p.portable && tiled_bf16) {
    if (p.in % 2048 == 0) {
      // rows 4 KiB apart share L1 sets (the microkernel reads kMr of them at once): pad them
      p.xbs = p.in + 32;
      uint16_t* xp = scratch(xb_buf, p.m * p.xbs);
      for (int64_t m = 0; m < p.m; ++m) std::memcpy(xp + m * p.xbs, p.xb + m * p.in, p.in * 2);
      p.xb = xp;
    }
    return for_rows(p, [&](int64_t r0, int64_t r1) { rows_tiled<F, uint16_t>(p, r0, r1); });
  }
  if constexpr (F::kDense) {
    if (!p.portable && !tiled_bf16 && p.in % 32 == 0) {
      p.nb = p.in / 32;  // runs in element order: no permutation
      return for_rows(p, [&](int64_t r0, int64_t r1) { rows_all_bf16<PairOf<F>>(p, r0, r1); });
    }
  }
  if constexpr (kBf16Direct<F>) {
    if (!p.portable && !tiled_bf16) {
      if constexpr (!std::is_same_v<F, Q4_K>) {  // q4k_block_bf16 keeps element order
        uint16_t* xp = scratch(xb_buf, p.m * p.in);
        permute_bf16<F>(p, xp);
        p.xb = xp;
      }
      return for_rows(p, [&](int64_t r0, int64_t r1) { rows_all_bf16<F>(p, r0, r1); });
    }
  }
#endif
  static thread_local std::vector<float> xf_buf;
  float* xf = scratch(xf_buf, p.m * p.in);
  for (int64_t i = 0; i < p.m * p.in; ++i) xf[i] = bf16_to_f32(p.xb[i]);  // exact
  p.x = xf;
  p.xb = nullptr;
  run_f32<Bf16Of<F>>(p);
}

// float32 activations (p.x).
template <class F>
void run_f32(const Problem& p_in) {
  Problem p = p_in;
  p.xs = p.in;
  static thread_local std::vector<float> x_buf;
  if (tiled<F>(p) && p.in % 1024 == 0) {
    // rows 4 KiB apart share L1 sets (the microkernel reads kMr of them at once): pad them
    p.xs = p.in + 16;
    float* xp = scratch(x_buf, p.m * p.xs);
    for (int64_t m = 0; m < p.m; ++m) std::memcpy(xp + m * p.xs, p.x + m * p.in, p.in * 4);
    p.x = xp;
  }
#if defined(__AVX512F__)
  static thread_local std::vector<float> xsum_buf;
  if constexpr (std::is_same_v<F, Q4_K>) {
    if (p.m == 1 && kQ4kFactored) {
      float* xsum = scratch(xsum_buf, 16 * p.nb);
      q4k_xsum(p.x, p.nb, xsum);
      p.xsum = xsum;
    }
  }
#endif
#if defined(__AVX512BW__)
  static thread_local std::vector<float> xperm_buf;
  if constexpr (std::is_same_v<F, Q6_K>) {
    if (p.m == 1 && kQ6kFactored) {
      float* xperm = scratch(xperm_buf, 272 * p.nb);
      q6k_xprep(p.x, p.nb, xperm);
      p.xperm = xperm;
    }
  }
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  static thread_local std::vector<float> sums_buf, xq_scale_buf;
  static thread_local std::vector<int16_t> xq_buf;
  constexpr bool q4k = std::is_same_v<F, Q4_K>, q6k = std::is_same_v<F, Q6_K>;
  if constexpr (q4k || q6k) {
    if (p.m == 1 && (q4k ? kQ4kFactored : kQ6kFactored)) {
      int16_t* xq = scratch(xq_buf, 512 * p.nb);
      float* xq_scale = scratch(xq_scale_buf, 8 * p.nb);
      if (x_int16_digits(p.x, p.nb, xq, xq_scale)) {  // else (inf / NaN in x) the float path
        float* sums = scratch(sums_buf, 16 * p.nb);
        if constexpr (q4k) {
          q4k_xsum_avx2(p.x, p.nb, sums);
          p.xsum = sums;
        } else {
          q6k_xsub(p.x, p.nb, sums);
          p.xsub = sums;
        }
        p.xq = xq;
        p.xq_scale = xq_scale;
      }
    }
  }
#endif
  for_rows(p, [&](int64_t r0, int64_t r1) { rows_any<F>(p, r0, r1); });
}

// y = x · Wᵀ for float32 (p.x) or bfloat16 (p.xb) activations.
template <class F>
void run(const Problem& p) {
  if (p.xb) {
    run_bf16<F>(p);
  } else {
    run_f32<F>(p);
  }
}

// ---------------------------------------------------------------------------------------------
// FFI glue: x f32 or bf16 [M, in], layer s32 [], the format's fields, result f32 [M, out]. Fields are
// either one weight ([out, nb, *trail]) or a stack of weights ([L, out, nb, *trail]) of which
// `layer` picks one (clamped to [0, L-1] as a dynamic slice would be); passing the stack avoids
// the copy XLA makes when a stacked weight is sliced before a custom call.

std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t k = 0; k < d.size(); ++k) s += (k ? ", " : "") + std::to_string(d[k]);
  return s + "]";
}

int64_t byte_width(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return 4;
    case ffi::DataType::F16:
    case ffi::DataType::BF16: return 2;
    default: return 1;  // U8, S8
  }
}

// Byte fields may come as uint8 or int8 (the bytes are what matters: quant.py stores uint8
// fields as int8 views under its metal-safe profile).
bool same_kind(ffi::DataType got, ffi::DataType want) {
  const auto byte = [](ffi::DataType t) {
    return t == ffi::DataType::U8 || t == ffi::DataType::S8;
  };
  return got == want || (byte(got) && byte(want));
}

template <class F, class XB>
ffi::Error call(XB x, ffi::Buffer<ffi::S32> layer, const ffi::AnyBuffer* const* fields,
                ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  const std::string where = std::string("rwkv_jax native ") + F::kName + " matmul: ";
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0] || layer.element_count() != 1) {
    return ffi::Error::InvalidArgument(where +
                                       "x must be [M, in], y [M, out], layer a scalar; got x " +
                                       dims_str(xd) + ", y " + dims_str(yd));
  }
  Problem p{};
  if constexpr (std::is_same_v<XB, ffi::Buffer<ffi::BF16>>) {
    p.xb = reinterpret_cast<const uint16_t*>(x.untyped_data());
  } else {
    p.x = x.typed_data();
  }
  p.y = y->typed_data();
  p.m = xd[0];
  p.in = xd[1];
  p.out = yd[1];
  if (!F::kDense && p.in % F::QK != 0) {
    return ffi::Error::InvalidArgument(where + "in = " + std::to_string(p.in) +
                                       " is not a multiple of the block size");
  }
  p.nb = p.in / F::QK;
  const int64_t nb_field = F::kDense ? p.in : p.nb;  // dense fields are [out, in]
  int64_t stack = -1;                                // layers in the stack, 0 = unstacked
  for (int k = 0; k < F::NF; ++k) {
    const ffi::AnyBuffer& a = *fields[k];
    const auto d = a.dimensions();
    const FieldSpec& s = F::kFields[k];
    const size_t rank = s.trail ? 3u : 2u;
    const int64_t lead = d.size() == rank + 1 ? d[0] : 0;
    const size_t o = lead ? 1 : 0;  // offset of the per-weight dims
    const bool ok = same_kind(a.element_type(), s.dtype) && (d.size() == rank || (lead > 0)) &&
                    (stack < 0 || stack == lead) && d[o] == p.out && d[o + 1] == nb_field &&
                    (!s.trail || d[o + 2] == s.trail);
    if (!ok) {
      return ffi::Error::InvalidArgument(
          where + "field " + std::to_string(k) + " has shape " + dims_str(d) +
          " or the wrong dtype; expected [(L,) " + std::to_string(p.out) + ", " +
          std::to_string(nb_field) + (s.trail ? ", " + std::to_string(s.trail) : "") +
          "] with the same L for every field");
    }
    stack = lead;
    const int64_t per_weight = p.out * nb_field * (s.trail ? s.trail : 1) * byte_width(s.dtype);
    const int64_t l = lead ? std::clamp<int64_t>(layer.typed_data()[0], 0, lead - 1) : 0;
    p.f[k] = static_cast<const char*>(a.untyped_data()) + l * per_weight;
  }
  if (p.m > 0 && p.out > 0) run<F>(p);
  return ffi::Error::Success();
}

using XBuf = ffi::Buffer<ffi::F32>;
using XBf16 = ffi::Buffer<ffi::BF16>;
using LBuf = ffi::Buffer<ffi::S32>;
using YBuf = ffi::Result<ffi::Buffer<ffi::F32>>;
using ABuf = ffi::AnyBuffer;

// A handler's format and activation buffer type, as one template argument.
template <class F, class XB>
struct Of {
  using Fmt = F;
  using X = XB;
};

template <class O>
ffi::Error h1(typename O::X x, LBuf l, ABuf a, YBuf y) {
  const ABuf* f[] = {&a};
  return call<typename O::Fmt>(x, l, f, y);
}
template <class O>
ffi::Error h2(typename O::X x, LBuf l, ABuf a, ABuf b, YBuf y) {
  const ABuf* f[] = {&a, &b};
  return call<typename O::Fmt>(x, l, f, y);
}
template <class O>
ffi::Error h3(typename O::X x, LBuf l, ABuf a, ABuf b, ABuf c, YBuf y) {
  const ABuf* f[] = {&a, &b, &c};
  return call<typename O::Fmt>(x, l, f, y);
}
template <class O>
ffi::Error h4(typename O::X x, LBuf l, ABuf a, ABuf b, ABuf c, ABuf d, YBuf y) {
  const ABuf* f[] = {&a, &b, &c, &d};
  return call<typename O::Fmt>(x, l, f, y);
}
template <class O>
ffi::Error h5(typename O::X x, LBuf l, ABuf a, ABuf b, ABuf c, ABuf d, ABuf e, YBuf y) {
  const ABuf* f[] = {&a, &b, &c, &d, &e};
  return call<typename O::Fmt>(x, l, f, y);
}

template <class F>
using OfF32 = Of<F, XBuf>;
template <class F>
using OfBf16 = Of<F, XBf16>;

}  // namespace

#define RWKV_ARGS(N) RWKV_ARGS_##N
#define RWKV_ARGS_1 .Arg<ffi::AnyBuffer>()
#define RWKV_ARGS_2 RWKV_ARGS_1.Arg<ffi::AnyBuffer>()
#define RWKV_ARGS_3 RWKV_ARGS_2.Arg<ffi::AnyBuffer>()
#define RWKV_ARGS_4 RWKV_ARGS_3.Arg<ffi::AnyBuffer>()
#define RWKV_ARGS_5 RWKV_ARGS_4.Arg<ffi::AnyBuffer>()
// rwkv_qmatvec_<F> takes float32 x, rwkv_qmatvec_bf16_<F> bfloat16 x
#define RWKV_HANDLER_X(sym, F, N, OF, XT)                                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(sym, h##N<OF<F>>,                                       \
                                ffi::Ffi::Bind()                                        \
                                    .Arg<ffi::Buffer<ffi::XT>>()                        \
                                    .Arg<ffi::Buffer<ffi::S32>>() RWKV_ARGS(N)          \
                                    .Ret<ffi::Buffer<ffi::F32>>())
#define RWKV_HANDLER(F, N)                                      \
  RWKV_HANDLER_X(rwkv_qmatvec_##F, F, N, OfF32, F32);           \
  RWKV_HANDLER_X(rwkv_qmatvec_bf16_##F, F, N, OfBf16, BF16)

RWKV_HANDLER(F32, 1);
RWKV_HANDLER(F16, 1);
RWKV_HANDLER(BF16, 1);
RWKV_HANDLER(Q4_0, 2);
RWKV_HANDLER(Q4_1, 3);
RWKV_HANDLER(Q5_0, 3);
RWKV_HANDLER(Q5_1, 4);
RWKV_HANDLER(Q8_0, 2);
RWKV_HANDLER(Q2_K, 4);
RWKV_HANDLER(Q3_K, 4);
RWKV_HANDLER(Q4_K, 4);
RWKV_HANDLER(Q5_K, 5);
RWKV_HANDLER(Q6_K, 4);

// ---------------------------------------------------------------------------------------------
// The per-head work of T tokens (model.heads with the token recurrence, wkv.wkv7_sequential),
// float32 throughout, for B rows: from r, k, v, the LoRA up products and v_first [B, T, C] (or
// [B, C]: T = 1, a decode step) to the gated output, v_first and the new WKV state, written in
// place into layer `layer` of the state stack S [L, B, H, N, N] (the result aliases the input).
// XLA:CPU runs the same work as ~40 small fusions and copies of the state per layer and token;
// here each head's state stays in cache through the row's tokens: per token and value row i,
// sa_i = S_i . alpha, S_i <- S_i * exp(ld) + v_i k + sa_i beta, y_i = S_i . r. The operations
// and their order follow model.heads and wkv.wkv7_step; only the summation order of the dot
// products and norms differs. Vectors (w0, a0, v0, k_k, k_a, r_k, ln_x_w, ln_x_b) are stacks
// [L', C] read at the layer (L' = 1: one layer's). first: 1 / 0, or -1 = (layer == 0).
// active[b, t] == 0: a padding token, which leaves the state as it is (v, beta and the log decay
// taken as 0, as the XLA path does).

namespace {

// e^x for 16 lanes: x = n ln2 + f, e^f by Cephes' expf polynomial (relative error < 2e-7, as
// a libm expf), 2^n through the exponent bits; x clamped to [-87.3, 88.7] (no inf or
// subnormal results: the decays and sigmoids here stay far inside).
inline v16f vexp(v16f x) {
  const v16f lo = v16f{} - 87.3f, hi = v16f{} + 88.7f;
  x = vselect(x < lo, lo, x);
  x = vselect(x > hi, hi, x);
  const v16f magic = v16f{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const v16f n = (x * 1.44269504088896341f + magic) - magic;
  const v16f f = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16f p = v16f{} + 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  const v16f y = p * f * f + f + 1.0f;
  const v16i e = (vconvert<v16i>(n) + 127) << 23;
  return y * vcast<v16f>(e);
}

inline v16f vsigmoid(v16f z) { return 1.0f / (1.0f + vexp(-z)); }


// One token's WKV-7 update and readout of one head's state Sh [N, N] (N = 16 nv): per value row
// i, sa = S_i . alpha (old state), S_i <- S_i * dec + v_i kr + sa beta, y_i = S_i . r.
struct WkvVectors {
  const v16f *alpha, *dec, *kr, *beta, *rr, *vv;
};

// NV > 0: N = 16 NV known here, so the five key-axis vectors stay in registers through the rows
// (2-core CPU, one call of 128 tokens at the 0.1b's 12 heads of 64, median of 30: 1.60 -> 1.12
// ms; the group norm's sums as 16-lane vectors too: 0.87 ms); NV = 0: nv at run time. The same
// operations in the same order either way (bit-identical results).
template <int NV>
void wkv_rows(float* Sh, const WkvVectors& w, float* y, int64_t nv_run = 0) {
  constexpr int kMax = NV > 0 ? NV : 1;
  const int64_t nv = NV > 0 ? NV : nv_run, N = 16 * nv;
  v16f al[kMax], de[kMax], kr[kMax], be[kMax], rr[kMax];
  const v16f *pa = w.alpha, *pd = w.dec, *pk = w.kr, *pb = w.beta, *pr = w.rr;
  if constexpr (NV > 0) {
    for (int q = 0; q < NV; ++q) al[q] = w.alpha[q], de[q] = w.dec[q], kr[q] = w.kr[q];
    for (int q = 0; q < NV; ++q) be[q] = w.beta[q], rr[q] = w.rr[q];
    pa = al, pd = de, pk = kr, pb = be, pr = rr;
  }
  for (int64_t i = 0; i < N; ++i) {
    float* row = Sh + i * N;
    v16f sa_v{};
    for (int64_t q = 0; q < nv; ++q) sa_v += load_f32(row + 16 * q) * pa[q];
    const float sa = hsum(sa_v);
    const float vi = w.vv[i / 16][i % 16];
    v16f y_v{};
    for (int64_t q = 0; q < nv; ++q) {
      const v16f sn = load_f32(row + 16 * q) * pd[q] + vi * pk[q] + sa * pb[q];
      store_f32(row + 16 * q, sn);
      y_v += sn * pr[q];
    }
    y[i] = hsum(y_v);
  }
}

ffi::Error time_mix_step(LBuf layer_b, LBuf first_b, LBuf active_b, XBuf r_b, XBuf k_b, XBuf v_b,
                         XBuf vf_b, XBuf zw_b, XBuf za_b, XBuf zv_b, XBuf g_b, XBuf w0_b,
                         XBuf a0_b, XBuf v0_b, XBuf kk_b, XBuf ka_b, XBuf rk_b, XBuf lnw_b,
                         XBuf lnb_b, XBuf s_in, float eps, float decay_scale, float l2_eps,
                         YBuf out_b, YBuf vf_out_b, YBuf s_out) {
  const auto sd = s_in.dimensions();
  const auto rd = r_b.dimensions();
  if (sd.size() != 5 || (rd.size() != 2 && rd.size() != 3) || sd[3] != sd[4] || sd[3] % 16 != 0 ||
      rd[0] != sd[1] || rd[rd.size() - 1] != sd[2] * sd[3] ||
      s_out->element_count() != s_in.element_count()) {
    return ffi::Error::InvalidArgument("rwkv_jax_time_mix_step: S " + dims_str(sd) + ", r " +
                                       dims_str(rd) +
                                       "; expected S [L, B, H, N, N] (N a multiple of 16), "
                                       "r [B, T, H*N] or [B, H*N]");
  }
  const int64_t L = sd[0], B = sd[1], H = sd[2], N = sd[3], C = H * N;
  const int64_t T = rd.size() == 3 ? rd[1] : 1;
  for (const XBuf* a : {&k_b, &v_b, &vf_b, &zw_b, &za_b, &zv_b, &g_b}) {
    if (a->element_count() != B * T * C) {
      return ffi::Error::InvalidArgument("rwkv_jax_time_mix_step: a [B, T, C] input has " +
                                         dims_str(a->dimensions()) + ", r " + dims_str(rd));
    }
  }
  const int64_t lv = w0_b.element_count() / C;  // layers in the vector stacks
  for (const XBuf* a : {&w0_b, &a0_b, &v0_b, &kk_b, &ka_b, &rk_b, &lnw_b, &lnb_b}) {
    if (lv < 1 || a->element_count() != lv * C) {
      return ffi::Error::InvalidArgument("rwkv_jax_time_mix_step: a vector stack has " +
                                         dims_str(a->dimensions()) + ", expected [L, C]");
    }
  }
  if (active_b.element_count() != B * T) {
    return ffi::Error::InvalidArgument("rwkv_jax_time_mix_step: active has " +
                                       dims_str(active_b.dimensions()));
  }
  const int64_t layer = std::clamp<int64_t>(layer_b.typed_data()[0], 0, L - 1);
  const int32_t first_flag = first_b.typed_data()[0];
  const bool first = first_flag < 0 ? layer_b.typed_data()[0] == 0 : first_flag != 0;
  const int64_t vl = std::clamp<int64_t>(layer_b.typed_data()[0], 0, lv - 1);
  auto vec = [&](const XBuf& a) { return a.typed_data() + vl * C; };
  const float *w0 = vec(w0_b), *a0 = vec(a0_b), *v0 = vec(v0_b), *k_k = vec(kk_b);
  const float *k_a = vec(ka_b), *r_k = vec(rk_b), *lnw = vec(lnw_b), *lnb = vec(lnb_b);
  float* S = s_out->typed_data() + layer * B * H * N * N;
  if (s_out->typed_data() != s_in.typed_data()) {  // not aliased: the other layers as they are
    std::memcpy(s_out->typed_data(), s_in.typed_data(), s_in.element_count() * sizeof(float));
  }
  const int64_t nv = N / 16;  // 16-lane vectors per head row
  // token bt (= b * T + t) of row b, head h
  auto token = [&](int64_t bt, int64_t b, int64_t h) {
    static thread_local std::vector<v16f> buf;
    static thread_local std::vector<float> fbuf;
    buf.resize(7 * nv);
    fbuf.resize(2 * N);
    v16f *kn = buf.data(), *kr = kn + nv, *alpha = kr + nv, *beta = alpha + nv;
    v16f *dec = beta + nv, *vv = dec + nv, *rr = vv + nv;
    float *y = fbuf.data(), *vmix = y + N;
    const bool act = active_b.typed_data()[bt] != 0;
    const int64_t o = bt * C;
    const float *r = r_b.typed_data() + o, *k = k_b.typed_data() + o, *v = v_b.typed_data() + o;
    const float *vf_in = vf_b.typed_data() + o, *zw = zw_b.typed_data() + o;
    const float *za = za_b.typed_data() + o, *zv = zv_b.typed_data() + o;
    const float* g = g_b.typed_data() + o;
    float *out = out_b->typed_data() + o, *vf_out = vf_out_b->typed_data() + o;
    {
      v16f norm2{}, bonus{};
      for (int64_t q = 0; q < nv; ++q) {
        const int64_t c = h * N + 16 * q;
        kn[q] = load_f32(k + c) * load_f32(k_k + c);  // kk, normalized below
        norm2 += kn[q] * kn[q];
      }
      const float inv = 1.0f / std::max(std::sqrt(hsum(norm2)), l2_eps);
      for (int64_t q = 0; q < nv; ++q) {
        const int64_t c = h * N + 16 * q;
        const v16f kv = load_f32(k + c), vv_in = load_f32(v + c), rv = load_f32(r + c);
        const v16f ld = -decay_scale * vsigmoid(load_f32(w0 + c) + load_f32(zw + c));
        const v16f a = vsigmoid(load_f32(a0 + c) + load_f32(za + c));
        const v16f vfirst = first ? vv_in : load_f32(vf_in + c);
        store_f32(vf_out + c, vfirst);
        const v16f vm = vv_in + (vfirst - vv_in) * vsigmoid(load_f32(v0 + c) + load_f32(zv + c));
        const v16f knorm = kn[q] * inv;
        kr[q] = kv * (1.0f + (a - 1.0f) * load_f32(k_a + c));
        alpha[q] = -knorm;
        beta[q] = act ? knorm * a : v16f{};
        dec[q] = act ? vexp(ld) : v16f{} + 1.0f;
        vv[q] = act ? vm : v16f{};
        rr[q] = rv;
        store_f32(vmix + 16 * q, vm);
        bonus += rv * kr[q] * load_f32(r_k + c);
      }
      const float bon = hsum(bonus);
      float* Sh = S + (b * H + h) * N * N;
      const WkvVectors wv{alpha, dec, kr, beta, rr, vv};
      switch (nv) {  // the common head sizes with the row's vectors in registers
        case 4: wkv_rows<4>(Sh, wv, y); break;
        case 2: wkv_rows<2>(Sh, wv, y); break;
        case 8: wkv_rows<8>(Sh, wv, y); break;
        default: wkv_rows<0>(Sh, wv, y, nv);
      }
      // the group norm's mean and variance as 16-lane sums (no chain of N scalar additions)
      v16f mu_v{};
      for (int64_t q = 0; q < nv; ++q) mu_v += load_f32(y + 16 * q);
      const float mu = hsum(mu_v) / static_cast<float>(N);
      v16f var_v{};
      for (int64_t q = 0; q < nv; ++q) {
        const v16f d = load_f32(y + 16 * q) - mu;
        var_v += d * d;
      }
      const float var = hsum(var_v) / static_cast<float>(N);
      const float rs = 1.0f / std::sqrt(var + eps);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t c = h * N + i;
        out[c] = ((y[i] - mu) * rs * lnw[c] + lnb[c] + bon * vmix[i]) * g[c];
      }
    }
  };
  // one (row, head) pair per unit of work, shared between the pool's threads: the state read and
  // written (N * N floats per head, from memory in a decode step) is what a call costs; its
  // tokens one after another, the state in cache between them
  auto unit = [&](int64_t b, int64_t h) {
    for (int64_t t = 0; t < T; ++t) token(b * T + t, b, h);
  };
  const int64_t units = B * H;
  Pool& pool = Pool::get();
  const int chunks = static_cast<int>(std::min<int64_t>(units, 4 * pool.size()));
  auto task = [&](int c) {
    for (int64_t u = units * c / chunks; u < units * (c + 1) / chunks; ++u) unit(u / H, u % H);
  };
  if (chunks < 2 || !pool.run(chunks, task)) {
    for (int64_t u = 0; u < units; ++u) unit(u / H, u % H);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(rwkv_time_mix_step, time_mix_step,
                              ffi::Ffi::Bind()
                                  .Arg<LBuf>()  // layer
                                  .Arg<LBuf>()  // first
                                  .Arg<LBuf>()  // active
                                  .Arg<XBuf>()  // r
                                  .Arg<XBuf>()  // k
                                  .Arg<XBuf>()  // v
                                  .Arg<XBuf>()  // v_first
                                  .Arg<XBuf>()  // w2 up product
                                  .Arg<XBuf>()  // a2
                                  .Arg<XBuf>()  // v2
                                  .Arg<XBuf>()  // g2
                                  .Arg<XBuf>()  // w0
                                  .Arg<XBuf>()  // a0
                                  .Arg<XBuf>()  // v0
                                  .Arg<XBuf>()  // k_k
                                  .Arg<XBuf>()  // k_a
                                  .Arg<XBuf>()  // r_k
                                  .Arg<XBuf>()  // ln_x_w
                                  .Arg<XBuf>()  // ln_x_b
                                  .Arg<XBuf>()  // S
                                  .Attr<float>("eps")
                                  .Attr<float>("decay_scale")
                                  .Attr<float>("l2_eps")
                                  .Ret<XBuf>()   // out * g
                                  .Ret<XBuf>()   // v_first
                                  .Ret<XBuf>());  // S

// The kernels without XLA (benchmarks, debugging, tests): fields as in the FFI call, all
// C-contiguous. x_kind 0: x is float32 [m, in]; 1: bfloat16 bits [m, in] (the bf16 path this
// build takes); 2: bfloat16 through the portable path (Bf16Of on the float32 kernels).
// Returns 0, or -1 for an unknown format name or x_kind.
extern "C" int rwkv_qmatvec_direct_x(const char* fmt, int x_kind, const void* x,
                                     const void* const* fields, int64_t m, int64_t in,
                                     int64_t out, float* y) {
  if (x_kind < 0 || x_kind > 2) return -1;
  auto go = [&](auto tag) {
    using F = decltype(tag);
    Problem p{};
    if (x_kind == 0) {
      p.x = static_cast<const float*>(x);
    } else {
      p.xb = static_cast<const uint16_t*>(x);
      p.portable = x_kind == 2;
    }
    p.y = y;
    p.m = m;
    p.in = in;
    p.out = out;
    p.nb = in / F::QK;
    for (int k = 0; k < F::NF; ++k) p.f[k] = fields[k];
    if (m > 0 && out > 0) run<F>(p);
    return 0;
  };
  const std::string f(fmt);
  if (f == "F32") return go(F32{});
  if (f == "F16") return go(F16{});
  if (f == "BF16") return go(BF16{});
  if (f == "Q4_0") return go(Q4_0{});
  if (f == "Q4_1") return go(Q4_1{});
  if (f == "Q5_0") return go(Q5_0{});
  if (f == "Q5_1") return go(Q5_1{});
  if (f == "Q8_0") return go(Q8_0{});
  if (f == "Q2_K") return go(Q2_K{});
  if (f == "Q3_K") return go(Q3_K{});
  if (f == "Q4_K") return go(Q4_K{});
  if (f == "Q5_K") return go(Q5_K{});
  if (f == "Q6_K") return go(Q6_K{});
  return -1;
}

// float32 x only (the original entry point).
extern "C" int rwkv_qmatvec_direct(const char* fmt, const float* x, const void* const* fields,
                                   int64_t m, int64_t in, int64_t out, float* y) {
  return rwkv_qmatvec_direct_x(fmt, 0, x, fields, m, in, out, y);
}

// What this build uses, for logs and benchmark reports.
extern "C" const char* rwkv_qmatvec_info() {
  static const std::string info =
      std::string("isa=") +
#if defined(__AVX512F__)
      "avx512"
#elif defined(__AVX2__)
      "avx2"
#elif defined(__ARM_NEON)
      "neon"
#else
      "generic"
#endif
      + " threads=" + std::to_string(Pool::get().size()) +
#if RWKV_WIDE_STRUCT
      " v16=" + std::to_string(64 / kPartBytes) + "x" + std::to_string(8 * kPartBytes) + "bit" +
#else
      " v16=vector_ext" +
#endif
      " rows_per_pass=" + std::to_string(kMaxRows) + " tile_min_rows=" +
      std::to_string(kTiledMinRows) + " tile_kc=" + std::to_string(kKc) +
      " tile=" + std::to_string(kMr) + "x" + std::to_string(kNr) +
      " row_prefetch=" + std::to_string(kRowPrefetch) +
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
      " q4k_factored=" + std::to_string(int(kQ4kFactored)) +
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
      " q4k_int16_x=" + std::to_string(int(kQ4kFactored)) +  // x_int16_digits
      " q6k_int16_x=" + std::to_string(int(kQ6kFactored)) +
#endif
#if defined(__AVX512BW__) || (defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__))
      " q6k_factored=" + std::to_string(int(kQ6kFactored)) +
#endif
#if defined(__AVX512BF16__)
      " bf16=avx512_bf16" +
#else
      " bf16=portable" +
#endif
      "";
  return info.c_str();
}
