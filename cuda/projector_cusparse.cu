// cuda/projector_cusparse.cu -- the cuSPARSE SpMM path of the projector primitives (torch-free host
// code). One cuSPARSE handle per (thread, device), created on first use, bound to the caller's
// stream on every call, destroyed when the thread exits. Declarations: src/projector_kernels.h.
#include <cuda_runtime.h>
#include <cusparse.h>

#include <utility>
#include <vector>

#include "../src/projector_kernels.h"
#include "lspo/cuda.h"

namespace lspo::detail {
namespace {

// Move-only owner of a cusparseHandle_t.
class CusparseHandle {
 public:
  CusparseHandle() = default;
  static CusparseHandle create() {
    CusparseHandle h;
    LSPO_CUSPARSE_CHECK(cusparseCreate(&h.h_));
    return h;
  }
  ~CusparseHandle() {
    if (h_) (void)cusparseDestroy(h_);  // status ignored: may run after the CUDA runtime unloads
  }
  CusparseHandle(CusparseHandle&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  CusparseHandle& operator=(CusparseHandle&& o) noexcept {
    if (this != &o) {
      if (h_) (void)cusparseDestroy(h_);
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  CusparseHandle(const CusparseHandle&) = delete;
  CusparseHandle& operator=(const CusparseHandle&) = delete;
  cusparseHandle_t get() const { return h_; }

 private:
  cusparseHandle_t h_ = nullptr;
};

// A handle is not safe to share between threads that set different streams, so each thread keeps
// one per device.
cusparseHandle_t handle_for(cudaStream_t stream) {
  thread_local std::vector<CusparseHandle> handles;
  int dev = 0;
  LSPO_CUDA_CHECK(cudaGetDevice(&dev));
  if (size_t(dev) >= handles.size()) handles.resize(size_t(dev) + 1);
  if (!handles[size_t(dev)].get()) handles[size_t(dev)] = CusparseHandle::create();
  cusparseHandle_t h = handles[size_t(dev)].get();
  LSPO_CUSPARSE_CHECK(cusparseSetStream(h, stream));
  return h;
}

// The three descriptors of one product, destroyed on scope exit.
struct SpmmDescriptors {
  cusparseConstSpMatDescr_t a = nullptr;
  cusparseConstDnMatDescr_t b = nullptr;
  cusparseDnMatDescr_t c = nullptr;

  explicit SpmmDescriptors(const SpmmParams& p) {
    try {
      const cusparseOrder_t order = p.row_major ? CUSPARSE_ORDER_ROW : CUSPARSE_ORDER_COL;
      LSPO_CUSPARSE_CHECK(cusparseCreateConstCsr(&a, p.a_rows, p.a_cols, p.nnz, p.rowptr, p.colind, p.val,
                                                 CUSPARSE_INDEX_32I, CUSPARSE_INDEX_32I, CUSPARSE_INDEX_BASE_ZERO,
                                                 CUDA_R_32F));
      LSPO_CUSPARSE_CHECK(cusparseCreateConstDnMat(&b, p.a_cols, p.cols, p.ldb, p.b, CUDA_R_32F, order));
      LSPO_CUSPARSE_CHECK(cusparseCreateDnMat(&c, p.a_rows, p.cols, p.ldc, p.c, CUDA_R_32F, order));
    } catch (...) {
      release();
      throw;
    }
  }
  ~SpmmDescriptors() { release(); }
  SpmmDescriptors(const SpmmDescriptors&) = delete;
  SpmmDescriptors& operator=(const SpmmDescriptors&) = delete;

 private:
  void release() noexcept {
    if (a) (void)cusparseDestroySpMat(a);
    if (b) (void)cusparseDestroyDnMat(b);
    if (c) (void)cusparseDestroyDnMat(c);
    a = nullptr;
    b = nullptr;
    c = nullptr;
  }
};

void check_params(const SpmmParams& p) {
  LSPO_CHECK(p.a_rows > 0 && p.a_cols > 0 && p.cols > 0, "cusparse_spmm: empty operands (", p.a_rows, " x ",
             p.a_cols, " times ", p.a_cols, " x ", p.cols, ") must be skipped by the caller");
  LSPO_CHECK(p.nnz >= 0 && p.nnz < (int64_t(1) << 31), "cusparse_spmm: nnz = ", p.nnz, " needs 32-bit indices");
  if (p.row_major) {
    LSPO_CHECK(p.ldb >= p.cols && p.ldc >= p.cols, "cusparse_spmm: row-major leading dimensions ", p.ldb, ", ",
               p.ldc, " < ", p.cols);
  } else {
    LSPO_CHECK(p.ldb >= p.a_cols && p.ldc >= p.a_rows, "cusparse_spmm: column-major leading dimensions too small");
  }
}

}  // namespace

size_t cusparse_spmm_workspace(const SpmmParams& p, cudaStream_t stream) {
  check_params(p);
  cusparseHandle_t h = handle_for(stream);
  SpmmDescriptors desc(p);
  size_t bytes = 0;
  LSPO_CUSPARSE_CHECK(cusparseSpMM_bufferSize(h, CUSPARSE_OPERATION_NON_TRANSPOSE, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                              &p.alpha, desc.a, desc.b, &p.beta, desc.c, CUDA_R_32F,
                                              CUSPARSE_SPMM_ALG_DEFAULT, &bytes));
  return bytes;
}

void cusparse_spmm(const SpmmParams& p, void* workspace, cudaStream_t stream) {
  check_params(p);
  cusparseHandle_t h = handle_for(stream);
  SpmmDescriptors desc(p);
  LSPO_CUSPARSE_CHECK(cusparseSpMM(h, CUSPARSE_OPERATION_NON_TRANSPOSE, CUSPARSE_OPERATION_NON_TRANSPOSE, &p.alpha,
                                   desc.a, desc.b, &p.beta, desc.c, CUDA_R_32F, CUSPARSE_SPMM_ALG_DEFAULT,
                                   workspace));
}

}  // namespace lspo::detail
