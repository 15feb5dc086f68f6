// The AVX2 (+FMA+F16C) path of the fused Adam step and of all_finite. This file is compiled with
// AVX2 flags and entered only after runtime dispatch (cpu_adam.cpp); it must not call inline
// functions of other headers (see cpu_adam_kernels.h).
#include <immintrin.h>

#define LSPO_ADAM_KERNEL_TU
#include "cpu_adam_kernels.h"

namespace {

struct V256 {
  using F = __m256;
  static constexpr int W = 8;
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  template <bool NT>
  static void store(float* p, F x) {
    if constexpr (NT) _mm256_stream_ps(p, x); else _mm256_storeu_ps(p, x);
  }
  template <bool NT>
  static void put(uint16_t* p, __m128i x) {
    if constexpr (NT) _mm_stream_si128(reinterpret_cast<__m128i*>(p), x);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), x);
  }
  static void fence() { _mm_sfence(); }
  static F sqrt(F x) { return _mm256_sqrt_ps(x); }
  static F load_bf16(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static F load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // Round to nearest even in integer arithmetic (as lspo::float_to_bf16), NaN -> quiet NaN.
  template <bool NT>
  static void store_bf16(uint16_t* p, F x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    // |u| and 0x7f800000 are both non-negative as int32, so a signed compare is exact.
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
    // 8 x u32 (< 65536) -> 8 x u16: pack within 128-bit lanes, then gather qwords 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    put<NT>(p, _mm256_castsi256_si128(packed));
  }
  template <bool NT>
  static void store_f16(uint16_t* p, F x) {
    put<NT>(p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

bool all_lanes_below(__m256i acc32_or_16, __m256i lim, bool is32) {
  // acc < lim in every lane  <=>  max(acc, lim) == lim ... and acc != lim; use max(acc, lim - 1).
  const __m256i limm1 = is32 ? _mm256_sub_epi32(lim, _mm256_set1_epi32(1)) : _mm256_sub_epi16(lim, _mm256_set1_epi16(1));
  const __m256i mx = is32 ? _mm256_max_epu32(acc32_or_16, limm1) : _mm256_max_epu16(acc32_or_16, limm1);
  return _mm256_movemask_epi8(_mm256_cmpeq_epi8(mx, limm1)) == -1;
}

bool finite_avx2(const void* data, lspo::DType t, int64_t begin, int64_t end) {
  int64_t i = begin;
  if (t == lspo::DType::kFloat32) {
    const float* f = static_cast<const float*>(data);
    const __m256i mask = _mm256_set1_epi32(0x7fffffff);
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    for (; i + 16 <= end; i += 16) {
      acc0 = _mm256_max_epu32(acc0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(f + i)), mask));
      acc1 = _mm256_max_epu32(acc1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(f + i + 8)), mask));
    }
    if (!all_lanes_below(_mm256_max_epu32(acc0, acc1), _mm256_set1_epi32(0x7f800000), true)) return false;
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(data);
    const __m256i mask = _mm256_set1_epi16(0x7fff);
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    for (; i + 32 <= end; i += 32) {
      acc0 = _mm256_max_epu16(acc0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i)), mask));
      acc1 = _mm256_max_epu16(acc1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i + 16)), mask));
    }
    const short lim = t == lspo::DType::kBFloat16 ? 0x7f80 : 0x7c00;
    if (!all_lanes_below(_mm256_max_epu16(acc0, acc1), _mm256_set1_epi16(lim), false)) return false;
  }
  return finite_tail(data, t, i, end);
}

}  // namespace

namespace lspo {
namespace detail {
void adam_chunk_avx2(const AdamScalars& s, const AdamBuffers& b, int64_t begin, int64_t end) {
  adam_chunk<V256>(s, b, begin, end);
}
bool finite_chunk_avx2(const void* data, DType t, int64_t begin, int64_t end) {
  return finite_avx2(data, t, begin, end);
}
}  // namespace detail
}  // namespace lspo
