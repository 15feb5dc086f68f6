// src/projector_svd.cpp -- the SVD basis of a projected side (ProjectorBasis::kSvd, lspo/projector.h):
// the leading singular directions of a layer's gradients, and a projector set from a dense basis.
#include <string>

#include <ATen/CPUGeneratorImpl.h>

#include "lspo/projector.h"

namespace lspo {

torch::Tensor top_singular_basis(const std::vector<GradSample>& samples, bool left, int64_t k) {
  LSPO_CHECK(!samples.empty(), "top_singular_basis: no samples");
  torch::NoGradGuard ng;
  // The samples as [size, other_i] fp64 blocks of A = [G_1 G_2 ...] (left) or [G_1^T G_2^T ...] (right).
  std::vector<torch::Tensor> blocks;
  int64_t size = -1, other = 0;
  for (size_t i = 0; i < samples.size(); ++i) {
    const GradSample& s = samples[i];
    torch::Tensor G = s.G.defined() ? s.G : s.X.t().to(torch::kFloat).mm(s.dY.to(torch::kFloat));
    LSPO_CHECK(G.dim() == 2, "top_singular_basis: sample ", i, " is not a 2-D gradient (sizes ", G.sizes(), ")");
    LSPO_CHECK(torch::isfinite(G).all().item<bool>(), "top_singular_basis: the gradients are not finite");
    G = left ? G.to(torch::kDouble) : G.to(torch::kDouble).t();
    LSPO_CHECK(size < 0 || G.size(0) == size, "top_singular_basis: sample ", i, " has ", G.size(0), " ",
               left ? "rows" : "columns", ", sample 0 has ", size);
    size = G.size(0);
    other += G.size(1);
    blocks.push_back(G);
  }
  LSPO_CHECK(k >= 1 && k <= size, "top_singular_basis: need 1 <= k <= ", size, " (k = ", k, ")");
  // U: orthonormal candidate directions, largest first, with their squared singular values s2
  torch::Tensor U, s2;
  if (size <= other) {
    // the side's Gram A A^T = sum_i G_i G_i^T (size x size); eigh: ascending, orthonormal eigenvectors
    torch::Tensor C;
    for (const auto& G : blocks) C = C.defined() ? C.addmm_(G, G.t()) : G.mm(G.t());
    auto eig = torch::linalg_eigh(C);
    s2 = std::get<0>(eig).flip({0});
    U = std::get<1>(eig).flip({1});
  } else {
    // a side longer than the rest: the thin SVD of A ([size, other], O(size other^2))
    torch::Tensor A = blocks.size() == 1 ? blocks[0] : torch::cat(blocks, 1);
    auto svd = torch::linalg_svd(A, false, c10::nullopt);
    U = std::get<0>(svd);
    s2 = std::get<1>(svd).square();
  }
  // Directions at the rounding level of fp32 gradients (s2 <= 1e-10 s2_max; fp32 rounding puts an
  // exactly rank-deficient gradient's null directions near 1e-14 s2_max) are not the gradient's:
  // eigh/SVD return them in an order and basis that the summation order's rounding decides. Past the
  // numerical rank the basis is therefore completed deterministically: QR of [U_rank, R] with R a
  // Gaussian fixed by (size, k), which moves continuously with U_rank (gradient accumulation in
  // another order gives the same basis up to rounding, lspo/refit.h).
  const double s2max = s2.numel() > 0 ? s2.max().item<double>() : 0.0;
  const int64_t rank = s2max > 0 ? (s2 > 1e-10 * s2max).sum().item<int64_t>() : 0;
  torch::Tensor B;
  if (rank >= k) {
    B = U.narrow(1, 0, k);
  } else {
    auto gen = at::detail::createCPUGenerator(static_cast<uint64_t>(size * 1000003 + k));
    torch::Tensor R = at::randn({size, k - rank}, gen, U.options().device(torch::kCPU)).to(U.device());
    B = std::get<0>(torch::linalg_qr(torch::cat({U.narrow(1, 0, rank), R}, 1)));
  }
  return B.to(torch::kFloat).contiguous();
}

void SparseProjector::assign_dense_(const torch::Tensor& B) {
  LSPO_CHECK(indices.defined() && values.defined(), "SparseProjector::assign_dense_: empty projector");
  LSPO_CHECK(B.dim() == 2 && B.size(0) == n() && B.size(1) == d, "SparseProjector::assign_dense_: basis must be [n, d] = [",
             n(), ", ", d, "], got sizes ", B.sizes());
  LSPO_CHECK(B.is_floating_point(), "SparseProjector::assign_dense_: basis must be floating point, got ", B.scalar_type());
  torch::NoGradGuard ng;
  if (shared_positions()) {
    values.copy_(B);
  } else {
    values.copy_(B.to(values.device(), torch::kFloat).gather(1, indices.to(torch::kLong)));
  }
  if (whitened()) whiten_();
}

}  // namespace lspo
