// src/projector.cpp -- SparseProjector and the public projector operations (include/lspo/projector.h).
// Every operation is composed from four primitives -- Y P, P^T Y, P D and W += alpha P T -- that run
// on the CPU (src/projector_cpu.cpp) or on CUDA (src/projector_cuda.cpp), chosen by the inputs'
// device. All input checks of the public operations live in this file.
#include "lspo/projector.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <random>
#include <unordered_set>

#include <ATen/CPUGeneratorImpl.h>

#include "projector_cpu.h"
#include "projector_cuda.h"

namespace lspo {
namespace {

std::atomic<int> g_backend{static_cast<int>(ProjectorBackend::kAuto)};

std::string dtype_str(torch::ScalarType t) { return c10::toString(t); }

// Cheap structural checks of a projector (shapes, dtypes, device, contiguity, sizes); O(1).
void check_projector(const SparseProjector& P, const char* fn, const char* name) {
  LSPO_CHECK(P.indices.defined() && P.values.defined(), fn, ": projector '", name, "' is empty (undefined tensors)");
  LSPO_CHECK(P.indices.dim() == 2, fn, ": projector '", name, "': indices must be 2-D [n, r], got sizes ",
             P.indices.sizes());
  LSPO_CHECK(P.indices.scalar_type() == torch::kInt32, fn, ": projector '", name, "': indices must be int32, got ",
             dtype_str(P.indices.scalar_type()));
  LSPO_CHECK(P.values.scalar_type() == torch::kFloat32, fn, ": projector '", name, "': values must be float32, got ",
             dtype_str(P.values.scalar_type()));
  LSPO_CHECK(P.values.sizes() == P.indices.sizes(), fn, ": projector '", name, "': values sizes ", P.values.sizes(),
             " differ from indices sizes ", P.indices.sizes());
  LSPO_CHECK(P.values.device() == P.indices.device(), fn, ": projector '", name, "': values on ", P.values.device(),
             " but indices on ", P.indices.device());
  LSPO_CHECK((P.indices.is_contiguous() || P.shared_positions()) && P.values.is_contiguous(), fn, ": projector '",
             name, "': indices and values must be contiguous (indices may also be one row 0..d-1 expanded to [n, d])");
  const int64_t n = P.n(), r = P.r(), d = P.d;
  LSPO_CHECK(r >= 1, fn, ": projector '", name, "': r < 1 (r = ", r, ")");
  LSPO_CHECK(d >= 1, fn, ": projector '", name, "': d < 1 (d = ", d, ")");
  LSPO_CHECK(r <= d, fn, ": projector '", name, "': r > d (r = ", r, ", d = ", d, ")");
  LSPO_CHECK(d <= n, fn, ": projector '", name, "': d > n (d = ", d, ", n = ", n, ")");
  if (P.whiten.defined()) {
    LSPO_CHECK(P.whiten.dim() == 2 && P.whiten.size(0) == d && P.whiten.size(1) == d, fn, ": projector '", name,
               "': whiten must be [d, d] = [", d, ", ", d, "], got sizes ", P.whiten.sizes());
    LSPO_CHECK(P.whiten.scalar_type() == torch::kFloat32, fn, ": projector '", name, "': whiten must be float32, got ",
               dtype_str(P.whiten.scalar_type()));
    LSPO_CHECK(P.whiten.device() == P.indices.device(), fn, ": projector '", name, "': whiten on ",
               P.whiten.device(), " but indices on ", P.indices.device());
  }
}

// CPU kernels index memory with the indices: check their range (O(n r), cheap next to the kernels).
// Shared positions: the one row must be 0..d-1 in order (O(d)).
void check_index_range(const SparseProjector& P, const char* fn, const char* name) {
  if (!P.indices.is_cpu() || P.indices.numel() == 0) return;
  if (P.shared_positions()) {
    const int32_t* ix = P.indices.data_ptr<int32_t>();
    for (int64_t j = 0; j < P.d; ++j)
      LSPO_CHECK(ix[j] == j, fn, ": projector '", name, "': shared positions must be 0..d-1 in order (d = ", P.d,
                 "), position ", j, " is ", ix[j]);
    return;
  }
  const int32_t* ix = P.indices.data_ptr<int32_t>();
  const int64_t total = P.indices.numel();
  int32_t lo = ix[0], hi = ix[0];
  for (int64_t i = 1; i < total; ++i) {
    lo = std::min(lo, ix[i]);
    hi = std::max(hi, ix[i]);
  }
  LSPO_CHECK(lo >= 0 && hi < P.d, fn, ": projector '", name, "': indices out of range [0, d = ", P.d, "): min ", lo,
             ", max ", hi);
}

// A dense 2-D float operand: fp32 or bf16 (fp64/fp16 are converted to fp32), on `device`.
// Non-contiguous operands are copied (documented fallback).
torch::Tensor check_operand(const torch::Tensor& X, const char* fn, const char* name, torch::Device device) {
  LSPO_CHECK(X.defined(), fn, ": argument '", name, "' is an undefined tensor");
  LSPO_CHECK(X.dim() == 2, fn, ": argument '", name, "' must be 2-D, got sizes ", X.sizes());
  LSPO_CHECK(X.is_floating_point(), fn, ": argument '", name, "' must be a floating tensor, got ",
             dtype_str(X.scalar_type()));
  LSPO_CHECK(X.device() == device, fn, ": argument '", name, "' is on ", X.device(), " but the projector is on ",
             device);
  torch::Tensor Y = X;
  if (Y.scalar_type() != torch::kFloat32 && Y.scalar_type() != torch::kBFloat16) Y = Y.to(torch::kFloat32);
  return Y.contiguous();
}

detail::EllView view(const SparseProjector& P) {
  return {P.indices.data_ptr<int32_t>(), P.values.data_ptr<float>(), P.n(), P.r(), P.d};
}
DType lspo_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kBFloat16 ? DType::kBFloat16 : DType::kFloat32;
}
torch::TensorOptions f32(const torch::Tensor& like) { return like.options().dtype(torch::kFloat32); }

// ---- a dense projector (r = d: every row holds every column, LSPAdamW's basis="svd") goes through
// ATen's GEMMs (BLAS / cuBLAS) instead of the ELL kernels, which are built for r << d: left_project
// at 576 x 1536, r = d = 241, 106 ms with the ELL kernel, 10 ms this way (2 CPU threads;
// benchmarks/projector_dense.py measures it against the bare GEMM). From d = 16 on; below, the ELL kernels.
constexpr int64_t kDenseMinD = 16;
bool dense_layout(const SparseProjector& P) { return P.r() == P.d && (P.d >= kDenseMinD || P.shared_positions()); }
torch::Tensor raw_dense(const SparseProjector& P) {  // P [n, d] fp32, unwhitened (shared positions: the values)
  if (P.shared_positions()) return P.values;
  return torch::zeros({P.n(), P.d}, P.values.options()).scatter_(1, P.indices.to(torch::kLong), P.values);
}
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

// ---- the four primitives, dispatched on layout and device (inputs already checked)
torch::Tensor prim_right(const torch::Tensor& Y, const SparseProjector& P) {  // [k, n] -> [k, d]
  if (dense_layout(P)) {
    NoAutocast fp32(c10::autocast_dispatch_keyset);
    return Y.to(torch::kFloat32).mm(raw_dense(P));
  }
  if (Y.is_cuda()) return detail::cuda_right_project(Y, P, projector_backend());
  torch::Tensor out = torch::empty({Y.size(0), P.d}, f32(Y));
  detail::cpu_right_project(Y.data_ptr(), lspo_dtype(Y), Y.size(0), view(P), out.data_ptr<float>());
  return out;
}
torch::Tensor prim_left(const SparseProjector& P, const torch::Tensor& Y) {  // [n, k] -> [d, k]
  if (dense_layout(P)) {
    NoAutocast fp32(c10::autocast_dispatch_keyset);
    return raw_dense(P).t().mm(Y.to(torch::kFloat32));
  }
  if (Y.is_cuda()) return detail::cuda_left_project(P, Y, projector_backend());
  torch::Tensor out = torch::empty({P.d, Y.size(1)}, f32(Y));
  detail::cpu_left_project(view(P), Y.data_ptr(), lspo_dtype(Y), Y.size(1), out.data_ptr<float>());
  return out;
}
torch::Tensor prim_expand(const SparseProjector& P, const torch::Tensor& D) {  // [d, k] fp32 -> [n, k]
  if (dense_layout(P)) {
    NoAutocast fp32(c10::autocast_dispatch_keyset);
    return raw_dense(P).mm(D);
  }
  if (D.is_cuda()) return detail::cuda_expand(P, D, projector_backend());
  torch::Tensor out = torch::empty({P.n(), D.size(1)}, f32(D));
  detail::cpu_expand(view(P), D.data_ptr<float>(), D.size(1), out.data_ptr<float>());
  return out;
}
void prim_apply_rows(torch::Tensor& W, const SparseProjector& P, const torch::Tensor& T, double alpha) {
  if (dense_layout(P)) {  // W += alpha P T in blocks of rows: fp32 accumulation, one rounding to W's dtype,
    NoAutocast fp32(c10::autocast_dispatch_keyset);  // an fp32 temporary of at most 256 rows of W
    const torch::Tensor B = raw_dense(P);
    for (int64_t lo = 0; lo < W.size(0); lo += 256) {
      const int64_t len = std::min<int64_t>(256, W.size(0) - lo);
      torch::Tensor w = W.narrow(0, lo, len);
      if (W.scalar_type() == torch::kFloat32) {
        w.addmm_(B.narrow(0, lo, len), T, 1.0, alpha);
      } else {
        w.copy_(torch::addmm(w.to(torch::kFloat32), B.narrow(0, lo, len), T, 1.0, alpha));
      }
    }
    return;
  }
  if (W.is_cuda()) return detail::cuda_apply_rows_(W, P, T, alpha, projector_backend());
  detail::cpu_apply_rows(W.data_ptr(), lspo_dtype(W), view(P), T.data_ptr<float>(), T.size(1),
                         static_cast<float>(alpha));
}

// ---- whitening (U = P T): T^T Y for a [d, k] result of P^T, Y T for a [k, d] result of (.) P,
// and T D T_Q^T for an update D before it is expanded by P and Q.
// The d x d products stay fp32 under an enclosing autocast region (which would run them in bf16).
torch::Tensor wl(const SparseProjector& P, torch::Tensor Y) {
  NoAutocast fp32(c10::autocast_dispatch_keyset);
  return P.whitened() ? P.whiten.t().mm(Y) : Y;
}
torch::Tensor wr(torch::Tensor Y, const SparseProjector& P) {
  NoAutocast fp32(c10::autocast_dispatch_keyset);
  return P.whitened() ? Y.mm(P.whiten) : Y;
}
torch::Tensor unwhiten_delta(const SparseProjector& P, const SparseProjector& Q, torch::Tensor D) {
  NoAutocast fp32(c10::autocast_dispatch_keyset);
  if (P.whitened()) D = P.whiten.mm(D);
  if (Q.whitened()) D = D.mm(Q.whiten.t());
  return D.contiguous();
}

void check_pair(const SparseProjector& P, const SparseProjector& Q, const char* fn) {
  check_projector(P, fn, "P");
  check_projector(Q, fn, "Q");
  LSPO_CHECK(P.indices.device() == Q.indices.device(), fn, ": projectors P (", P.indices.device(), ") and Q (",
             Q.indices.device(), ") are on different devices");
  check_index_range(P, fn, "P");
  check_index_range(Q, fn, "Q");
}

}  // namespace

// ------------------------------------------------------------------ SparseProjector

namespace {
// Values of the init law for an n x d projector with r nonzeros a row: N(0, s^2) or +-s,
// s = sqrt(d / (n r)) so that E[P^T P] = I (each column holds n r / d nonzeros on average).
torch::Tensor init_values(int64_t n, int64_t d, int64_t r, uint64_t seed, ProjectorInit init) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed ^ 0x9E3779B97F4A7C15ull);
  const double scale = std::sqrt(static_cast<double>(d) / (static_cast<double>(n) * static_cast<double>(r)));
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  if (init == ProjectorInit::kGaussian) return at::normal(0.0, scale, {n, r}, gen, f32).contiguous();
  return ((at::randint(0, 2, {n, r}, gen, f32) * 2 - 1) * scale).contiguous();
}
}  // namespace

SparseProjector SparseProjector::random(int64_t n, int64_t d, int64_t r, uint64_t seed, torch::Device device,
                                        ProjectorInit init, bool whitened) {
  LSPO_CHECK(r >= 1, "SparseProjector::random: r < 1 (r = ", r, ")");
  LSPO_CHECK(r <= d, "SparseProjector::random: r > d (r = ", r, ", d = ", d, ")");
  LSPO_CHECK(d <= n, "SparseProjector::random: d > n (d = ", d, ", n = ", n, ")");
  torch::Tensor idx = torch::empty({n, r}, torch::kInt32);
  int32_t* ix = idx.data_ptr<int32_t>();
  std::mt19937_64 rng(seed);
  // cover[t mod d]: row t's first position, a random permutation of [0, d) repeated, so that every
  // column of P is used (n >= d) and P^T P has no empty row or column.
  std::vector<int32_t> cover(d);
  for (int64_t j = 0; j < d; ++j) cover[j] = static_cast<int32_t>(j);
  for (int64_t j = d - 1; j > 0; --j) std::swap(cover[j], cover[rng() % static_cast<uint64_t>(j + 1)]);
  std::vector<int32_t> perm;
  std::unordered_set<int32_t> seen;
  for (int64_t t = 0; t < n; ++t) {
    int32_t* row = ix + t * r;
    const int32_t first = cover[t % d];
    if (2 * r <= d) {  // rejection sampling: expected < 2 draws per entry
      seen.clear();
      seen.insert(first);
      row[0] = first;
      for (int64_t s = 1; s < r;) {
        const auto j = static_cast<int32_t>(rng() % static_cast<uint64_t>(d));
        if (seen.insert(j).second) row[s++] = j;
      }
    } else {  // partial Fisher-Yates with `first` fixed in front
      perm.resize(d);
      for (int64_t j = 0; j < d; ++j) perm[j] = static_cast<int32_t>(j);
      std::swap(perm[0], perm[first]);
      row[0] = first;
      for (int64_t s = 1; s < r; ++s) {
        const int64_t j = s + static_cast<int64_t>(rng() % static_cast<uint64_t>(d - s));
        std::swap(perm[s], perm[j]);
        row[s] = perm[s];
      }
    }
    std::sort(row, row + r);
  }
  SparseProjector P;
  P.indices = idx.to(device);
  P.values = init_values(n, d, r, seed, init).to(device);
  P.d = d;
  if (whitened) P.whiten_();
  return P;
}

namespace {
// dense_basis's positions: the row 0..d-1 expanded to [n, d] (storage: d int32)
torch::Tensor shared_indices(int64_t n, int64_t d, torch::Device device) {
  return torch::arange(d, torch::TensorOptions().dtype(torch::kInt32).device(device)).unsqueeze(0).expand({n, d});
}
torch::Tensor orthonormal_values(int64_t n, int64_t d, uint64_t seed) {  // [n, d] fp32, U^T U = I
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed ^ 0x5851F42D4C957F2Dull);
  const torch::Tensor A = at::normal(0.0, 1.0, {n, d}, gen, torch::TensorOptions().dtype(torch::kFloat64));
  return std::get<0>(torch::linalg_qr(A)).to(torch::kFloat32).contiguous();
}
}  // namespace

SparseProjector SparseProjector::dense_basis(int64_t n, int64_t d, uint64_t seed, torch::Device device) {
  LSPO_CHECK(d >= 1 && d <= n, "SparseProjector::dense_basis: need 1 <= d <= n (d = ", d, ", n = ", n, ")");
  SparseProjector P;
  P.indices = shared_indices(n, d, device);
  P.values = orthonormal_values(n, d, seed).to(device);
  P.d = d;
  return P;
}

bool SparseProjector::shared_positions() const {
  return indices.defined() && indices.dim() == 2 && indices.size(1) == d && indices.stride(0) == 0 &&
         indices.stride(1) == 1 && indices.size(0) > 1;
}

SparseProjector SparseProjector::identity(int64_t n, torch::Device device) {
  LSPO_CHECK(n >= 1, "SparseProjector::identity: n < 1 (n = ", n, ")");
  SparseProjector P;
  P.indices = torch::arange(n, torch::kInt32).view({n, 1}).to(device);
  P.values = torch::ones({n, 1}, torch::kFloat32).to(device);
  P.d = n;
  return P;
}

bool SparseProjector::is_identity() const {
  if (!indices.defined() || !values.defined() || whitened() || indices.dim() != 2 || r() != 1 || d != n()) return false;
  return torch::equal(indices.to(torch::kCPU).view({-1}).to(torch::kLong), torch::arange(n(), torch::kLong)) &&
         (values.to(torch::kCPU) == 1).all().item<bool>();
}

void SparseProjector::reinit_values_(uint64_t seed, ProjectorInit init) {
  check_projector(*this, "SparseProjector::reinit_values_", "self");
  if (shared_positions()) {
    values.copy_(orthonormal_values(n(), d, seed));
  } else {
    values.copy_(init_values(n(), d, r(), seed, init));
  }
  if (whitened()) whiten_();
}

void SparseProjector::whiten_() {
  torch::Tensor T = whitening_factor(*this);
  if (whiten.defined() && whiten.sizes() == T.sizes() && whiten.device() == T.device()) {
    whiten.copy_(T);  // in place: holders of the tensor (state dicts, Python) see the new factor
  } else {
    whiten = T;
  }
}

SparseProjector SparseProjector::clone() const {
  SparseProjector P;
  P.indices = indices;
  P.values = values.clone();
  if (whiten.defined()) P.whiten = whiten.clone();
  P.d = d;
  return P;
}

SparseProjector SparseProjector::view(torch::Tensor indices, torch::Tensor values, int64_t d, torch::Tensor whiten) {
  SparseProjector P;
  P.indices = std::move(indices);
  P.values = std::move(values);
  P.d = d;
  P.whiten = std::move(whiten);
  return P;
}

SparseProjector SparseProjector::from_tensors(torch::Tensor indices, torch::Tensor values, int64_t d) {
  SparseProjector P = view(std::move(indices), std::move(values), d);
  P.validate();
  return P;
}

void SparseProjector::validate() const {
  check_projector(*this, "SparseProjector", "self");
  // Range and distinct positions within each row (on the host; synchronises for CUDA projectors).
  torch::Tensor ix = indices.to(torch::kCPU).to(torch::kLong);
  if (ix.numel() == 0) return;
  const int64_t lo = ix.min().item<int64_t>(), hi = ix.max().item<int64_t>();
  LSPO_CHECK(lo >= 0 && hi < d, "SparseProjector: indices out of range [0, d = ", d, "): min ", lo, ", max ", hi);
  if (shared_positions())
    LSPO_CHECK(torch::equal(ix[0], torch::arange(d, torch::kLong)),
               "SparseProjector: shared positions must be the row 0..d-1 in order");
  torch::Tensor sorted = std::get<0>(ix.sort(1));
  if (r() > 1) {
    const bool dup = (sorted.narrow(1, 1, r() - 1) == sorted.narrow(1, 0, r() - 1)).any().item<bool>();
    LSPO_CHECK(!dup, "SparseProjector: duplicate column positions within a row of indices");
  }
  LSPO_CHECK(torch::isfinite(values).all().item<bool>(), "SparseProjector: values contain NaN or Inf");
  LSPO_CHECK(!whiten.defined() || torch::isfinite(whiten).all().item<bool>(),
             "SparseProjector: whiten contains NaN or Inf");
}

SparseProjector SparseProjector::to(torch::Device device) const {
  SparseProjector P;
  P.indices = shared_positions() ? shared_indices(n(), d, device) : indices.to(device);
  P.values = values.to(device);
  if (whiten.defined()) P.whiten = whiten.to(device);
  P.d = d;
  return P;
}

torch::Tensor SparseProjector::dense(torch::ScalarType dtype) const {
  check_projector(*this, "SparseProjector::dense", "self");
  return wr(raw_dense(*this), *this).to(dtype, /*non_blocking=*/false, /*copy=*/true);
}

void set_projector_backend(ProjectorBackend b) { g_backend.store(static_cast<int>(b)); }
ProjectorBackend projector_backend() { return static_cast<ProjectorBackend>(g_backend.load()); }

// ------------------------------------------------------------------ operations

torch::Tensor right_project(const torch::Tensor& X, const SparseProjector& P) {
  check_projector(P, "right_project", "P");
  check_index_range(P, "right_project", "P");
  torch::Tensor Y = check_operand(X, "right_project", "X", P.indices.device());
  LSPO_CHECK(Y.size(1) == P.n(), "right_project: X has ", Y.size(1), " columns but P has n = ", P.n(), " rows");
  return wr(prim_right(Y, P), P);
}

torch::Tensor left_project(const SparseProjector& P, const torch::Tensor& Y) {
  check_projector(P, "left_project", "P");
  check_index_range(P, "left_project", "P");
  torch::Tensor Z = check_operand(Y, "left_project", "Y", P.indices.device());
  LSPO_CHECK(Z.size(0) == P.n(), "left_project: Y has ", Z.size(0), " rows but P has n = ", P.n(), " rows");
  return wl(P, prim_left(P, Z));
}

torch::Tensor compress(const SparseProjector& P, const SparseProjector& Q, const torch::Tensor& G) {
  check_pair(P, Q, "compress");
  torch::Tensor g = check_operand(G, "compress", "G", P.indices.device());
  LSPO_CHECK(g.size(0) == P.n() && g.size(1) == Q.n(), "compress: G has sizes ", g.sizes(), " but P, Q need [",
             P.n(), ", ", Q.n(), "]");
  return wr(wl(P, prim_left(P, prim_right(g, Q))), Q);  // P^T (G Q): [m, dQ] intermediate
}

torch::Tensor project_input(const SparseProjector& P, const torch::Tensor& X) {
  check_projector(P, "project_input", "P");
  check_index_range(P, "project_input", "P");
  torch::Tensor x = check_operand(X, "project_input", "X", P.indices.device());
  LSPO_CHECK(x.size(1) == P.n(), "project_input: X has ", x.size(1), " features but P has n = ", P.n());
  return wr(prim_right(x, P), P).t().contiguous();  // (X P T)^T = T^T P^T X^T  [dP, tokens]
}

torch::Tensor project_grad_output(const SparseProjector& Q, const torch::Tensor& dY) {
  check_projector(Q, "project_grad_output", "Q");
  check_index_range(Q, "project_grad_output", "Q");
  torch::Tensor g = check_operand(dY, "project_grad_output", "dY", Q.indices.device());
  LSPO_CHECK(g.size(1) == Q.n(), "project_grad_output: dY has ", g.size(1), " features but Q has n = ", Q.n());
  return wr(prim_right(g, Q), Q);  // [tokens, dQ]
}

torch::Tensor compress_activations(const SparseProjector& P, const SparseProjector& Q, const torch::Tensor& X,
                                   const torch::Tensor& dY) {
  check_pair(P, Q, "compress_activations");
  torch::Tensor x = check_operand(X, "compress_activations", "X", P.indices.device());
  torch::Tensor g = check_operand(dY, "compress_activations", "dY", P.indices.device());
  LSPO_CHECK(x.size(0) == g.size(0), "compress_activations: X has ", x.size(0), " tokens but dY has ", g.size(0));
  LSPO_CHECK(x.size(1) == P.n(), "compress_activations: X has ", x.size(1), " features but P has n = ", P.n());
  LSPO_CHECK(g.size(1) == Q.n(), "compress_activations: dY has ", g.size(1), " features but Q has n = ", Q.n());
  // (X P)^T (dY Q): two sparse projections, then one dense [dP x tokens x dQ] GEMM (ATen/BLAS).
  NoAutocast fp32(c10::autocast_dispatch_keyset);
  return wr(wl(P, torch::mm(prim_right(x, P).t(), prim_right(g, Q))), Q);
}

namespace {
// Delta Q^T  [dP, n] fp32 = (Q Delta^T)^T
torch::Tensor delta_qt(const SparseProjector& Q, const torch::Tensor& delta) {
  return prim_expand(Q, delta.t().contiguous()).t().contiguous();
}
torch::Tensor check_delta(const SparseProjector& P, const SparseProjector& Q, const torch::Tensor& Delta,
                          const char* fn) {
  torch::Tensor D = check_operand(Delta, fn, "Delta", P.indices.device());
  LSPO_CHECK(D.size(0) == P.d && D.size(1) == Q.d, fn, ": Delta has sizes ", D.sizes(), " but P, Q need [", P.d,
             ", ", Q.d, "]");
  return D.to(torch::kFloat32);
}
}  // namespace

torch::Tensor decompress(const SparseProjector& P, const SparseProjector& Q, const torch::Tensor& Delta) {
  check_pair(P, Q, "decompress");
  torch::Tensor D = unwhiten_delta(P, Q, check_delta(P, Q, Delta, "decompress"));
  return prim_expand(P, delta_qt(Q, D));  // P (Delta Q^T)
}

void apply_(torch::Tensor& W, const SparseProjector& P, const SparseProjector& Q, const torch::Tensor& Delta,
            double alpha) {
  check_pair(P, Q, "apply_");
  LSPO_CHECK(W.defined(), "apply_: argument 'W' is an undefined tensor");
  LSPO_CHECK(W.dim() == 2, "apply_: argument 'W' must be 2-D, got sizes ", W.sizes());
  LSPO_CHECK(W.scalar_type() == torch::kFloat32 || W.scalar_type() == torch::kBFloat16,
             "apply_: argument 'W' must be float32 or bfloat16, got ", dtype_str(W.scalar_type()));
  LSPO_CHECK(W.device() == P.indices.device(), "apply_: argument 'W' is on ", W.device(),
             " but the projectors are on ", P.indices.device());
  LSPO_CHECK(W.is_contiguous(), "apply_: argument 'W' must be contiguous (updated in place)");
  LSPO_CHECK(W.size(0) == P.n() && W.size(1) == Q.n(), "apply_: W has sizes ", W.sizes(), " but P, Q need [",
             P.n(), ", ", Q.n(), "]");
  torch::Tensor D = unwhiten_delta(P, Q, check_delta(P, Q, Delta, "apply_"));
  torch::Tensor T = delta_qt(Q, D);  // [dP, n] fp32: d/m of W's size
  prim_apply_rows(W, P, T, alpha);
}

}  // namespace lspo
