// Dispatch of the fused Adam step and of all_finite: picks the ISA path, splits the buffers over
// the persistent thread pool, and holds the scalar (no-SIMD) path. The SIMD paths live in
// cpu_adam_avx2.cpp and cpu_adam_avx512.cpp.
#include <atomic>
#include <cmath>

#define LSPO_ADAM_KERNEL_TU
#include "cpu_adam_kernels.h"
#include "lspo/cpu_adam.h"
#include "lspo/half.h"
#include "lspo/thread_pool.h"

namespace lspo {
namespace {

// The scalar "vector": one lane. (Compiled for the baseline ISA.)
struct VScalar {
  using F = float;
  static constexpr int W = 1;
  static F set1(float x) { return x; }
  static F load(const float* p) { return *p; }
  template <bool NT>
  static void store(float* p, F x) { *p = x; }
  static void fence() {}
  static F sqrt(F x) { return std::sqrt(x); }
  static F load_bf16(const uint16_t* p) { return bf16_to_float(*p); }
  static F load_f16(const uint16_t* p) { return fp16_to_float(*p); }
  template <bool NT>
  static void store_bf16(uint16_t* p, F x) { *p = float_to_bf16(x); }
  template <bool NT>
  static void store_f16(uint16_t* p, F x) { *p = float_to_fp16(x); }
};

// Chunks: at least this many elements per thread (below it, waking a thread costs more than it
// saves), boundaries on multiples of 64 elements (whole 64-byte lines of fp32 for every thread).
constexpr int64_t kMinChunk = 1 << 14;
constexpr int64_t kAlign = 64;

ThreadPool& pool_or_global(ThreadPool* pool) { return pool ? *pool : ThreadPool::global(); }

void check_isa(Isa isa) {
  LSPO_CHECK(static_cast<int>(isa) <= static_cast<int>(detected_isa()), "cannot run the ", isa_name(isa),
             " path: this CPU supports at most ", isa_name(detected_isa()));
}

}  // namespace

namespace detail {
void adam_chunk_scalar(const AdamScalars& s, const AdamBuffers& b, int64_t begin, int64_t end) {
  adam_chunk<VScalar>(s, b, begin, end);
}
bool finite_chunk_scalar(const void* data, DType t, int64_t begin, int64_t end) {
  return finite_tail(data, t, begin, end);
}
}  // namespace detail

void adam_step_isa(Isa isa, const AdamConfig& cfg, int64_t step, const AdamBuffers& buf, ThreadPool* pool) {
  check_adam_args(cfg, step, buf);
  check_isa(isa);
  if (buf.n == 0) return;
  const detail::AdamScalars s = detail::adam_scalars(cfg, step);
  void (*chunk)(const detail::AdamScalars&, const AdamBuffers&, int64_t, int64_t) =
      isa == Isa::kAVX512 ? detail::adam_chunk_avx512
      : isa == Isa::kAVX2 ? detail::adam_chunk_avx2
                          : detail::adam_chunk_scalar;
  pool_or_global(pool).parallel_for(buf.n, kMinChunk, kAlign,
                                    [&](int64_t b, int64_t e) { chunk(s, buf, b, e); });
}

void adam_step(const AdamConfig& cfg, int64_t step, const AdamBuffers& buf, ThreadPool* pool) {
  adam_step_isa(active_isa(), cfg, step, buf, pool);
}

bool all_finite_isa(Isa isa, const void* data, DType dtype, int64_t n, ThreadPool* pool) {
  LSPO_CHECK(n >= 0, "all_finite: negative element count ", n);
  LSPO_CHECK(n == 0 || data, "all_finite: null data pointer");
  LSPO_CHECK(dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16,
             "all_finite: unknown dtype ", static_cast<int>(dtype));
  check_isa(isa);
  if (n == 0) return true;
  bool (*chunk)(const void*, DType, int64_t, int64_t) =
      isa == Isa::kAVX512 ? detail::finite_chunk_avx512
      : isa == Isa::kAVX2 ? detail::finite_chunk_avx2
                          : detail::finite_chunk_scalar;
  std::atomic<bool> ok{true};
  pool_or_global(pool).parallel_for(n, 4 * kMinChunk, kAlign, [&](int64_t b, int64_t e) {
    if (!chunk(data, dtype, b, e)) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

bool all_finite(const void* data, DType dtype, int64_t n, ThreadPool* pool) {
  return all_finite_isa(active_isa(), data, dtype, n, pool);
}

}  // namespace lspo
