// src/projector_cpu.h -- internal: the CPU twins of the CUDA projector primitives (src/projector_cuda.h).
// Torch-free: raw pointers, sizes, row-major contiguous operands; fp32 accumulation; threaded over
// lspo::ThreadPool::global(). Callers (src/projector.cpp) check every argument first.
#pragma once
#include <cstdint>

#include "lspo/common.h"

namespace lspo::detail {

// An n x d ELL matrix: row t has r nonzeros values[t*r + s] at columns indices[t*r + s] in [0, d).
struct EllView {
  const int32_t* indices;
  const float* values;
  int64_t n, r, d;
};

// out [k, d] = Y [k, n] P.           Y fp32 or bf16. out is overwritten.
void cpu_right_project(const void* Y, DType y_dtype, int64_t k, const EllView& P, float* out);
// out [d, k] = P^T Y,  Y [n, k].     Y fp32 or bf16. out is overwritten.
void cpu_left_project(const EllView& P, const void* Y, DType y_dtype, int64_t k, float* out);
// out [n, k] = P D,  D [d, k] fp32.  out is overwritten.
void cpu_expand(const EllView& P, const float* D, int64_t k, float* out);
// W [n, k] (fp32 or bf16) += alpha * P T, T [d, k] fp32; per-row fp32 buffers only (no n x k temporary).
void cpu_apply_rows(void* W, DType w_dtype, const EllView& P, const float* T, int64_t k, float alpha);

}  // namespace lspo::detail
