// lspo/sparse_adam.h -- row-sparse ("lazy") Adam / AdamW over a host matrix, and the row gather
// that feeds MEFT's sparse adapters (lspo.meft).
//
// The state is a matrix of `rows` rows of `row_len` fp32 elements (master, exp_avg, exp_avg_sq)
// plus one step count per row. A step touches only the rows listed in `idx` (strictly increasing,
// each < rows); their gradients arrive compacted, row j of `grad` belonging to row idx[j]. For each
// touched row r: row_steps[r] += 1, then exactly the fused Adam update of lspo/cpu_adam.h is
// applied to that row with step = row_steps[r] (so bias correction is exact per row: a lazy Adam).
// Rows not listed are not read or written: they stay bitwise unchanged, moments included (weight
// decay too is applied only to touched rows, as in every lazy Adam).
//
// The per-element math is the one copy in cpu_adam_kernels.h: each ISA path runs the dense kernel
// of that ISA on each touched row, so every path is bit-identical to sparse_adam_step_reference,
// which runs adam_step_reference row by row.
#pragma once
#include <cstdint>

#include "lspo/cpu_adam.h"

namespace lspo {

struct SparseAdamBuffers {
  float* param = nullptr;        // [rows, row_len] fp32 master, updated in place (required)
  float* exp_avg = nullptr;      // [rows, row_len] fp32
  float* exp_avg_sq = nullptr;   // [rows, row_len] fp32
  int64_t* row_steps = nullptr;  // [rows] Adam steps taken by each row so far; touched rows += 1
  void* param_out = nullptr;     // optional [rows, row_len] working copy (touched rows rewritten)
  DType out_dtype = DType::kBFloat16;
  int64_t rows = 0;
  int64_t row_len = 0;
};

struct SparseRows {
  const int64_t* idx = nullptr;  // [n] strictly increasing row indices
  const void* grad = nullptr;    // [n, row_len] in grad_dtype: row j is the gradient of row idx[j]
  DType grad_dtype = DType::kFloat32;
  int64_t n = 0;
};

// One lazy Adam step on the active ISA, touched rows split over `pool` (default: the global pool).
void sparse_adam_step(const AdamConfig& cfg, const SparseAdamBuffers& buf, const SparseRows& rows,
                      ThreadPool* pool = nullptr);
void sparse_adam_step_isa(Isa isa, const AdamConfig& cfg, const SparseAdamBuffers& buf, const SparseRows& rows,
                          ThreadPool* pool = nullptr);
// Plain reference: adam_step_reference on each touched row in turn, one thread.
void sparse_adam_step_reference(const AdamConfig& cfg, const SparseAdamBuffers& buf, const SparseRows& rows);
// Validates shapes, pointers, indices (in range, strictly increasing), step counts and the
// hyper-parameters; throws lspo::Error with a named message.
void check_sparse_adam_args(const AdamConfig& cfg, const SparseAdamBuffers& buf, const SparseRows& rows);

// dst[j, :] = src[idx[j], :] for j < n: rows of `row_bytes` bytes (the host side of MEFT's transfer:
// the selected rows of the working copy into a pinned staging buffer). idx entries must be in
// [0, rows); dst must not overlap src.
void gather_rows(const void* src, int64_t rows, int64_t row_bytes, const int64_t* idx, int64_t n, void* dst,
                 ThreadPool* pool = nullptr);

}  // namespace lspo
