// The SVD basis (ProjectorBasis::kSvd, lspo/projector.h, lspo/refit.h) against fp64 references:
// top_singular_basis spans the leading singular subspace (stacked samples, activation pairs, both
// sides), assign_dense_ restricts a basis to the positions, and refit with the SVD basis keeps the
// singular subspace, runs no iterations and carries the moments by carry_state's formula.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "lspo/common.h"
#include "lspo/projector.h"
#include "lspo/refit.h"

namespace {

using lspo::GradSample;
using lspo::SparseProjector;
using torch::Tensor;

const auto f64 = torch::kFloat64;

// || B B^T - R R^T ||_F for two bases of the same k-dimensional subspace (rotation and sign free).
double subspace_gap(const Tensor& B, const Tensor& R) {
  const Tensor b = B.to(f64), r = R.to(f64);
  return (b.mm(b.t()) - r.mm(r.t())).norm().item<double>();
}

// A gradient with a clear spectral gap after the k-th singular value: singular values 10..(10-k+1)
// for the first k directions and at most 0.1 after, so that the top-k subspace is well determined
// (its fp64 reference and our fp64-Gram result agree to ~1e-12 / gap; fp32 output: ~1e-6).
Tensor gapped(int64_t m, int64_t n, int64_t k, uint64_t seed) {
  torch::manual_seed(seed);
  const int64_t q = std::min(m, n);
  const Tensor U = std::get<0>(torch::linalg_qr(torch::randn({m, q}, f64)));
  const Tensor V = std::get<0>(torch::linalg_qr(torch::randn({n, q}, f64)));
  Tensor s = 0.1 * torch::rand({q}, f64);
  for (int64_t i = 0; i < k; ++i) s[i] = 10.0 - static_cast<double>(i);
  return U.mul(s).mm(V.t()).to(torch::kFloat32);
}

struct SvdCase {
  int64_t m, n, k;
};

class TopSingular : public ::testing::TestWithParam<SvdCase> {};

TEST_P(TopSingular, SpansTheLeadingSingularSubspace) {
  const SvdCase c = GetParam();
  const Tensor G = gapped(c.m, c.n, c.k, 7 + c.m);
  auto svd = torch::linalg_svd(G.to(f64), false, c10::nullopt);
  const Tensor Uref = std::get<0>(svd).narrow(1, 0, c.k), Vref = std::get<2>(svd).narrow(0, 0, c.k).t();
  for (bool left : {true, false}) {
    const Tensor B = lspo::top_singular_basis({GradSample::dense(G)}, left, c.k);
    const int64_t size = left ? c.m : c.n;
    ASSERT_EQ(B.sizes(), (std::vector<int64_t>{size, c.k}));
    ASSERT_EQ(B.scalar_type(), torch::kFloat32);
    EXPECT_LT((B.to(f64).t().mm(B.to(f64)) - torch::eye(c.k, f64)).abs().max().item<double>(), 1e-6);  // fp32 ulps
    EXPECT_LT(subspace_gap(B, left ? Uref : Vref), 1e-5) << (left ? "left" : "right");
    // largest first: each column's singular value (|G^T b| or |G b|) decreases
    const Tensor sv = (left ? G.to(f64).t().mm(B.to(f64)) : G.to(f64).mm(B.to(f64))).norm(2, {0});
    for (int64_t i = 0; i + 1 < c.k; ++i) EXPECT_GT(sv[i].item<double>(), sv[i + 1].item<double>() + 0.5);
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, TopSingular,
                         ::testing::Values(SvdCase{1, 1, 1}, SvdCase{7, 5, 3}, SvdCase{40, 26, 8}, SvdCase{33, 97, 5},
                                           SvdCase{4097, 9, 4}),
                         [](const ::testing::TestParamInfo<SvdCase>& i) {
                           return "m" + std::to_string(i.param.m) + "n" + std::to_string(i.param.n) + "k" +
                                  std::to_string(i.param.k);
                         });

TEST(TopSingularBasis, StackedSamplesAndActivationPairs) {
  torch::manual_seed(1);
  const Tensor X1 = torch::randn({12, 30}), dY1 = torch::randn({12, 20}), X2 = torch::randn({9, 30}),
               dY2 = torch::randn({9, 20});
  const Tensor G1 = X1.t().mm(dY1), G2 = X2.t().mm(dY2);
  for (bool left : {true, false}) {
    // stacked along the other side: [G1 G2] (left) or [G1; G2] (right)
    const Tensor stack = left ? torch::cat({G1, G2}, 1) : torch::cat({G1, G2}, 0);
    auto svd = torch::linalg_svd(stack.to(f64), false, c10::nullopt);
    const Tensor ref = left ? std::get<0>(svd).narrow(1, 0, 4) : std::get<2>(svd).narrow(0, 0, 4).t();
    const Tensor dense = lspo::top_singular_basis({GradSample::dense(G1), GradSample::dense(G2)}, left, 4);
    const Tensor pairs =
        lspo::top_singular_basis({GradSample::activations(X1, dY1), GradSample::activations(X2, dY2)}, left, 4);
    // random spectra: gaps of order 1 against fp32 inputs (~1e-6 relative): the subspaces agree to 1e-4
    EXPECT_LT(subspace_gap(dense, ref), 1e-4) << left;
    EXPECT_LT(subspace_gap(pairs, ref), 1e-4) << left;
  }
}

// Past the numerical rank the completion is deterministic and continuous: the same rank-deficient
// gradient summed in another fp32 order (what gradient accumulation in other micro-batches does) gives
// the same k-dimensional basis up to rounding, on both branches (Gram + eigh, and thin SVD).
TEST(TopSingularBasis, RankDeficientSumsInAnotherOrderGiveTheSameBasis) {
  torch::manual_seed(8);
  for (const auto& shape : {std::vector<int64_t>{24, 40}, std::vector<int64_t>{40, 6}}) {
    const int64_t m = shape[0], n = shape[1];
    std::vector<Tensor> parts;  // 3 rank-2 parts: the sum has rank 6 (24 x 40) or 6 = n (40 x 6)
    for (int i = 0; i < 3; ++i) parts.push_back(torch::randn({m, 2}).mm(torch::randn({2, n})));
    const Tensor g1 = (parts[0] + parts[1]) + parts[2], g2 = parts[0] + (parts[2] + parts[1]);
    for (bool left : {true, false}) {
      const int64_t size = left ? m : n, k = std::min<int64_t>(size, 10);
      const Tensor B1 = lspo::top_singular_basis({GradSample::dense(g1)}, left, k);
      const Tensor B2 = lspo::top_singular_basis({GradSample::dense(g2)}, left, k);
      EXPECT_LT(subspace_gap(B1, B2), 1e-4) << m << "x" << n << (left ? " left" : " right");
      EXPECT_LT((B1.to(f64).t().mm(B1.to(f64)) - torch::eye(k, f64)).abs().max().item<double>(), 1e-6);
    }
  }
}

TEST(TopSingularBasis, RankBelowKPadsOrthonormallyAndBadInputIsNamed) {
  const Tensor G = torch::randn({10, 1}).mm(torch::randn({1, 6}));  // rank 1
  const Tensor B = lspo::top_singular_basis({GradSample::dense(G)}, true, 4);
  EXPECT_LT((B.to(f64).t().mm(B.to(f64)) - torch::eye(4, f64)).abs().max().item<double>(), 1e-6);
  const Tensor u = G.to(f64).narrow(1, 0, 1) / G.to(f64).narrow(1, 0, 1).norm();
  EXPECT_NEAR(std::abs(B.to(f64).narrow(1, 0, 1).t().mm(u).item<double>()), 1.0, 1e-6);  // the leading one first
  auto expect_error = [](auto fn, const std::string& what) {
    try {
      fn();
      ADD_FAILURE() << "no error, expected: " << what;
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  // a side longer than the rest with k past the other side's size: thin SVD + orthonormal completion
  const Tensor T = torch::randn({20, 3});
  const Tensor C = lspo::top_singular_basis({GradSample::dense(T)}, true, 5);
  EXPECT_LT((C.to(f64).t().mm(C.to(f64)) - torch::eye(5, f64)).abs().max().item<double>(), 1e-6);
  const Tensor U3 = std::get<0>(torch::linalg_svd(T.to(f64), false, c10::nullopt));
  EXPECT_LT(subspace_gap(C.narrow(1, 0, 3), U3), 1e-5);  // the gradient's own directions first
  expect_error([&] { lspo::top_singular_basis({GradSample::dense(G)}, true, 11); }, "1 <= k <= 10");
  expect_error([&] { lspo::top_singular_basis({}, true, 1); }, "no samples");
  Tensor bad = G.clone();
  bad[0][0] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { lspo::top_singular_basis({GradSample::dense(bad)}, true, 2); }, "not finite");
  expect_error([&] { lspo::top_singular_basis({GradSample::dense(G), GradSample::dense(torch::randn({9, 6}))}, true, 2); },
               "has 9 rows");
}

TEST(AssignDense, DenseProjectorBecomesTheBasisAndSparseOneItsRestriction) {
  torch::manual_seed(2);
  const Tensor B = std::get<0>(torch::linalg_qr(torch::randn({50, 20})));
  auto P = SparseProjector::random(50, 20, 20, 3, torch::kCPU, lspo::ProjectorInit::kGaussian, true);  // dense
  P.assign_dense_(B);
  // orthonormal B: the whitening factor is ~I and U = P T = B up to fp32 rounding of the Gram
  EXPECT_LT((P.dense(f64) - B.to(f64)).abs().max().item<double>(), 1e-5);
  auto S = SparseProjector::random(50, 20, 3, 4);  // r = 3: B restricted to the positions
  S.assign_dense_(B);
  const Tensor mask = torch::zeros({50, 20}).scatter_(1, S.indices.to(torch::kLong), 1.0);
  EXPECT_TRUE(torch::equal(S.dense(), B * mask));
  EXPECT_THROW(P.assign_dense_(torch::randn({50, 19})), std::exception);
  auto D = SparseProjector::dense_basis(50, 20, 6);  // shared positions: the values become B
  D.assign_dense_(B);
  EXPECT_TRUE(torch::equal(D.values, B) && D.shared_positions());
}

TEST(RefitSvd, KeepsTheSingularSubspaceWithoutIterationsAndCarriesMoments) {
  const int64_t m = 40, n = 26, k = 6;
  const Tensor G = gapped(m, n, k, 11), H = G + 0.01 * torch::randn({m, n});
  auto P = SparseProjector::identity(m);  // rows kept whole, columns projected (one-sided layout)
  auto Q = SparseProjector::dense_basis(n, k, 5);  // LSPAdamW(basis="svd")'s layout: shared positions
  const SparseProjector P0 = P.clone(), Q0 = Q.clone();
  Tensor M = torch::randn({m, k}), V = torch::rand({m, k});
  const Tensor M0 = M.clone(), V0 = V.clone();
  lspo::RefitOptions o;
  o.basis = lspo::ProjectorBasis::kSvd;
  const auto res = lspo::refit(P, Q, {GradSample::dense(G)}, {GradSample::dense(H)}, o, &M, &V);
  EXPECT_TRUE(res.fitted && res.kept);
  EXPECT_EQ(res.iters, 0);
  EXPECT_FALSE(res.reinit);
  EXPECT_TRUE(P.is_identity());
  EXPECT_TRUE(Q.shared_positions() && !Q.whitened());
  auto svd = torch::linalg_svd(G.to(f64), false, c10::nullopt);
  EXPECT_LT(subspace_gap(Q.dense(f64), std::get<2>(svd).narrow(0, 0, k).t()), 1e-5);
  // in-sample error: sqrt(1 - sum of the top-k sigma^2 / sum of all)
  const Tensor s2 = std::get<1>(svd).pow(2);
  EXPECT_NEAR(res.fit_after, std::sqrt(1.0 - (s2.narrow(0, 0, k).sum() / s2.sum()).item<double>()), 1e-4);
  EXPECT_LT(res.heldout_after, 0.02);
  EXPECT_LT(res.heldout_after, res.heldout_before);
  // moments carried by carry_state's dense formula: M B, V (B * B), B = U_old^T U_new
  const Tensor Bm = Q0.dense(f64).t().mm(Q.dense(f64));
  EXPECT_TRUE(torch::allclose(M.to(f64), M0.to(f64).mm(Bm), 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(V.to(f64), V0.to(f64).mm(Bm * Bm), 1e-5, 1e-5));
  // a second check on the same gradients finds nothing to gain: drift rule, nothing kept
  lspo::RefitOptions o2 = o;
  o2.reference_error = res.reference_error;
  const auto again = lspo::refit(P, Q, {GradSample::dense(G)}, {GradSample::dense(H)}, o2, &M, &V);
  EXPECT_FALSE(again.fitted || again.kept);
}

TEST(RefitSvd, TwoSidedDensePairAndParse) {
  const Tensor G = gapped(30, 22, 5, 13);
  auto P = SparseProjector::random(30, 5, 5, 1, torch::kCPU, lspo::ProjectorInit::kGaussian, true);
  auto Q = SparseProjector::random(22, 5, 5, 2, torch::kCPU, lspo::ProjectorInit::kGaussian, true);
  lspo::RefitOptions o;
  o.basis = lspo::ProjectorBasis::kSvd;
  const auto res = lspo::refit(P, Q, {GradSample::dense(G)}, {}, o);
  EXPECT_TRUE(res.kept);
  auto svd = torch::linalg_svd(G.to(f64), false, c10::nullopt);
  EXPECT_LT(subspace_gap(P.dense(f64), std::get<0>(svd).narrow(1, 0, 5)), 1e-5);
  EXPECT_LT(subspace_gap(Q.dense(f64), std::get<2>(svd).narrow(0, 0, 5).t()), 1e-5);
  EXPECT_EQ(lspo::parse_basis("svd", "t"), lspo::ProjectorBasis::kSvd);
  EXPECT_EQ(lspo::parse_basis("sparse", "t"), lspo::ProjectorBasis::kSparse);
  EXPECT_THROW(lspo::parse_basis("dense", "t"), std::exception);
}

}  // namespace
