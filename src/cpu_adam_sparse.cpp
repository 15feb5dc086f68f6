// Row-sparse (lazy) Adam (lspo/sparse_adam.h): argument checks, the reference, the threaded ISA
// dispatch and the row gather. Compiled with -ffp-contract=off like every cpu_adam*.cpp file; the
// element math is the dense kernel of each ISA (cpu_adam_kernels.h) applied row by row.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "cpu_adam_kernels.h"
#include "lspo/sparse_adam.h"
#include "lspo/thread_pool.h"

namespace lspo {
namespace {

constexpr int64_t kMinElemsPerChunk = 1 << 14;  // as the dense step: below this a thread costs more
constexpr int64_t kBlockElems = 1 << 16;
constexpr int64_t kRowPrefetchLines = 32;  // 2 KiB of each fp32 stream: the kernel's own prefetch starts 512 elements in

ThreadPool& pool_or_global(ThreadPool* pool) { return pool ? *pool : ThreadPool::global(); }

// The dense buffers of touched row j (row idx[j] of the state, row j of the compact gradient).
AdamBuffers row_buffers(const SparseAdamBuffers& b, const SparseRows& r, int64_t j) {
  const int64_t row = r.idx[j];
  const int64_t off = row * b.row_len;
  AdamBuffers d;
  d.param = b.param + off;
  d.exp_avg = b.exp_avg + off;
  d.exp_avg_sq = b.exp_avg_sq + off;
  d.grad = static_cast<const char*>(r.grad) + j * b.row_len * dtype_size(r.grad_dtype);
  d.grad_dtype = r.grad_dtype;
  d.param_out = b.param_out ? static_cast<char*>(b.param_out) + off * dtype_size(b.out_dtype) : nullptr;
  d.out_dtype = b.out_dtype;
  d.n = b.row_len;
  return d;
}

// The touched rows are scattered: the hardware prefetchers restart at each one. Touch the first
// lines of the next row's streams while the current row runs (the dense kernel prefetches within
// a row itself).
void prefetch_row_start(const SparseAdamBuffers& b, const SparseRows& r, int64_t j) {
  const int64_t off = r.idx[j] * b.row_len;
  const int64_t lines = std::min<int64_t>(kRowPrefetchLines, (b.row_len * 4 + 63) / 64);
  const char* g = static_cast<const char*>(r.grad) + j * b.row_len * dtype_size(r.grad_dtype);
  for (int64_t l = 0; l < lines; ++l) {
    __builtin_prefetch(reinterpret_cast<const char*>(b.param + off) + 64 * l, 1, 3);
    __builtin_prefetch(reinterpret_cast<const char*>(b.exp_avg + off) + 64 * l, 1, 3);
    __builtin_prefetch(reinterpret_cast<const char*>(b.exp_avg_sq + off) + 64 * l, 1, 3);
    __builtin_prefetch(g + 64 * l, 0, 3);
  }
}

}  // namespace

void check_sparse_adam_args(const AdamConfig& cfg, const SparseAdamBuffers& b, const SparseRows& r) {
  LSPO_CHECK(b.rows >= 0 && b.row_len >= 1, "sparse_adam: need rows >= 0 and row_len >= 1, got rows ", b.rows,
             ", row_len ", b.row_len);
  LSPO_CHECK(r.n >= 0 && r.n <= b.rows, "sparse_adam: ", r.n, " touched rows but the state has ", b.rows);
  AdamBuffers probe;  // hyper-parameters and dtypes through the dense step's checks
  probe.grad_dtype = r.grad_dtype;
  probe.out_dtype = b.out_dtype;
  check_adam_args(cfg, 1, probe);
  if (r.n == 0) return;
  LSPO_CHECK(b.param && b.exp_avg && b.exp_avg_sq && b.row_steps,
             "sparse_adam: param, exp_avg, exp_avg_sq and row_steps must be set");
  LSPO_CHECK(r.idx && r.grad, "sparse_adam: idx and grad must be set");
  for (int64_t j = 0; j < r.n; ++j) {
    const int64_t row = r.idx[j];
    LSPO_CHECK(row >= 0 && row < b.rows, "sparse_adam: idx[", j, "] = ", row, " is out of range [0, ", b.rows, ")");
    LSPO_CHECK(j == 0 || row > r.idx[j - 1], "sparse_adam: idx must be strictly increasing (no duplicates), but idx[",
               j - 1, "] = ", r.idx[j - 1], " and idx[", j, "] = ", row);
    LSPO_CHECK(b.row_steps[row] >= 0, "sparse_adam: row_steps[", row, "] = ", b.row_steps[row], " is negative");
  }
}

void sparse_adam_step_reference(const AdamConfig& cfg, const SparseAdamBuffers& b, const SparseRows& r) {
  check_sparse_adam_args(cfg, b, r);
  for (int64_t j = 0; j < r.n; ++j) {
    const int64_t step = ++b.row_steps[r.idx[j]];
    adam_step_reference(cfg, step, row_buffers(b, r, j));
  }
}

void sparse_adam_step_isa(Isa isa, const AdamConfig& cfg, const SparseAdamBuffers& b, const SparseRows& r,
                          ThreadPool* pool) {
  check_sparse_adam_args(cfg, b, r);
  adam_step_isa(isa, cfg, 1, AdamBuffers{}, pool);  // an empty dense step: throws if the CPU lacks `isa`
  if (r.n == 0) return;
  void (*chunk)(const detail::AdamScalars&, const AdamBuffers&, int64_t, int64_t) =
      isa == Isa::kAVX512 ? detail::adam_chunk_avx512
      : isa == Isa::kAVX2 ? detail::adam_chunk_avx2
                          : detail::adam_chunk_scalar;
  // Rows are pulled in blocks of about kBlockElems elements from a shared counter (as the dense
  // step does), so a core slowed by another process delays the step by one block at most.
  ThreadPool& tp = pool_or_global(pool);
  const int64_t rows_per_block = std::max<int64_t>(1, kBlockElems / b.row_len);
  const int64_t nblocks = (r.n + rows_per_block - 1) / rows_per_block;
  const int64_t workers =
      std::min<int64_t>({tp.num_threads(), nblocks, std::max<int64_t>(1, r.n * b.row_len / kMinElemsPerChunk)});
  std::atomic<int64_t> next{0};
  tp.parallel_for(workers, 1, 1, [&](int64_t, int64_t) {
    int64_t last_step = -1;
    detail::AdamScalars s;
    for (int64_t blk; (blk = next.fetch_add(1, std::memory_order_relaxed)) < nblocks;) {
      const int64_t end = std::min(r.n, (blk + 1) * rows_per_block);
      for (int64_t j = blk * rows_per_block; j < end; ++j) {
        if (j + 1 < r.n) prefetch_row_start(b, r, j + 1);
        const int64_t step = ++b.row_steps[r.idx[j]];
        if (step != last_step) {  // rows touched equally often share their scalars
          s = detail::adam_scalars(cfg, step);
          last_step = step;
        }
        chunk(s, row_buffers(b, r, j), 0, b.row_len);
      }
    }
  });
}

void sparse_adam_step(const AdamConfig& cfg, const SparseAdamBuffers& b, const SparseRows& r, ThreadPool* pool) {
  sparse_adam_step_isa(active_isa(), cfg, b, r, pool);
}

void gather_rows(const void* src, int64_t rows, int64_t row_bytes, const int64_t* idx, int64_t n, void* dst,
                 ThreadPool* pool) {
  LSPO_CHECK(rows >= 0 && row_bytes >= 0 && n >= 0, "gather_rows: negative size (rows ", rows, ", row_bytes ",
             row_bytes, ", n ", n, ")");
  if (n == 0 || row_bytes == 0) return;
  LSPO_CHECK(src && dst && idx, "gather_rows: null pointer");
  for (int64_t j = 0; j < n; ++j)
    LSPO_CHECK(idx[j] >= 0 && idx[j] < rows, "gather_rows: idx[", j, "] = ", idx[j], " is out of range [0, ", rows,
               ")");
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  LSPO_CHECK(d + n * row_bytes <= s || s + rows * row_bytes <= d, "gather_rows: dst overlaps src");
  const int64_t min_rows = std::max<int64_t>(1, (int64_t(1) << 16) / row_bytes);
  pool_or_global(pool).parallel_for(n, min_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) std::memcpy(d + j * row_bytes, s + idx[j] * row_bytes, row_bytes);
  });
}

}  // namespace lspo
