// Dispatch of the fused Adam step and of all_finite: picks the ISA path, splits the buffers over
// the persistent thread pool, and holds the scalar (no-SIMD) path. The SIMD paths live in
// cpu_adam_avx2.cpp and cpu_adam_avx512.cpp.
#include <algorithm>
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

// Work split: below kMinChunk elements per thread, waking a thread costs more than it saves.
// Above, the threads pull blocks of kBlock elements from a shared counter instead of taking one
// fixed share each, so a core slowed by another process (this machine is shared; a training job
// has its own threads) delays the step by at most one block. Block and chunk boundaries are
// multiples of 64 elements: whole 64-byte lines of fp32, vector-aligned for every ISA.
constexpr int64_t kMinChunk = 1 << 14;
constexpr int64_t kBlock = 1 << 16;
constexpr int64_t kAlign = 64;

ThreadPool& pool_or_global(ThreadPool* pool) { return pool ? *pool : ThreadPool::global(); }

template <class Fn>
void run_blocks(ThreadPool& tp, int64_t n, const Fn& fn) {
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  const int64_t workers = std::min<int64_t>(tp.num_threads(), std::max<int64_t>(1, n / kMinChunk));
  if (workers <= 1 || nblocks <= 1) {
    tp.parallel_for(n, kMinChunk, kAlign, fn);  // small: a static split (or one thread)
    return;
  }
  std::atomic<int64_t> next{0};
  tp.parallel_for(workers, 1, 1, [&](int64_t, int64_t) {
    for (int64_t blk; (blk = next.fetch_add(1, std::memory_order_relaxed)) < nblocks;)
      fn(blk * kBlock, std::min(n, (blk + 1) * kBlock));
  });
}

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
  run_blocks(pool_or_global(pool), buf.n, [&](int64_t b, int64_t e) { chunk(s, buf, b, e); });
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
  run_blocks(pool_or_global(pool), n, [&](int64_t b, int64_t e) {
    if (ok.load(std::memory_order_relaxed) && !chunk(data, dtype, b, e)) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

bool all_finite(const void* data, DType dtype, int64_t n, ThreadPool* pool) {
  return all_finite_isa(active_isa(), data, dtype, n, pool);
}

}  // namespace lspo
