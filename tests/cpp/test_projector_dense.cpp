// Dense projectors with shared positions (SparseProjector::dense_basis, LSPAdamW(basis="svd")'s projected
// sides): the positions cost one row, the values are orthonormal, every operation matches an fp64
// reference within twice the error of the same fp32 product in plain PyTorch (flash-attention's rule),
// the Gram maps are the values' products, and malformed shared positions are named.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "lspo/common.h"
#include "lspo/projector.h"

namespace {

using lspo::SparseProjector;
using torch::Tensor;

const auto f64 = torch::kFloat64;

double max_abs(const Tensor& a, const Tensor& b) { return (a.to(f64) - b.to(f64)).abs().max().item<double>(); }

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error (expected one containing '" << needle << "')";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

struct DenseCase {
  int64_t n, d, other;  // the projector n x d; the operand's other dimension
  bool bf16;            // operands in bf16 (converted exactly to fp32 inside)
};
std::string case_name(const ::testing::TestParamInfo<DenseCase>& i) {
  const DenseCase& c = i.param;
  return "n" + std::to_string(c.n) + "_d" + std::to_string(c.d) + "_k" + std::to_string(c.other) +
         (c.bf16 ? "_bf16" : "_fp32");
}

class DenseBasis : public ::testing::TestWithParam<DenseCase> {};

TEST_P(DenseBasis, SharedPositionsCostOneRowAndTheBasisIsOrthonormal) {
  const DenseCase c = GetParam();
  const SparseProjector P = SparseProjector::dense_basis(c.n, c.d, 3);
  EXPECT_TRUE(P.shared_positions());
  EXPECT_FALSE(P.whitened());
  EXPECT_EQ(P.n(), c.n);
  EXPECT_EQ(P.r(), c.d);
  EXPECT_EQ(P.indices.storage().nbytes(), static_cast<size_t>(4 * c.d));  // one row of int32 positions
  EXPECT_LT(max_abs(P.values.to(f64).t().mm(P.values.to(f64)), torch::eye(c.d, f64)), 1e-5);  // fp32 rounding of QR
  P.validate();
  // a seed gives one basis; reinit_values_ draws another orthonormal one in place
  EXPECT_TRUE(torch::equal(P.values, SparseProjector::dense_basis(c.n, c.d, 3).values));
  SparseProjector R = P.clone();
  R.reinit_values_(4);
  EXPECT_FALSE(torch::equal(R.values, P.values));
  EXPECT_LT(max_abs(R.values.to(f64).t().mm(R.values.to(f64)), torch::eye(c.d, f64)), 1e-5);
  // the Gram maps are products of the values: U^T U = I, so the whitening factor is ~I
  EXPECT_LT(max_abs(lspo::whitening_factor(P), torch::eye(c.d, f64)), 1e-4);
  EXPECT_LT(max_abs(lspo::cross_gram(R, P), R.values.to(f64).t().mm(P.values.to(f64))), 1e-5);
}

TEST_P(DenseBasis, OperationsMatchTheFp64Reference) {
  const DenseCase c = GetParam();
  torch::manual_seed(10 + c.n + c.d);
  const SparseProjector P = SparseProjector::dense_basis(c.n, c.d, 5);
  const auto dt = c.bf16 ? torch::kBFloat16 : torch::kFloat32;
  const Tensor U32 = P.values, U64 = P.values.to(f64);
  // error of the plain fp32 product against fp64 (the tolerance unit), plus an absolute floor for
  // the exactly representable cases
  auto check = [&](const Tensor& got, const Tensor& torch32, const Tensor& ref64, const char* what) {
    ASSERT_EQ(got.sizes(), ref64.sizes()) << what;
    EXPECT_LE(max_abs(got, ref64), 2.0 * max_abs(torch32, ref64) + 1e-6) << what;
  };
  const Tensor X = torch::randn({c.other, c.n}).to(dt);  // right_project: X U
  check(lspo::right_project(X, P), X.to(torch::kFloat32).mm(U32), X.to(f64).mm(U64), "right_project");
  const Tensor Y = torch::randn({c.n, c.other}).to(dt);  // left_project: U^T Y
  check(lspo::left_project(P, Y), U32.t().mm(Y.to(torch::kFloat32)), U64.t().mm(Y.to(f64)), "left_project");
  // compress / decompress / apply_ with the identity on the other side (LSPAdamW's one-sided layout)
  const SparseProjector I = SparseProjector::identity(c.other);
  const Tensor G = torch::randn({c.n, c.other}).to(dt);
  check(lspo::compress(P, I, G), U32.t().mm(G.to(torch::kFloat32)), U64.t().mm(G.to(f64)), "compress");
  const Tensor D = torch::randn({c.d, c.other});
  check(lspo::decompress(P, I, D), U32.mm(D), U64.mm(D.to(f64)), "decompress");
  Tensor W = torch::randn({c.n, c.other}).to(dt);
  const Tensor W0 = W.clone();
  lspo::apply_(W, P, I, D, -0.5);
  // W's own rounding (one to its dtype) is part of both sides
  const Tensor torch_w = (W0.to(torch::kFloat32) - 0.5 * U32.mm(D)).to(dt);
  check(W, torch_w, W0.to(f64) - 0.5 * U64.mm(D.to(f64)), "apply_");
  // the same values with materialised positions (the generic layout) give the same results
  const SparseProjector M = SparseProjector::from_tensors(P.indices.contiguous(), P.values.clone(), c.d);
  EXPECT_FALSE(M.shared_positions());
  const Tensor a = lspo::right_project(X, M), b = lspo::right_project(X, P);
  EXPECT_LE(max_abs(a, b), 2.0 * max_abs(X.to(torch::kFloat32).mm(U32), X.to(f64).mm(U64)) + 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Sizes, DenseBasis,
                         ::testing::Values(DenseCase{2, 1, 3, false}, DenseCase{37, 5, 29, false},
                                           DenseCase{37, 5, 29, true}, DenseCase{64, 64, 7, false},
                                           DenseCase{4097, 17, 9, false}, DenseCase{4097, 17, 9, true}),
                         case_name);

TEST(DenseBasisErrors, MalformedSharedPositionsAreNamed) {
  const Tensor vals = torch::randn({5, 3});
  // one expanded row that is not 0..d-1 in order
  const Tensor perm = torch::tensor({0, 2, 1}, torch::kInt32).unsqueeze(0).expand({5, 3});
  expect_error([&] { SparseProjector::from_tensors(perm, vals, 3); }, "shared positions must be");
  expect_error([&] { lspo::right_project(torch::randn({2, 5}), SparseProjector::view(perm, vals, 3)); },
               "shared positions must be 0..d-1 in order");
  // other non-contiguous positions are still refused
  const Tensor strided = (torch::arange(30) % 3).to(torch::kInt32).view({5, 6}).narrow(1, 0, 3);
  expect_error([&] { lspo::right_project(torch::randn({2, 5}), SparseProjector::view(strided, vals, 3)); },
               "must be contiguous");
  expect_error([&] { SparseProjector::dense_basis(3, 4, 0); }, "1 <= d <= n");
}

}  // namespace
