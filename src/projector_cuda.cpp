// src/projector_cuda.cpp -- Torch edge of the CUDA projector primitives (src/projector_cuda.h):
// input checks with named messages, allocation, the current PyTorch stream, the per-projector
// column-index cache and the choice between the gather kernels and cuSPARSE. The kernels
// themselves (torch-free) are in cuda/projector_kernels.cu and cuda/projector_cusparse.cu.
#include "projector_cuda.h"

#include "projector_kernels.h"

#ifdef LSPO_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lspo/cuda.h"
#endif

namespace lspo::detail {

// ------------------------------------------------------------------ backend choice
// kAuto resolves per shape with the table below, first matching rule wins, default kGather.
// TO BE CALIBRATED by benchmarks/projector.py on a GPU: these kernels were written in a session
// without a GPU, so no rule routes to cuSPARSE yet. The gather kernels are the default because they
// are deterministic (the engine needs an overlapped schedule to be bitwise equal to the serial one)
// and do not convert bf16 inputs to fp32 copies. A calibrated rule looks like
//   {CudaPrimitive::kExpand, /*min_k=*/8192, /*min_rows_per_col=*/0, ProjectorBackend::kCuSparse}.
namespace {
struct AutoRule {
  CudaPrimitive op;
  int64_t min_k;            // k (tokens / columns of the dense operand) at least this
  int64_t min_rows_per_col; // n * r / d (average column length of P) at least this
  ProjectorBackend backend;
};
constexpr AutoRule kAutoRules[] = {
    // no calibrated rules yet (see above); a sentinel that can never match keeps the array non-empty
    {CudaPrimitive::kRightProject, INT64_MAX, INT64_MAX, ProjectorBackend::kGather},
};
}  // namespace

ProjectorBackend cuda_resolve_backend(CudaPrimitive op, int64_t n, int64_t d, int64_t r, int64_t k,
                                      ProjectorBackend requested) {
  if (requested != ProjectorBackend::kAuto) return requested;
  const int64_t per_col = d > 0 ? n * r / d : 0;
  for (const AutoRule& rule : kAutoRules) {
    if (rule.op == op && k >= rule.min_k && per_col >= rule.min_rows_per_col) return rule.backend;
  }
  return ProjectorBackend::kGather;
}

#ifndef LSPO_WITH_CUDA

bool projector_cuda_compiled() { return false; }
namespace {
[[noreturn]] void no_cuda() { throw Error("lspo was built without CUDA"); }
}  // namespace
torch::Tensor cuda_right_project(const torch::Tensor&, const SparseProjector&, ProjectorBackend) { no_cuda(); }
torch::Tensor cuda_left_project(const SparseProjector&, const torch::Tensor&, ProjectorBackend) { no_cuda(); }
torch::Tensor cuda_expand(const SparseProjector&, const torch::Tensor&, ProjectorBackend) { no_cuda(); }
void cuda_apply_rows_(torch::Tensor&, const SparseProjector&, const torch::Tensor&, double, ProjectorBackend) {
  no_cuda();
}
void cuda_apply_cols_(torch::Tensor&, const torch::Tensor&, const SparseProjector&, double, ProjectorBackend) {
  no_cuda();
}
void cuda_prepare_projector(const SparseProjector&) { no_cuda(); }
size_t projector_cuda_cache_entries() { return 0; }

#else  // LSPO_WITH_CUDA

bool projector_cuda_compiled() { return true; }

namespace {

// ------------------------------------------------------------------ device copy of the column index
// Raw cudaMalloc (not the caching allocator): the index is shared by every stream that uses the
// projector, and cudaFree waits for the device, so freeing it can never race a pending kernel.
class DeviceInts {
 public:
  DeviceInts() = default;
  DeviceInts(const std::vector<int32_t>& host, int device, cudaStream_t stream) : device_(device) {
    if (host.empty()) return;
    LSPO_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), host.size() * sizeof(int32_t)));
    const cudaError_t st =
        cudaMemcpyAsync(p_, host.data(), host.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream);
    if (st != cudaSuccess) release();
    LSPO_CUDA_CHECK(st);
  }
  ~DeviceInts() { release(); }
  DeviceInts(DeviceInts&& o) noexcept : p_(std::exchange(o.p_, nullptr)), device_(o.device_) {}
  DeviceInts& operator=(DeviceInts&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      device_ = o.device_;
    }
    return *this;
  }
  DeviceInts(const DeviceInts&) = delete;
  DeviceInts& operator=(const DeviceInts&) = delete;
  const int32_t* get() const { return p_; }

 private:
  void release() noexcept {
    if (!p_) return;
    int prev = device_;
    if (cudaGetDevice(&prev) == cudaSuccess && prev != device_) (void)cudaSetDevice(device_);
    (void)cudaFree(p_);  // errors ignored: may run at process exit
    if (prev != device_) (void)cudaSetDevice(prev);
    p_ = nullptr;
  }
  int32_t* p_ = nullptr;
  int device_ = 0;
};

struct GpuColumnIndex {
  int64_t n = 0, r = 0, d = 0, nchunks = 0;
  bool rows_sorted = true;
  DeviceInts colptr, rows, pos, segptr, csr_rowptr, csr_col, csr_pos;

  ColumnIndexView view() const {
    ColumnIndexView v;
    v.colptr = colptr.get();
    v.rows = rows.get();
    v.pos = pos.get();
    v.segptr = segptr.get();
    v.nchunks = int32_t(nchunks);
    return v;
  }
};

// Cache of column indices, keyed by the indices tensor's TensorImpl. A weak reference keeps the
// TensorImpl's address from being reused while the entry lives; the data pointer and the version
// counter catch a swapped storage or an in-place change of the indices (not tracked for inference
// tensors: do not modify a projector's indices in place under inference mode).
using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
struct CacheEntry {
  explicit CacheEntry(WeakImpl o) : owner(std::move(o)) {}
  WeakImpl owner;
  const void* data = nullptr;
  int64_t version = 0;
  int64_t d = 0;
  std::shared_ptr<const GpuColumnIndex> index;
};
struct IndexCache {
  std::mutex mu;
  std::unordered_map<const c10::TensorImpl*, CacheEntry> map;
};
IndexCache& cache() {
  static IndexCache* c = new IndexCache();  // never destroyed: no cudaFree after the runtime unloads
  return *c;
}

int64_t version_of(const torch::Tensor& t) { return t.is_inference() ? 0 : int64_t(t._version()); }

std::shared_ptr<const GpuColumnIndex> build_gpu_index(const SparseProjector& P, cudaStream_t stream) {
  const torch::Tensor host_idx = P.indices.to(torch::kCPU);  // synchronising copy (once per projector)
  const ColumnIndexHost h =
      build_column_index(host_idx.data_ptr<int32_t>(), P.indices.size(0), P.indices.size(1), P.d, kRightProjectChunk);
  const int dev = P.indices.device().index();
  auto g = std::make_shared<GpuColumnIndex>();
  g->n = h.n;
  g->r = h.r;
  g->d = h.d;
  g->nchunks = h.nchunks;
  g->rows_sorted = h.rows_sorted;
  std::vector<int32_t> rowptr(static_cast<size_t>(h.n + 1));
  for (int64_t j = 0; j <= h.n; ++j) rowptr[size_t(j)] = int32_t(j * h.r);
  g->colptr = DeviceInts(h.colptr, dev, stream);
  g->rows = DeviceInts(h.rows, dev, stream);
  g->pos = DeviceInts(h.pos, dev, stream);
  g->segptr = DeviceInts(h.segptr, dev, stream);
  g->csr_rowptr = DeviceInts(rowptr, dev, stream);
  g->csr_col = DeviceInts(h.csr_col, dev, stream);
  g->csr_pos = DeviceInts(h.csr_pos, dev, stream);
  LSPO_CUDA_CHECK(cudaStreamSynchronize(stream));  // the host vectors die with this scope
  return g;
}

std::shared_ptr<const GpuColumnIndex> column_index(const SparseProjector& P, cudaStream_t stream) {
  IndexCache& c = cache();
  const c10::TensorImpl* key = P.indices.unsafeGetTensorImpl();
  const void* data = P.indices.data_ptr();
  const int64_t version = version_of(P.indices);
  std::vector<std::shared_ptr<const GpuColumnIndex>> dropped;  // freed after the lock is released
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.map.find(key);
    if (it != c.map.end() && !it->second.owner.expired() && it->second.data == data &&
        it->second.version == version && it->second.d == P.d) {
      return it->second.index;
    }
  }
  std::shared_ptr<const GpuColumnIndex> built = build_gpu_index(P, stream);
  {
    std::lock_guard<std::mutex> lock(c.mu);
    for (auto it = c.map.begin(); it != c.map.end();) {
      if (it->second.owner.expired() || it->first == key) {
        dropped.push_back(std::move(it->second.index));
        it = c.map.erase(it);
      } else {
        ++it;
      }
    }
    CacheEntry e{WeakImpl(P.indices.getIntrusivePtr())};
    e.data = data;
    e.version = version;
    e.d = P.d;
    e.index = built;
    c.map.emplace(key, std::move(e));
  }
  return built;
}

// ------------------------------------------------------------------ checks
DType dtype_of(const torch::Tensor& t) {
  return t.scalar_type() == torch::kBFloat16 ? DType::kBFloat16 : DType::kFloat32;
}

void check_projector(const SparseProjector& P, const char* op) {
  LSPO_CHECK(P.indices.defined() && P.values.defined(), op, ": the projector's indices/values are undefined");
  LSPO_CHECK(P.indices.is_cuda(), op, ": projector indices must be a CUDA tensor (got ", P.indices.device(), ")");
  LSPO_CHECK(P.values.device() == P.indices.device(), op, ": projector values are on ", P.values.device(),
             ", indices on ", P.indices.device());
  LSPO_CHECK(P.indices.scalar_type() == torch::kInt32, op, ": projector indices must be int32 (got ",
             P.indices.scalar_type(), ")");
  LSPO_CHECK(P.values.scalar_type() == torch::kFloat32, op, ": projector values must be float32 (got ",
             P.values.scalar_type(), ")");
  LSPO_CHECK(P.indices.dim() == 2 && P.values.sizes() == P.indices.sizes(), op,
             ": projector indices and values must both be [n, r] (got ", P.indices.sizes(), " and ",
             P.values.sizes(), ")");
  LSPO_CHECK(P.indices.is_contiguous() && P.values.is_contiguous(), op, ": projector tensors must be contiguous");
  LSPO_CHECK(P.d >= 1, op, ": projector d must be >= 1 (got ", P.d, ")");
  LSPO_CHECK(P.indices.size(1) >= 1 && P.indices.size(1) <= P.d, op, ": projector r must be in [1, d = ", P.d,
             "] (got ", P.indices.size(1), ")");
}

// A dense 2-D operand: CUDA on the projector's device, contiguous, fp32 (or bf16 if allowed),
// with `rows` rows (and `cols` columns when cols >= 0).
void check_dense(const torch::Tensor& t, const char* op, const char* name, const torch::Device& dev, int64_t rows,
                 const char* rows_name, int64_t cols, bool allow_bf16) {
  LSPO_CHECK(t.defined(), op, ": ", name, " is undefined");
  LSPO_CHECK(t.is_cuda() && t.device() == dev, op, ": ", name, " must be a CUDA tensor on the projector's device ",
             dev, " (got ", t.device(), ")");
  const bool ok_type = t.scalar_type() == torch::kFloat32 || (allow_bf16 && t.scalar_type() == torch::kBFloat16);
  LSPO_CHECK(ok_type, op, ": ", name, " must be float32", allow_bf16 ? " or bfloat16" : "", " (got ",
             t.scalar_type(), ")");
  LSPO_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (got shape ", t.sizes(), ")");
  LSPO_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  LSPO_CHECK(t.size(0) == rows, op, ": ", name, " must have ", rows_name, " = ", rows, " rows (got shape ",
             t.sizes(), ")");
  LSPO_CHECK(cols < 0 || t.size(1) == cols, op, ": ", name, " must have ", cols, " columns (got shape ", t.sizes(),
             ")");
}

EllView ell_view(const SparseProjector& P) {
  EllView v;
  v.idx = P.indices.data_ptr<int32_t>();
  v.val = P.values.data_ptr<float>();
  v.n = P.indices.size(0);
  v.r = int32_t(P.indices.size(1));
  v.d = P.d;
  return v;
}

cudaStream_t current_stream(const torch::Device& dev) {
  return at::cuda::getCurrentCUDAStream(dev.index()).stream();
}

torch::Tensor as_float(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat32 ? t : t.to(torch::kFloat32);
}

// Values of P^T's CSR (the column index order) or of P's sorted CSR, on `stream`.
torch::Tensor permuted_values(const SparseProjector& P, const int32_t* perm, cudaStream_t stream) {
  torch::Tensor out = torch::empty({P.values.numel()}, P.values.options());
  launch_permute_values(P.values.data_ptr<float>(), perm, P.values.numel(), out.data_ptr<float>(), stream);
  return out;
}

void run_spmm(const SpmmParams& p, const torch::Device& dev, cudaStream_t stream) {
  const size_t bytes = cusparse_spmm_workspace(p, stream);
  torch::Tensor ws;
  if (bytes > 0) ws = torch::empty({int64_t(bytes)}, torch::TensorOptions().dtype(torch::kUInt8).device(dev));
  cusparse_spmm(p, bytes > 0 ? ws.data_ptr() : nullptr, stream);
}

// P (n x d) as a sorted CSR for cuSPARSE; `vals_keepalive` owns permuted values when needed.
SpmmParams csr_of_P(const SparseProjector& P, const GpuColumnIndex& g, torch::Tensor& vals_keepalive,
                    cudaStream_t stream) {
  SpmmParams s;
  s.a_rows = g.n;
  s.a_cols = g.d;
  s.nnz = g.n * g.r;
  s.rowptr = g.csr_rowptr.get();
  if (g.rows_sorted) {
    s.colind = P.indices.data_ptr<int32_t>();
    s.val = P.values.data_ptr<float>();
  } else {
    vals_keepalive = permuted_values(P, g.csr_pos.get(), stream);
    s.colind = g.csr_col.get();
    s.val = vals_keepalive.data_ptr<float>();
  }
  return s;
}

// P^T (d x n) as a sorted CSR (rows of P ascending within each column of P).
SpmmParams csr_of_PT(const SparseProjector& P, const GpuColumnIndex& g, torch::Tensor& vals_keepalive,
                     cudaStream_t stream) {
  SpmmParams s;
  s.a_rows = g.d;
  s.a_cols = g.n;
  s.nnz = g.n * g.r;
  s.rowptr = g.colptr.get();
  s.colind = g.rows.get();
  vals_keepalive = permuted_values(P, g.pos.get(), stream);
  s.val = vals_keepalive.data_ptr<float>();
  return s;
}

void check_disjoint(const torch::Tensor& a, const torch::Tensor& b, const char* op, const char* names) {
  if (a.numel() == 0 || b.numel() == 0) return;
  const auto* a0 = static_cast<const char*>(a.data_ptr());
  const auto* b0 = static_cast<const char*>(b.data_ptr());
  LSPO_CHECK(a0 + a.nbytes() <= b0 || b0 + b.nbytes() <= a0, op, ": ", names, " must not overlap in memory");
}

// Bound on the fp32 workspace of the chunked bf16 cuSPARSE apply.
constexpr int64_t kApplyWorkspaceBytes = int64_t(64) << 20;

}  // namespace

size_t projector_cuda_cache_entries() {
  IndexCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.map.size();
}

// ------------------------------------------------------------------ primitives
torch::Tensor cuda_right_project(const torch::Tensor& Y, const SparseProjector& P, ProjectorBackend b) {
  const char* op = "cuda_right_project";
  check_projector(P, op);
  const torch::Device dev = P.indices.device();
  const int64_t n = P.indices.size(0), r = P.indices.size(1), d = P.d;
  LSPO_CHECK(Y.defined() && Y.dim() == 2, op, ": Y must be a 2-D [k, n] tensor");
  const int64_t k = Y.size(0);
  check_dense(Y, op, "Y", dev, k, "k", n, true);
  c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = current_stream(dev);
  const auto g = column_index(P, stream);
  torch::Tensor out = torch::empty({k, d}, Y.options().dtype(torch::kFloat32));
  if (k == 0) return out;
  if (n == 0) return out.zero_();
  if (cuda_resolve_backend(CudaPrimitive::kRightProject, n, d, r, k, b) == ProjectorBackend::kCuSparse) {
    // out^T (d x k) = P^T (d x n) * Y^T (n x k), with Y^T and out^T read column-major.
    torch::Tensor vals, yf = as_float(Y);
    SpmmParams s = csr_of_PT(P, *g, vals, stream);
    s.cols = k;
    s.b = yf.data_ptr<float>();
    s.ldb = n;
    s.c = out.data_ptr<float>();
    s.ldc = d;
    s.row_major = false;
    run_spmm(s, dev, stream);
    return out;
  }
  RightProjectParams p;
  p.P = ell_view(P);
  p.cols = g->view();
  p.y = Y.data_ptr();
  p.y_dtype = dtype_of(Y);
  p.k = k;
  p.out = out.data_ptr<float>();
  launch_right_project(p, stream);
  return out;
}

torch::Tensor cuda_left_project(const SparseProjector& P, const torch::Tensor& Y, ProjectorBackend b) {
  const char* op = "cuda_left_project";
  check_projector(P, op);
  const torch::Device dev = P.indices.device();
  const int64_t n = P.indices.size(0), r = P.indices.size(1), d = P.d;
  check_dense(Y, op, "Y", dev, n, "n", -1, true);
  const int64_t k = Y.size(1);
  c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = current_stream(dev);
  const auto g = column_index(P, stream);
  torch::Tensor out = torch::empty({d, k}, Y.options().dtype(torch::kFloat32));
  if (k == 0) return out;
  if (n == 0) return out.zero_();
  if (cuda_resolve_backend(CudaPrimitive::kLeftProject, n, d, r, k, b) == ProjectorBackend::kCuSparse) {
    torch::Tensor vals, yf = as_float(Y);
    SpmmParams s = csr_of_PT(P, *g, vals, stream);
    s.cols = k;
    s.b = yf.data_ptr<float>();
    s.ldb = k;
    s.c = out.data_ptr<float>();
    s.ldc = k;
    s.row_major = true;
    run_spmm(s, dev, stream);
    return out;
  }
  LeftProjectParams p;
  p.P = ell_view(P);
  p.cols = g->view();
  p.y = Y.data_ptr();
  p.y_dtype = dtype_of(Y);
  p.k = k;
  p.out = out.data_ptr<float>();
  launch_left_project(p, stream);
  return out;
}

torch::Tensor cuda_expand(const SparseProjector& P, const torch::Tensor& D, ProjectorBackend b) {
  const char* op = "cuda_expand";
  check_projector(P, op);
  const torch::Device dev = P.indices.device();
  const int64_t n = P.indices.size(0), r = P.indices.size(1), d = P.d;
  check_dense(D, op, "D", dev, d, "d", -1, true);
  const int64_t k = D.size(1);
  c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = current_stream(dev);
  const auto g = column_index(P, stream);  // validates the indices (range, duplicates) once
  torch::Tensor out = torch::empty({n, k}, D.options().dtype(torch::kFloat32));
  if (k == 0 || n == 0) return out;
  if (cuda_resolve_backend(CudaPrimitive::kExpand, n, d, r, k, b) == ProjectorBackend::kCuSparse) {
    torch::Tensor vals, df = as_float(D);
    SpmmParams s = csr_of_P(P, *g, vals, stream);
    s.cols = k;
    s.b = df.data_ptr<float>();
    s.ldb = k;
    s.c = out.data_ptr<float>();
    s.ldc = k;
    s.row_major = true;
    run_spmm(s, dev, stream);
    return out;
  }
  ExpandParams p;
  p.P = ell_view(P);
  p.dmat = D.data_ptr();
  p.d_dtype = dtype_of(D);
  p.k = k;
  p.out = out.data_ptr<float>();
  launch_expand(p, stream);
  return out;
}

void cuda_apply_rows_(torch::Tensor& W, const SparseProjector& P, const torch::Tensor& T, double alpha,
                      ProjectorBackend b) {
  const char* op = "cuda_apply_rows_";
  check_projector(P, op);
  const torch::Device dev = P.indices.device();
  const int64_t n = P.indices.size(0), r = P.indices.size(1), d = P.d;
  check_dense(W, op, "W", dev, n, "n", -1, true);
  const int64_t k = W.size(1);
  check_dense(T, op, "T", dev, d, "d", k, false);
  check_disjoint(W, T, op, "W and T");
  c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = current_stream(dev);
  const auto g = column_index(P, stream);
  if (k == 0 || n == 0) return;
  if (cuda_resolve_backend(CudaPrimitive::kApplyRows, n, d, r, k, b) == ProjectorBackend::kCuSparse) {
    torch::Tensor vals;
    SpmmParams s = csr_of_P(P, *g, vals, stream);
    s.cols = k;
    s.b = T.data_ptr<float>();
    s.ldb = k;
    s.ldc = k;
    s.row_major = true;
    if (W.scalar_type() == torch::kFloat32) {  // in place: W = alpha P T + 1 * W
      s.c = W.data_ptr<float>();
      s.alpha = float(alpha);
      s.beta = 1.f;
      run_spmm(s, dev, stream);
      return;
    }
    // bf16 W: P T row chunk by row chunk into a bounded fp32 workspace, then W += alpha * chunk.
    // Chunks are a multiple of 4 rows so that every sub-array starts 16-byte aligned.
    int64_t rows = std::max<int64_t>(1, kApplyWorkspaceBytes / (k * int64_t(sizeof(float))));
    if (rows >= 4) rows -= rows % 4;
    rows = std::min(rows, n);
    torch::Tensor ws = torch::empty({rows, k}, T.options());
    const int32_t* col0 = s.colind;
    const float* val0 = s.val;
    for (int64_t j0 = 0; j0 < n; j0 += rows) {
      const int64_t len = std::min(rows, n - j0);
      SpmmParams c = s;
      c.a_rows = len;
      c.nnz = len * r;
      c.colind = col0 + j0 * r;  // the row pointer 0, r, 2r, ... serves every chunk
      c.val = val0 + j0 * r;
      c.c = ws.data_ptr<float>();
      c.alpha = 1.f;
      c.beta = 0.f;
      run_spmm(c, dev, stream);
      launch_add_scaled(static_cast<char*>(W.data_ptr()) + j0 * k * W.element_size(), DType::kBFloat16,
                        ws.data_ptr<float>(), len * k, float(alpha), stream);
    }
    return;
  }
  ApplyRowsParams p;
  p.P = ell_view(P);
  p.t = T.data_ptr<float>();
  p.k = k;
  p.w = W.data_ptr();
  p.w_dtype = dtype_of(W);
  p.alpha = float(alpha);
  launch_apply_rows(p, stream);
}

void cuda_apply_cols_(torch::Tensor& W, const torch::Tensor& U, const SparseProjector& Q, double alpha,
                      ProjectorBackend b) {
  const char* op = "cuda_apply_cols_";
  check_projector(Q, op);
  const torch::Device dev = Q.indices.device();
  const int64_t n = Q.indices.size(0), r = Q.indices.size(1), d = Q.d;
  LSPO_CHECK(W.defined() && W.dim() == 2, op, ": W must be a 2-D [m, n] tensor");
  const int64_t m = W.size(0);
  check_dense(W, op, "W", dev, m, "m", n, true);
  check_dense(U, op, "U", dev, m, "m", d, false);
  check_disjoint(W, U, op, "W and U");
  c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = current_stream(dev);
  const auto g = column_index(Q, stream);
  if (m == 0 || n == 0) return;
  if (cuda_resolve_backend(CudaPrimitive::kApplyCols, n, d, r, m, b) == ProjectorBackend::kCuSparse) {
    // W^T (n x m, column-major = W row-major) += alpha * Q (n x d) * U^T (d x m, column-major = U).
    torch::Tensor vals;
    SpmmParams s = csr_of_P(Q, *g, vals, stream);
    s.ldb = d;
    s.ldc = n;
    s.row_major = false;
    if (W.scalar_type() == torch::kFloat32) {
      s.cols = m;
      s.b = U.data_ptr<float>();
      s.c = W.data_ptr<float>();
      s.alpha = float(alpha);
      s.beta = 1.f;
      run_spmm(s, dev, stream);
      return;
    }
    // bf16 W: chunks of W's rows (= columns of W^T) through a bounded fp32 workspace.
    int64_t rows = std::max<int64_t>(1, kApplyWorkspaceBytes / (n * int64_t(sizeof(float))));
    if (rows >= 4) rows -= rows % 4;
    rows = std::min(rows, m);
    torch::Tensor ws = torch::empty({rows, n}, U.options());
    for (int64_t j0 = 0; j0 < m; j0 += rows) {
      const int64_t len = std::min(rows, m - j0);
      SpmmParams c = s;
      c.cols = len;
      c.b = U.data_ptr<float>() + j0 * d;
      c.c = ws.data_ptr<float>();
      c.alpha = 1.f;
      c.beta = 0.f;
      run_spmm(c, dev, stream);
      launch_add_scaled(static_cast<char*>(W.data_ptr()) + j0 * n * W.element_size(), DType::kBFloat16,
                        ws.data_ptr<float>(), len * n, float(alpha), stream);
    }
    return;
  }
  ApplyColsParams p;
  p.Q = ell_view(Q);
  p.u = U.data_ptr<float>();
  p.m = m;
  p.w = W.data_ptr();
  p.w_dtype = dtype_of(W);
  p.alpha = float(alpha);
  launch_apply_cols(p, stream);
}

void cuda_prepare_projector(const SparseProjector& P) {
  check_projector(P, "cuda_prepare_projector");
  const torch::Device dev = P.indices.device();
  c10::cuda::CUDAGuard guard(dev);
  (void)column_index(P, current_stream(dev));
}

#endif  // LSPO_WITH_CUDA

}  // namespace lspo::detail
