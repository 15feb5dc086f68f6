// The AVX-512 (F+BW+DQ+VL) path of the fused Adam step and of all_finite. This file is compiled
// with AVX-512 flags and entered only after runtime dispatch (cpu_adam.cpp); it must not call
// inline functions of other headers (see cpu_adam_kernels.h).
// GCC 12 warns falsely about _mm512_undefined_* inside its own intrinsics headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define LSPO_ADAM_KERNEL_TU
#include "cpu_adam_kernels.h"

namespace {

struct V512 {
  using F = __m512;
  static constexpr int W = 16;
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  template <bool NT>
  static void store(float* p, F x) {
    if constexpr (NT) _mm512_stream_ps(p, x); else _mm512_storeu_ps(p, x);
  }
  template <bool NT>
  static void put(uint16_t* p, __m256i x) {
    if constexpr (NT) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), x);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
  }
  static void fence() { _mm_sfence(); }
  static F sqrt(F x) { return _mm512_sqrt_ps(x); }
  static F load_bf16(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // Round to nearest even in integer arithmetic (as lspo::float_to_bf16; unlike VCVTNEPS2BF16 it
  // keeps denormals), NaN -> quiet NaN.
  template <bool NT>
  static void store_bf16(uint16_t* p, F x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
    put<NT>(p, _mm512_cvtepi32_epi16(r));
  }
  template <bool NT>
  static void store_f16(uint16_t* p, F x) {
    put<NT>(p, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

// Largest |element| bit pattern, compared against the first non-finite pattern.
bool finite_avx512(const void* data, lspo::DType t, int64_t begin, int64_t end) {
  int64_t i = begin;
  if (t == lspo::DType::kFloat32) {
    const float* f = static_cast<const float*>(data);
    const __m512i mask = _mm512_set1_epi32(0x7fffffff);
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    for (; i + 32 <= end; i += 32) {
      acc0 = _mm512_max_epu32(acc0, _mm512_and_si512(_mm512_loadu_si512(f + i), mask));
      acc1 = _mm512_max_epu32(acc1, _mm512_and_si512(_mm512_loadu_si512(f + i + 16), mask));
    }
    const __m512i acc = _mm512_max_epu32(acc0, acc1);
    if (_mm512_cmpge_epu32_mask(acc, _mm512_set1_epi32(0x7f800000))) return false;
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(data);
    const __m512i mask = _mm512_set1_epi16(0x7fff);
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    for (; i + 64 <= end; i += 64) {
      acc0 = _mm512_max_epu16(acc0, _mm512_and_si512(_mm512_loadu_si512(h + i), mask));
      acc1 = _mm512_max_epu16(acc1, _mm512_and_si512(_mm512_loadu_si512(h + i + 32), mask));
    }
    const short lim = t == lspo::DType::kBFloat16 ? 0x7f80 : 0x7c00;
    if (_mm512_cmpge_epu16_mask(_mm512_max_epu16(acc0, acc1), _mm512_set1_epi16(lim))) return false;
  }
  return finite_tail(data, t, i, end);
}

}  // namespace

namespace lspo {
namespace detail {
void adam_chunk_avx512(const AdamScalars& s, const AdamBuffers& b, int64_t begin, int64_t end) {
  adam_chunk<V512>(s, b, begin, end);
}
bool finite_chunk_avx512(const void* data, DType t, int64_t begin, int64_t end) {
  return finite_avx512(data, t, begin, end);
}
}  // namespace detail
}  // namespace lspo
