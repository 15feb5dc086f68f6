// Internal: the fused Adam element loop, written once as a template over a SIMD "vector" type and
// instantiated per ISA in its own translation unit (cpu_adam.cpp: scalar, cpu_adam_avx2.cpp,
// cpu_adam_avx512.cpp, the latter two compiled with their ISA's flags).
//
// Every cpu_adam*.cpp is compiled with -ffp-contract=off and the loop below performs exactly the
// fp32 operations of adam_step_reference, in the same order; IEEE add/sub/mul/div/sqrt are
// correctly rounded on every path, so all paths give bit-identical results.
//
// ODR note: the templates live in an unnamed namespace, so each ISA translation unit gets its own
// copy; an AVX-512 instantiation can never be picked by the linker for the scalar path. The ISA
// translation units call nothing inline from other headers for the same reason.
#pragma once
#include <cstdint>
#include <cstring>

#include "lspo/cpu_adam.h"

namespace lspo {
namespace detail {

// Per-step scalars: derived once in double from AdamConfig (as torch derives them from Python
// floats), then rounded to fp32. Shared by the reference and every SIMD path.
struct AdamScalars {
  float grad_scale = 1.0f;   // f32(grad_scale)
  bool maximize = false;
  float signed_scale = 1.0f; // -grad_scale when maximize (negation commutes exactly with rounding)
  bool decoupled_wd = false; // AdamW with wd != 0: p = p * decay
  float decay = 1.0f;        // f32(1 - lr * wd)
  bool l2_wd = false;        // Adam(L2) with wd != 0: g = g + l2 * p
  float l2 = 0.0f;           // f32(wd)
  bool lerp_low = true;      // f32(1 - b1) < 0.5: m + w (g - m); else g - (g - m) (1 - w)
  float w1 = 0.1f;           // f32(1 - b1)
  float w1c = 0.9f;          // 1.0f - w1 (fp32, as torch's lerp computes it)
  float b2 = 0.999f;         // f32(b2)
  float w2 = 0.001f;         // f32(1 - b2)
  float inv_bc2_sqrt = 1.0f; // 1.0f / f32(sqrt(1 - b2^step))
  float eps = 1e-8f;
  float neg_step_size = -1e-3f;  // f32(-lr / (1 - b1^step))
};
AdamScalars adam_scalars(const AdamConfig& cfg, int64_t step);

// Entry points of each ISA translation unit: process elements [begin, end) of `b`.
void adam_chunk_scalar(const AdamScalars& s, const AdamBuffers& b, int64_t begin, int64_t end);
void adam_chunk_avx2(const AdamScalars& s, const AdamBuffers& b, int64_t begin, int64_t end);
void adam_chunk_avx512(const AdamScalars& s, const AdamBuffers& b, int64_t begin, int64_t end);
// True when data[begin, end) holds no inf/NaN.
bool finite_chunk_scalar(const void* data, DType t, int64_t begin, int64_t end);
bool finite_chunk_avx2(const void* data, DType t, int64_t begin, int64_t end);
bool finite_chunk_avx512(const void* data, DType t, int64_t begin, int64_t end);

}  // namespace detail
}  // namespace lspo

#ifdef LSPO_ADAM_KERNEL_TU  // the templates, only in the translation units that instantiate them
namespace {

enum class OutKind { kNone, kF32, kBF16, kF16 };

// V provides: type F, constexpr int W, set1, load, store<NT>, sqrt (fp32 lanes),
// load_bf16 / load_f16 / store_bf16<NT> / store_f16<NT> (W 16-bit elements, round to nearest even)
// and fence(). F supports + - * / lane-wise in fp32. NT = true: streaming (non-temporal) store to
// an address aligned to the vector's size; fence() orders those stores before the chunk ends.
//
// Speed: the loop is memory-bound (28 bytes per element at the minimum). Two things measured on a
// 2-core Sapphire Rapids VM (benchmarks/cpu_adam.py): software prefetch of p, m, v, g kPrefetch
// elements ahead (+15-20%: two cores cannot keep enough misses in flight from the hardware
// prefetchers alone), and streaming stores for param_out, which is only written (saves the read
// for ownership of its lines, +10% on the bf16-out workload).
constexpr int64_t kPrefetch = 512;
template <class V, lspo::DType G>
inline typename V::F load_grad(const void* g, int64_t i) {
  if constexpr (G == lspo::DType::kFloat32)
    return V::load(static_cast<const float*>(g) + i);
  else if constexpr (G == lspo::DType::kBFloat16)
    return V::load_bf16(static_cast<const uint16_t*>(g) + i);
  else
    return V::load_f16(static_cast<const uint16_t*>(g) + i);
}

template <class V, OutKind O, bool NT>
inline void store_out(void* out, int64_t i, typename V::F x) {
  if constexpr (O == OutKind::kF32)
    V::template store<NT>(static_cast<float*>(out) + i, x);
  else if constexpr (O == OutKind::kBF16)
    V::template store_bf16<NT>(static_cast<uint16_t*>(out) + i, x);
  else if constexpr (O == OutKind::kF16)
    V::template store_f16<NT>(static_cast<uint16_t*>(out) + i, x);
}

// One vector of W elements at index i. The op order is that of adam_step_reference.
template <class V, lspo::DType G, OutKind O, bool NT>
inline void adam_vec(const lspo::detail::AdamScalars& s, float* p, float* m, float* v, const void* g,
                     void* out, int64_t i) {
  using F = typename V::F;
  F gv = load_grad<V, G>(g, i) * V::set1(s.signed_scale);
  F pv = V::set1(0.0f);
  if (p) {
    pv = V::load(p + i);
    if (s.decoupled_wd)
      pv = pv * V::set1(s.decay);
    else if (s.l2_wd)
      gv = gv + V::set1(s.l2) * pv;
  }
  F mv = V::load(m + i);
  if (s.lerp_low)
    mv = mv + V::set1(s.w1) * (gv - mv);
  else
    mv = gv - (gv - mv) * V::set1(s.w1c);
  F vv = V::load(v + i) * V::set1(s.b2) + (V::set1(s.w2) * gv) * gv;
  V::template store<false>(m + i, mv);
  V::template store<false>(v + i, vv);
  F d = V::sqrt(vv) * V::set1(s.inv_bc2_sqrt) + V::set1(s.eps);
  F u = (V::set1(s.neg_step_size) * mv) / d;
  if (p) {
    pv = pv + u;
    V::template store<false>(p + i, pv);
    store_out<V, O, NT>(out, i, pv);
  } else {
    store_out<V, O, NT>(out, i, u);
  }
}

// Prefetch once per 64-byte line of the fp32 streams. (A macro, not a lambda: GCC deems a
// function that only prefetches "const" and deletes calls to it before inlining.)
#define LSPO_ADAM_PREFETCH(j)                                     \
  if (W >= 8 && ((j) & 15) == 0) {                                \
    if (p) __builtin_prefetch(p + (j) + kPrefetch, 1, 3);         \
    __builtin_prefetch(m + (j) + kPrefetch, 1, 3);                \
    __builtin_prefetch(v + (j) + kPrefetch, 1, 3);                \
    __builtin_prefetch(g + ((j) + kPrefetch) * gsz, 0, 3);        \
  }

template <class V, lspo::DType G, OutKind O>
void adam_loop(const lspo::detail::AdamScalars& s, const lspo::AdamBuffers& b, int64_t begin, int64_t end) {
  constexpr int W = V::W;
  const int gsz = G == lspo::DType::kFloat32 ? 4 : 2;
  constexpr int osz = O == OutKind::kF32 ? 4 : 2;
  int64_t i = begin;
  float* const p = b.param;
  float* const m = b.exp_avg;
  float* const v = b.exp_avg_sq;
  const char* const g = static_cast<const char*>(b.grad);
  const bool stream_out = O != OutKind::kNone && W >= 8 &&
                          reinterpret_cast<uintptr_t>(static_cast<char*>(b.param_out) + begin * osz) % (W * osz) == 0;
  if (stream_out) {
    for (; i + W <= end; i += W) {
      LSPO_ADAM_PREFETCH(i);
      adam_vec<V, G, O, true>(s, p, m, v, g, b.param_out, i);
    }
    V::fence();
  } else {
    for (; i + W <= end; i += W) {
      LSPO_ADAM_PREFETCH(i);
      adam_vec<V, G, O, false>(s, p, m, v, g, b.param_out, i);
    }
  }
  const int64_t r = end - i;
  if (r <= 0) return;
  // Tail (< W elements): run one full vector on zero-padded copies, write back the r valid lanes.
  float pt[W] = {}, mt[W] = {}, vt[W] = {};
  alignas(64) unsigned char gt[W * 4] = {}, ot[W * 4] = {};
  if (b.param) std::memcpy(pt, b.param + i, r * 4);
  std::memcpy(mt, b.exp_avg + i, r * 4);
  std::memcpy(vt, b.exp_avg_sq + i, r * 4);
  std::memcpy(gt, static_cast<const unsigned char*>(b.grad) + i * gsz, r * gsz);
  adam_vec<V, G, O, false>(s, b.param ? pt : nullptr, mt, vt, gt, ot, 0);
  if (b.param) std::memcpy(b.param + i, pt, r * 4);
  std::memcpy(b.exp_avg + i, mt, r * 4);
  std::memcpy(b.exp_avg_sq + i, vt, r * 4);
  if (O != OutKind::kNone) std::memcpy(static_cast<unsigned char*>(b.param_out) + i * osz, ot, r * osz);
}

#undef LSPO_ADAM_PREFETCH

template <class V, lspo::DType G>
void adam_dispatch_out(const lspo::detail::AdamScalars& s, const lspo::AdamBuffers& b, int64_t begin, int64_t end) {
  if (!b.param_out) return adam_loop<V, G, OutKind::kNone>(s, b, begin, end);
  switch (b.out_dtype) {
    case lspo::DType::kFloat32: return adam_loop<V, G, OutKind::kF32>(s, b, begin, end);
    case lspo::DType::kBFloat16: return adam_loop<V, G, OutKind::kBF16>(s, b, begin, end);
    case lspo::DType::kFloat16: return adam_loop<V, G, OutKind::kF16>(s, b, begin, end);
  }
}

template <class V>
void adam_chunk(const lspo::detail::AdamScalars& s, const lspo::AdamBuffers& b, int64_t begin, int64_t end) {
  switch (b.grad_dtype) {
    case lspo::DType::kFloat32: return adam_dispatch_out<V, lspo::DType::kFloat32>(s, b, begin, end);
    case lspo::DType::kBFloat16: return adam_dispatch_out<V, lspo::DType::kBFloat16>(s, b, begin, end);
    case lspo::DType::kFloat16: return adam_dispatch_out<V, lspo::DType::kFloat16>(s, b, begin, end);
  }
}

// Scalar check of [begin, end) (tails of the SIMD paths and the scalar path).
inline bool finite_tail(const void* data, lspo::DType t, int64_t begin, int64_t end) {
  if (t == lspo::DType::kFloat32) {
    const uint32_t* u = static_cast<const uint32_t*>(data);
    for (int64_t i = begin; i < end; ++i)
      if ((u[i] & 0x7fffffffu) >= 0x7f800000u) return false;
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(data);
    const uint16_t lim = t == lspo::DType::kBFloat16 ? 0x7f80u : 0x7c00u;
    for (int64_t i = begin; i < end; ++i)
      if ((h[i] & 0x7fffu) >= lim) return false;
  }
  return true;
}

}  // namespace
#endif  // LSPO_ADAM_KERNEL_TU
