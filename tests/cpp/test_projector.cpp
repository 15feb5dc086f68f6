// Public projector API (include/lspo/projector.h) on the CPU against a dense fp64 reference (P, Q
// materialised): every operation, fp32 and bf16 inputs, awkward sizes; fit, carry_state, bad input.
// fp32 tolerance: first-order worst-case bound of recursive fp32 summation, elementwise
//   |ours - ref| <= terms * 2^-24 * (|P|^T |G| |Q|)  (terms = products summed along the longest chain).
// bf16 tolerance (flash-attention rule): max error <= 2x that of the same product in PyTorch bf16,
// plus a floor 2^-9 * max|ref| for cases where the baseline's roundings cancel by luck.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "lspo/common.h"
#include "lspo/projector.h"

namespace {

using lspo::SparseProjector;
using torch::Tensor;

Tensor D64(const SparseProjector& P) { return P.dense(torch::kFloat64); }

void expect_fp32(const Tensor& ours, const Tensor& ref, const Tensor& ref_abs, double terms, const char* what) {
  ASSERT_EQ(ours.sizes(), ref.sizes()) << what;
  ASSERT_EQ(ours.scalar_type(), torch::kFloat32) << what;
  if (ref.numel() == 0) return;
  Tensor excess = (ours.to(torch::kFloat64) - ref).abs() - terms * std::ldexp(1.0, -24) * 1.001 * ref_abs;
  EXPECT_LE(excess.max().item<double>(), 1e-300) << what << ": max error "
                                                 << (ours.to(torch::kFloat64) - ref).abs().max().item<double>();
}

void expect_bf16(const Tensor& ours, const Tensor& baseline, const Tensor& ref, const char* what) {
  ASSERT_EQ(ours.sizes(), ref.sizes()) << what;
  const double e = (ours.to(torch::kFloat64) - ref).abs().max().item<double>();
  const double b = (baseline.to(torch::kFloat64) - ref).abs().max().item<double>();
  const double floor = std::ldexp(1.0, -9) * std::max(1.0, ref.abs().max().item<double>());
  EXPECT_LE(e, 2 * b + floor) << what << ": error " << e << " vs PyTorch bf16 " << b;
}

struct Shape {
  int64_t m, n, dP, dQ, r, k;
};

class ProjectorOps : public ::testing::TestWithParam<Shape> {};

TEST_P(ProjectorOps, EveryOpMatchesDenseFp64) {
  const Shape s = GetParam();
  const int64_t rQ = std::min(s.r, s.dQ);
  auto P = SparseProjector::random(s.m, s.dP, s.r, 1 + s.m);
  auto Q = SparseProjector::random(s.n, s.dQ, rQ, 2 + s.n);
  torch::manual_seed(s.m * 31 + s.n);
  const Tensor G = torch::randn({s.m, s.n});
  const Tensor X = torch::randn({s.k, s.m}), dY = torch::randn({s.k, s.n});
  const Tensor Delta = torch::randn({s.dP, s.dQ});
  const Tensor P64 = D64(P), Q64 = D64(Q), Pa = P64.abs(), Qa = Q64.abs();
  const double tP = s.r, tQ = rQ, colP = s.m, colQ = s.n;  // products per sum (upper bounds)

  expect_fp32(lspo::right_project(X, P), X.to(torch::kFloat64).mm(P64), X.to(torch::kFloat64).abs().mm(Pa), colP,
              "right_project");
  expect_fp32(lspo::left_project(P, G), P64.t().mm(G.to(torch::kFloat64)), Pa.t().mm(G.to(torch::kFloat64).abs()),
              colP, "left_project");
  const Tensor G64 = G.to(torch::kFloat64), Ga = G64.abs();
  expect_fp32(lspo::compress(P, Q, G), P64.t().mm(G64).mm(Q64), Pa.t().mm(Ga).mm(Qa), colP + colQ + 2, "compress");
  const Tensor X64 = X.to(torch::kFloat64), dY64 = dY.to(torch::kFloat64);
  expect_fp32(lspo::project_input(P, X), P64.t().mm(X64.t()), Pa.t().mm(X64.abs().t()), colP, "project_input");
  expect_fp32(lspo::project_grad_output(Q, dY), dY64.mm(Q64), dY64.abs().mm(Qa), colQ, "project_grad_output");
  expect_fp32(lspo::compress_activations(P, Q, X, dY), P64.t().mm(X64.t()).mm(dY64).mm(Q64),
              Pa.t().mm(X64.abs().t()).mm(dY64.abs()).mm(Qa), colP + colQ + s.k + 2, "compress_activations");
  const Tensor Dl64 = Delta.to(torch::kFloat64);
  expect_fp32(lspo::decompress(P, Q, Delta), P64.mm(Dl64).mm(Q64.t()), Pa.mm(Dl64.abs()).mm(Qa.t()), tP + tQ + 2,
              "decompress");
  for (auto wt : {torch::kFloat32, torch::kBFloat16}) {
    const double alpha = -0.37;
    Tensor W = torch::randn({s.m, s.n}).to(wt);
    const Tensor W0 = W.to(torch::kFloat64);
    lspo::apply_(W, P, Q, Delta, alpha);
    const Tensor ref = W0 + alpha * P64.mm(Dl64).mm(Q64.t());
    if (wt == torch::kFloat32) {
      expect_fp32(W, ref, W0.abs() + std::abs(alpha) * Pa.mm(Dl64.abs()).mm(Qa.t()), tP + tQ + 3, "apply_ fp32");
    } else {
      // One rounding to bf16 of the exact result (plus fp32 noise): within 2^-8 relative of |ref| + tiny.
      ASSERT_EQ(W.scalar_type(), torch::kBFloat16);
      const Tensor diff = (W.to(torch::kFloat64) - ref).abs();
      const Tensor bound = std::ldexp(1.0, -8) * ref.abs() + 1e-5 * (W0.abs() + Pa.mm(Dl64.abs()).mm(Qa.t()));
      EXPECT_LE((diff - bound).max().item<double>(), 0.0) << "apply_ bf16";
    }
  }
  // bf16 inputs, flash-attention rule against PyTorch bf16 matmuls of the same products.
  const auto bf = torch::kBFloat16;
  expect_bf16(lspo::right_project(X.to(bf), P), X.to(bf).mm(P64.to(bf)), X64.mm(P64), "right_project bf16");
  expect_bf16(lspo::compress(P, Q, G.to(bf)), P64.to(bf).t().mm(G.to(bf)).mm(Q64.to(bf)), P64.t().mm(G64).mm(Q64),
              "compress bf16");
  expect_bf16(lspo::compress_activations(P, Q, X.to(bf), dY.to(bf)),
              P64.to(bf).t().mm(X.to(bf).t()).mm(dY.to(bf)).mm(Q64.to(bf)), P64.t().mm(X64.t()).mm(dY64).mm(Q64),
              "compress_activations bf16");
}

INSTANTIATE_TEST_SUITE_P(Shapes, ProjectorOps,
                         ::testing::Values(Shape{1, 1, 1, 1, 1, 1},      // d = 1, r = 1, n = 1
                                           Shape{7, 5, 1, 2, 1, 3},      // d = 1, odd sizes
                                           Shape{9, 13, 4, 4, 4, 5},     // r = d
                                           Shape{33, 17, 8, 5, 3, 11},   // odd everything
                                           Shape{4097, 24, 64, 8, 8, 9}, // m = 4097
                                           Shape{64, 96, 16, 32, 16, 130},  // P dense (r = d = 16): GEMM path
                                           Shape{4097, 33, 24, 17, 24, 5},   // both dense, m = 4097, odd n
                                           Shape{300, 257, 16, 16, 16, 1}),  // both dense at the threshold, k = 1
                         [](const ::testing::TestParamInfo<Shape>& i) {
                           const Shape& s = i.param;
                           return "m" + std::to_string(s.m) + "n" + std::to_string(s.n) + "dP" + std::to_string(s.dP) +
                                  "dQ" + std::to_string(s.dQ) + "r" + std::to_string(s.r) + "k" + std::to_string(s.k);
                         });

TEST(Projector, RandomIsValidAndDeterministic) {
  auto a = SparseProjector::random(100, 20, 7, 5), b = SparseProjector::random(100, 20, 7, 5);
  EXPECT_TRUE(torch::equal(a.indices, b.indices));
  EXPECT_TRUE(torch::equal(a.values, b.values));
  EXPECT_NO_THROW(a.validate());
  auto full = SparseProjector::random(30, 6, 6, 1, torch::kCPU, lspo::ProjectorInit::kRademacher);  // r = d
  EXPECT_NO_THROW(full.validate());
  EXPECT_NEAR(full.values.abs().max().item<double>(), std::sqrt(6.0 / (30 * 6)), 1e-6);  // sqrt(d / (n r))
  EXPECT_NEAR(full.values.abs().min().item<double>(), std::sqrt(6.0 / (30 * 6)), 1e-6);
  const Tensor g = SparseProjector::random(4000, 64, 16, 3).values;
  EXPECT_NEAR(g.std().item<double>(), std::sqrt(64.0 / (4000 * 16)), 0.001);  // N(0, d / (n r))
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error, expected one containing '" << needle << "'";
  } catch (const lspo::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Projector, BadInputRaisesNamedErrors) {
  expect_error([] { SparseProjector::random(10, 11, 2, 0); }, "d > n");
  expect_error([] { SparseProjector::random(10, 4, 5, 0); }, "r > d");
  expect_error([] { SparseProjector::random(10, 4, 0, 0); }, "r < 1");
  auto P = SparseProjector::random(12, 4, 2, 0), Q = SparseProjector::random(10, 4, 2, 1);
  expect_error([&] { lspo::compress(P, Q, torch::randn({10, 12})); }, "compress: G has sizes");
  expect_error([&] { lspo::compress_activations(P, Q, torch::randn({3, 12}), torch::randn({4, 10})); }, "tokens");
  expect_error([&] { lspo::right_project(torch::randn({3, 12}).to(torch::kInt32), P); }, "floating");
  expect_error([&] { lspo::decompress(P, Q, torch::randn({4, 5})); }, "Delta has sizes");
  Tensor W16 = torch::zeros({12, 10}, torch::kFloat16);
  expect_error([&] { lspo::apply_(W16, P, Q, torch::randn({4, 4}), 1.0); }, "float32 or bfloat16");
  Tensor Wt = torch::zeros({10, 12}).t();
  expect_error([&] { lspo::apply_(Wt, P, Q, torch::randn({4, 4}), 1.0); }, "contiguous");
  expect_error([&] { SparseProjector::from_tensors(torch::zeros({5, 2}, torch::kInt32), torch::zeros({5, 2}), 3); },
               "duplicate");
  expect_error([&] { SparseProjector::from_tensors(torch::full({5, 1}, 7, torch::kInt32), torch::zeros({5, 1}), 3); },
               "out of range");
  expect_error([&] { SparseProjector::from_tensors(torch::zeros({5, 1}, torch::kInt64), torch::zeros({5, 1}), 3); },
               "int32");
  SparseProjector bad = P;
  bad.indices = P.indices.clone();
  bad.indices[0][0] = 99;  // out of range, caught by the ops' range check before the kernel
  expect_error([&] { lspo::right_project(torch::randn({2, 12}), bad); }, "out of range");
  if (torch::cuda::is_available()) {
    expect_error([&] { lspo::right_project(torch::randn({2, 12}).cuda(), P); }, "is on");
  }
}

// Low-rank gradients plus noise: fit must lower e, and error_after must equal the true e.
TEST(Projector, FitReducesErrorOnLowRankGradients) {
  torch::manual_seed(0);
  const int64_t m = 96, n = 80, rank = 4;
  const Tensor U = torch::randn({m, rank}), V = torch::randn({rank, n});
  std::vector<Tensor> grads;
  for (int i = 0; i < 3; ++i) grads.push_back(U.mm(torch::randn({rank, rank})).mm(V) + 0.05 * torch::randn({m, n}));
  auto P = SparseProjector::random(m, 16, 4, 10), Q = SparseProjector::random(n, 16, 4, 11);
  const double before = lspo::relative_error(P, Q, grads);
  lspo::FitOptions o;
  o.max_iters = 150;
  auto res = lspo::fit(P, Q, grads, o);
  EXPECT_NEAR(res.error_before, before, 1e-4 * std::max(1.0, before));
  EXPECT_NEAR(res.error_after, lspo::relative_error(P, Q, grads), 1e-4);
  EXPECT_LT(res.error_after, 0.5 * res.error_before);
  EXPECT_LT(res.error_after, 0.9);  // better than the zero projector (e = 1)
  EXPECT_TRUE(lspo::should_refit(P, Q, grads, res.error_after * 0.5));
  EXPECT_FALSE(lspo::should_refit(P, Q, grads, res.error_after * 1.01 + 1e-6));

  // (X, dY) pairs: same closed form without forming G.
  std::vector<lspo::GradSample> pairs;
  for (int i = 0; i < 2; ++i) {
    const Tensor X = torch::randn({12, rank}).mm(U.t()), dY = torch::randn({12, n});
    pairs.push_back(lspo::GradSample::activations(X, dY));
  }
  auto P2 = SparseProjector::random(m, 16, 4, 20), Q2 = SparseProjector::random(n, 16, 4, 21);
  const double b2 = lspo::relative_error(P2, Q2, pairs);
  auto r2 = lspo::fit(P2, Q2, pairs, o);
  EXPECT_NEAR(r2.error_before, b2, 1e-4 * std::max(1.0, b2));
  EXPECT_NEAR(r2.error_after, lspo::relative_error(P2, Q2, pairs), 1e-4);
  EXPECT_LT(r2.error_after, r2.error_before);
  o.target_error = 1e9;  // reached immediately: no step
  auto r3 = lspo::fit(P2, Q2, pairs, o);
  EXPECT_EQ(r3.iters, 0);
}

TEST(Projector, CarryStateEqualsDenseFormula) {
  auto Po = SparseProjector::random(40, 8, 3, 1), Qo = SparseProjector::random(30, 6, 2, 2);
  for (int64_t dn : {8, 5}) {
    auto Pn = SparseProjector::random(40, dn, 3, 3), Qn = SparseProjector::random(30, 6, 4, 4);
    torch::manual_seed(dn);
    Tensor M = torch::randn({8, 6}), V = torch::rand({8, 6});
    const Tensor M0 = M.to(torch::kFloat64), V0 = V.to(torch::kFloat64);
    const Tensor CP = D64(Pn).t().mm(D64(Po)), CQ = D64(Qo).t().mm(D64(Qn));
    Tensor Malias = M;
    lspo::carry_state(Po, Qo, Pn, Qn, M, V);
    EXPECT_TRUE(torch::allclose(M.to(torch::kFloat64), CP.mm(M0).mm(CQ), 1e-5, 1e-5));
    EXPECT_TRUE(torch::allclose(V.to(torch::kFloat64), CP.square().mm(V0).mm(CQ.square()), 1e-5, 1e-5));
    if (dn == 8) EXPECT_EQ(Malias.data_ptr(), M.data_ptr());  // same sizes: in place
    EXPECT_EQ(M.size(0), dn);
  }
}

}  // namespace
