// src/projector_kernels.h -- internal, torch-free: the CUDA kernels and the cuSPARSE glue under
// the projector primitives of src/projector_cuda.h, plus the host-side builder of the column
// index those kernels read.
//
// Notation (as in src/projector_cuda.h): P is an n x d ELL matrix, idx int32 [n, r] (distinct
// columns in [0, d) per row), val fp32 [n, r]. Dense operands are row-major and contiguous.
// Everything accumulates in fp32. Every launch takes an explicit cudaStream_t and returns
// without synchronising.
//
// Determinism: every gather kernel computes each output element in one thread, summing its terms
// in a fixed order (ascending row of P for the column-index kernels, ascending ELL slot for the
// row kernels), independent of grid size and scheduling, so two runs are bitwise equal. There are
// no atomics.
#pragma once
#include <cstdint>
#include <vector>

#include "lspo/common.h"

#ifdef LSPO_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace lspo::detail {

// ------------------------------------------------------------------ column index (host build)
// The columns of P as lists ("CSC" of P == CSR of P^T), built once per projector on the host
// (the sparsity pattern never changes while the values are learned; values are read through
// `pos`, so a change of values needs no rebuild).
//   colptr [d + 1]        entries of column c are q in [colptr[c], colptr[c + 1])
//   rows   [nnz]          row j of entry q; ascending within a column
//   pos    [nnz]          ELL slot j * r + t of entry q  (value = val[pos[q]])
//   segptr [d, nchunks+1] first entry of column c whose row is >= s * chunk (s = 0..nchunks);
//                         segptr[c][0] = colptr[c], segptr[c][nchunks] = colptr[c + 1]
//   csr_col, csr_pos      P's rows with their columns in ascending order (what cuSPARSE's CSR
//                         wants); empty when every row of idx is already sorted
// Throws lspo::Error on an index outside [0, d), a repeated column in a row, or nnz >= 2^31.
struct ColumnIndexHost {
  int64_t n = 0, r = 0, d = 0, chunk = 0, nchunks = 0;
  std::vector<int32_t> colptr, rows, pos, segptr;
  bool rows_sorted = true;
  std::vector<int32_t> csr_col, csr_pos;
};
ColumnIndexHost build_column_index(const int32_t* idx, int64_t n, int64_t r, int64_t d, int64_t chunk);

// Rows of P staged per pass of the right-projection kernel (the chunk of ColumnIndexHost).
constexpr int64_t kRightProjectChunk = 1024;

#ifdef LSPO_WITH_CUDA
// ------------------------------------------------------------------ kernel parameter structs
struct EllView {  // P on the device
  const int32_t* idx = nullptr;  // [n, r]
  const float* val = nullptr;    // [n, r]
  int64_t n = 0, d = 0;
  int32_t r = 0;
};
struct ColumnIndexView {  // ColumnIndexHost on the device
  const int32_t* colptr = nullptr;
  const int32_t* rows = nullptr;
  const int32_t* pos = nullptr;
  const int32_t* segptr = nullptr;
  int32_t nchunks = 0;  // chunk is kRightProjectChunk
};

// out [k, d] = Y [k, n] P          (fp32 out; Y fp32 or bf16)
struct RightProjectParams {
  EllView P;
  ColumnIndexView cols;
  const void* y = nullptr;
  DType y_dtype = DType::kFloat32;
  int64_t k = 0;
  float* out = nullptr;
};
// out [d, k] = P^T Y [n, k]
struct LeftProjectParams {
  EllView P;
  ColumnIndexView cols;
  const void* y = nullptr;
  DType y_dtype = DType::kFloat32;
  int64_t k = 0;
  float* out = nullptr;
};
// out [n, k] = P D [d, k]
struct ExpandParams {
  EllView P;
  const void* dmat = nullptr;
  DType d_dtype = DType::kFloat32;
  int64_t k = 0;
  float* out = nullptr;
};
// W [n, k] += alpha * P T [d, k]   (W fp32 or bf16, read-modify-write in W's dtype)
struct ApplyRowsParams {
  EllView P;
  const float* t = nullptr;
  int64_t k = 0;
  void* w = nullptr;
  DType w_dtype = DType::kFloat32;
  float alpha = 1.f;
};

// W [m, n] += alpha * U [m, d] Q^T with Q an ELL over n (Q.n = n, Q.d = d); U fp32, W fp32 or bf16.
struct ApplyColsParams {
  EllView Q;
  const float* u = nullptr;
  int64_t m = 0;
  void* w = nullptr;
  DType w_dtype = DType::kFloat32;
  float alpha = 1.f;
};

void launch_right_project(const RightProjectParams& p, cudaStream_t stream);
void launch_apply_cols(const ApplyColsParams& p, cudaStream_t stream);
void launch_left_project(const LeftProjectParams& p, cudaStream_t stream);
void launch_expand(const ExpandParams& p, cudaStream_t stream);
void launch_apply_rows(const ApplyRowsParams& p, cudaStream_t stream);

// Host emulation of the launches above: the same kernel bodies (they are __host__ __device__)
// run serially on the host over the same grid and block shapes, the right projection phase by
// phase as its barriers order it; all pointers are host pointers. Grid y is capped at max_grid_y
// (<= 65535) so tests can exercise the grid-stride loops. For tests without a GPU: they check the
// kernels' indexing and arithmetic, not the CUDA launch, memory model or timing.
void emulate_right_project(const RightProjectParams& p, int64_t max_grid_y = 65535);
void emulate_left_project(const LeftProjectParams& p, int64_t max_grid_y = 65535);
void emulate_expand(const ExpandParams& p, int64_t max_grid_y = 65535);
void emulate_apply_rows(const ApplyRowsParams& p, int64_t max_grid_y = 65535);
void emulate_apply_cols(const ApplyColsParams& p, int64_t max_grid_y = 65535);

// dst[i] = src[perm[i]], i < count (values into the sorted layouts cuSPARSE reads).
void launch_permute_values(const float* src, const int32_t* perm, int64_t count, float* dst, cudaStream_t stream);
// w[i] = w[i] + alpha * src[i] in w's dtype (fp32 or bf16), i < count.
void launch_add_scaled(void* w, DType w_dtype, const float* src, int64_t count, float alpha, cudaStream_t stream);

// ------------------------------------------------------------------ cuSPARSE (cuda/projector_cusparse.cu)
// C = alpha * A B + beta * C with A a sorted fp32 CSR (a_rows x a_cols, 32-bit indices) and B, C
// dense fp32 with `cols` columns, both row-major (ld = row stride) or both column-major
// (ld = column stride). opA = opB = non-transpose, compute type fp32, CUSPARSE_SPMM_ALG_DEFAULT.
struct SpmmParams {
  int64_t a_rows = 0, a_cols = 0, nnz = 0;
  const int32_t* rowptr = nullptr;
  const int32_t* colind = nullptr;
  const float* val = nullptr;
  int64_t cols = 0;
  const float* b = nullptr;
  int64_t ldb = 0;
  float* c = nullptr;
  int64_t ldc = 0;
  bool row_major = true;
  float alpha = 1.f, beta = 0.f;
};
// Workspace bytes cusparseSpMM needs for these operands (uses the calling thread's cached handle
// for the current device, bound to `stream`).
size_t cusparse_spmm_workspace(const SpmmParams& p, cudaStream_t stream);
// Runs the product on `stream`; `workspace` holds at least cusparse_spmm_workspace() bytes.
void cusparse_spmm(const SpmmParams& p, void* workspace, cudaStream_t stream);
#endif  // LSPO_WITH_CUDA

}  // namespace lspo::detail
