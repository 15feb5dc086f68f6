// CUDA projector primitives (src/projector_cuda.h) against a dense fp64 reference, both backends,
// fp32 and bf16, awkward sizes; determinism of the gather kernels. Tests that need a device skip
// cleanly without one. The host-side column-index builder is tested everywhere.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "../../src/projector_cuda.h"
#include "../../src/projector_kernels.h"
#include "lspo/common.h"

#ifdef LSPO_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using lspo::ProjectorBackend;
using lspo::SparseProjector;
namespace ld = lspo::detail;

bool have_gpu() { return ld::projector_cuda_compiled() && torch::cuda::is_available(); }

#define REQUIRE_GPU()                                                        \
  do {                                                                       \
    if (!have_gpu()) GTEST_SKIP() << "no CUDA device (or built without CUDA)"; \
  } while (0)

// Random (d, r)-sparse pattern on the CPU: distinct columns per row, optionally sorted per row.
torch::Tensor random_indices(int64_t n, int64_t d, int64_t r, bool sorted) {
  torch::Tensor idx = torch::rand({n, d}).argsort(int64_t(1), false).slice(1, 0, r).to(torch::kInt32).contiguous();
  if (sorted) idx = std::get<0>(idx.sort(1)).contiguous();
  return idx;
}

// ------------------------------------------------------------------ host column index (no GPU needed)
TEST(ProjectorColumnIndex, MatchesDefinition) {
  torch::manual_seed(1);
  for (auto [n, d, r, chunk] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
           {1, 1, 1, 1024}, {7, 3, 3, 2}, {33, 1, 1, 4}, {4097, 64, 8, 1024}, {300, 300, 300, 7}, {0, 5, 2, 16}}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n << " d=" << d << " r=" << r << " chunk=" << chunk);
    const torch::Tensor idx = random_indices(n, d, r, false);
    const int32_t* I = idx.data_ptr<int32_t>();
    const ld::ColumnIndexHost h = ld::build_column_index(I, n, r, d, chunk);
    ASSERT_EQ(h.nchunks, (n + chunk - 1) / chunk);
    ASSERT_EQ(h.colptr.size(), size_t(d + 1));
    ASSERT_EQ(h.colptr.front(), 0);
    ASSERT_EQ(h.colptr.back(), n * r);
    std::vector<int64_t> count(size_t(d), 0);
    for (int64_t p = 0; p < n * r; ++p) ++count[size_t(I[p])];
    for (int64_t c = 0; c < d; ++c) {
      ASSERT_EQ(h.colptr[size_t(c + 1)] - h.colptr[size_t(c)], count[size_t(c)]);
      for (int32_t q = h.colptr[size_t(c)]; q < h.colptr[size_t(c + 1)]; ++q) {
        ASSERT_EQ(I[h.pos[size_t(q)]], c);                     // entry belongs to column c
        ASSERT_EQ(h.rows[size_t(q)], h.pos[size_t(q)] / r);    // row of its slot
        if (q > h.colptr[size_t(c)]) ASSERT_LT(h.rows[size_t(q - 1)], h.rows[size_t(q)]);  // ascending
      }
      const int64_t stride = h.nchunks + 1;
      ASSERT_EQ(h.segptr[size_t(c * stride)], h.colptr[size_t(c)]);
      ASSERT_EQ(h.segptr[size_t(c * stride + h.nchunks)], h.colptr[size_t(c + 1)]);
      for (int64_t s = 0; s < h.nchunks; ++s) {
        for (int32_t q = h.segptr[size_t(c * stride + s)]; q < h.segptr[size_t(c * stride + s + 1)]; ++q) {
          ASSERT_GE(h.rows[size_t(q)], s * chunk);
          ASSERT_LT(h.rows[size_t(q)], (s + 1) * chunk);
        }
      }
    }
    // cuSPARSE's CSR of P: every row's columns ascending, same entries as the ELL row.
    if (!h.rows_sorted) {
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t t = 0; t < r; ++t) {
          const int32_t p = h.csr_pos[size_t(j * r + t)];
          ASSERT_EQ(p / r, j);
          ASSERT_EQ(h.csr_col[size_t(j * r + t)], I[p]);
          if (t > 0) ASSERT_LT(h.csr_col[size_t(j * r + t - 1)], h.csr_col[size_t(j * r + t)]);
        }
      }
    }
  }
}

TEST(ProjectorColumnIndex, SortedRowsNeedNoPermutation) {
  torch::manual_seed(2);
  const torch::Tensor idx = random_indices(50, 40, 6, true);
  const ld::ColumnIndexHost h = ld::build_column_index(idx.data_ptr<int32_t>(), 50, 6, 40, 16);
  EXPECT_TRUE(h.rows_sorted);
  EXPECT_TRUE(h.csr_pos.empty());
  EXPECT_TRUE(h.csr_col.empty());
}

TEST(ProjectorColumnIndex, RejectsBadPatterns) {
  const std::vector<int32_t> out_of_range = {0, 1, 2, 5};  // n=2, r=2, d=5: 5 is outside [0, 5)
  EXPECT_THROW(ld::build_column_index(out_of_range.data(), 2, 2, 5, 16), lspo::Error);
  const std::vector<int32_t> negative = {0, -1};
  EXPECT_THROW(ld::build_column_index(negative.data(), 1, 2, 5, 16), lspo::Error);
  const std::vector<int32_t> repeated = {0, 1, 3, 3};
  EXPECT_THROW(ld::build_column_index(repeated.data(), 2, 2, 5, 16), lspo::Error);
  const std::vector<int32_t> ok = {0, 1};
  EXPECT_THROW(ld::build_column_index(ok.data(), 1, 2, 1, 16), lspo::Error);  // r > d
  EXPECT_NO_THROW(ld::build_column_index(ok.data(), 1, 2, 2, 16));
}

TEST(ProjectorCuda, AutoResolvesToGatherUntilCalibrated) {
  for (auto op : {ld::CudaPrimitive::kRightProject, ld::CudaPrimitive::kLeftProject, ld::CudaPrimitive::kExpand,
                  ld::CudaPrimitive::kApplyRows, ld::CudaPrimitive::kApplyCols}) {
    EXPECT_EQ(ld::cuda_resolve_backend(op, 4096, 1024, 8, 2048, ProjectorBackend::kAuto), ProjectorBackend::kGather);
    EXPECT_EQ(ld::cuda_resolve_backend(op, 4096, 1024, 8, 2048, ProjectorBackend::kCuSparse),
              ProjectorBackend::kCuSparse);
  }
}

// CPU tensors are refused with a named error (without CUDA: "built without CUDA"); runs everywhere.
TEST(ProjectorCuda, RejectsCpuTensors) {
  SparseProjector P;
  P.indices = torch::zeros({4, 1}, torch::kInt32);
  P.values = torch::ones({4, 1});
  P.d = 2;
  const torch::Tensor Y = torch::randn({3, 4});
  try {
    ld::cuda_right_project(Y, P, ProjectorBackend::kGather);
    FAIL() << "expected lspo::Error";
  } catch (const lspo::Error& e) {
    const std::string msg = e.what();
    EXPECT_TRUE(msg.find(ld::projector_cuda_compiled() ? "must be a CUDA tensor" : "built without CUDA") !=
                std::string::npos)
        << msg;
  }
  torch::Tensor W = torch::zeros({4, 3});
  EXPECT_THROW(ld::cuda_apply_rows_(W, P, torch::zeros({2, 3}), 1.0, ProjectorBackend::kGather), lspo::Error);
  EXPECT_THROW(ld::cuda_expand(P, torch::zeros({2, 3}), ProjectorBackend::kGather), lspo::Error);
  EXPECT_THROW(ld::cuda_left_project(P, torch::zeros({4, 3}), ProjectorBackend::kGather), lspo::Error);
}

// ------------------------------------------------------------------ host emulation of the kernels
// The kernel bodies are __host__ __device__; emulate_*() runs them serially on the host over the
// grid the launcher would use. This checks the kernels' index math and arithmetic without a GPU
// (not the CUDA launch itself, the memory model or speed).
#ifdef LSPO_WITH_CUDA
struct HostProjector {
  torch::Tensor idx, val, dense64;  // CPU
  ld::ColumnIndexHost h;
  ld::EllView ell() const {
    ld::EllView v;
    v.idx = idx.data_ptr<int32_t>();
    v.val = val.data_ptr<float>();
    v.n = idx.size(0);
    v.r = int32_t(idx.size(1));
    v.d = h.d;
    return v;
  }
  ld::ColumnIndexView cols() const {
    ld::ColumnIndexView c;
    c.colptr = h.colptr.data();
    c.rows = h.rows.data();
    c.pos = h.pos.data();
    c.segptr = h.segptr.data();
    c.nchunks = int32_t(h.nchunks);
    return c;
  }
};
HostProjector host_projector(int64_t n, int64_t d, int64_t r) {
  HostProjector p;
  p.idx = random_indices(n, d, r, false);
  p.val = torch::randn({n, r}) / std::sqrt(double(r));
  p.dense64 = torch::zeros({n, d}, torch::kFloat64).scatter_(1, p.idx.to(torch::kLong), p.val.to(torch::kFloat64));
  p.h = ld::build_column_index(p.idx.data_ptr<int32_t>(), n, r, d, ld::kRightProjectChunk);
  return p;
}
lspo::DType dt(torch::ScalarType t) { return t == torch::kBFloat16 ? lspo::DType::kBFloat16 : lspo::DType::kFloat32; }

torch::Tensor emu_right(const HostProjector& P, const torch::Tensor& Y, int64_t max_gy) {
  torch::Tensor out = torch::full({Y.size(0), P.h.d}, std::nan(""));
  ld::RightProjectParams p;
  p.P = P.ell();
  p.cols = P.cols();
  p.y = Y.data_ptr();
  p.y_dtype = dt(Y.scalar_type());
  p.k = Y.size(0);
  p.out = out.data_ptr<float>();
  ld::emulate_right_project(p, max_gy);
  return out;
}
torch::Tensor emu_left(const HostProjector& P, const torch::Tensor& Y, int64_t max_gy) {
  torch::Tensor out = torch::full({P.h.d, Y.size(1)}, std::nan(""));
  ld::LeftProjectParams p;
  p.P = P.ell();
  p.cols = P.cols();
  p.y = Y.data_ptr();
  p.y_dtype = dt(Y.scalar_type());
  p.k = Y.size(1);
  p.out = out.data_ptr<float>();
  ld::emulate_left_project(p, max_gy);
  return out;
}
torch::Tensor emu_expand(const HostProjector& P, const torch::Tensor& D, int64_t max_gy) {
  torch::Tensor out = torch::full({P.idx.size(0), D.size(1)}, std::nan(""));
  ld::ExpandParams p;
  p.P = P.ell();
  p.dmat = D.data_ptr();
  p.d_dtype = dt(D.scalar_type());
  p.k = D.size(1);
  p.out = out.data_ptr<float>();
  ld::emulate_expand(p, max_gy);
  return out;
}
void emu_apply(const HostProjector& P, torch::Tensor& W, const torch::Tensor& T, float alpha, int64_t max_gy) {
  ld::ApplyRowsParams p;
  p.P = P.ell();
  p.t = T.data_ptr<float>();
  p.k = W.size(1);
  p.w = W.data_ptr();
  p.w_dtype = dt(W.scalar_type());
  p.alpha = alpha;
  ld::emulate_apply_rows(p, max_gy);
}
void emu_apply_cols(const HostProjector& Q, torch::Tensor& W, const torch::Tensor& U, float alpha, int64_t max_gy) {
  ld::ApplyColsParams p;
  p.Q = Q.ell();
  p.u = U.data_ptr<float>();
  p.m = W.size(0);
  p.w = W.data_ptr();
  p.w_dtype = dt(W.scalar_type());
  p.alpha = alpha;
  ld::emulate_apply_cols(p, max_gy);
}
// A contiguous copy of t whose data starts one element past an aligned address (scalar path).
torch::Tensor misaligned(const torch::Tensor& t) {
  torch::Tensor buf = torch::empty({t.numel() + 1}, t.options());
  torch::Tensor v = buf.slice(0, 1).view(t.sizes());
  v.copy_(t);
  return v;
}
#endif

// Accuracy against the fp64 reference (same device as `ref`):
//  * fp32 inputs: the worst-case bound of recursive fp32 summation (Higham, with one rounding per
//    FMA step): |ours - exact| <= m * u * sum_i |term_i| elementwise, u = 2^-24, m = the number of
//    terms of the longest sum (inputs are exact in fp32). Any summation order satisfies it.
//  * bf16 inputs, flash-attention rule: our max error at most 2x that of plain PyTorch in bf16
//    (dense matmul, bf16 in -> bf16 out), plus a floor for single-product cases where the baseline's
//    roundings can cancel by luck: bf16's unit roundoff 2^-9 times the result scale.
double max_err(const torch::Tensor& x, const torch::Tensor& ref) {
  if (ref.numel() == 0) return 0.0;
  return (x.to(torch::kFloat64).to(ref.device()) - ref).abs().max().item<double>();
}
double max_abs(const torch::Tensor& ref) { return ref.numel() ? ref.abs().max().item<double>() : 0.0; }
void expect_accurate(const torch::Tensor& ours, torch::ScalarType in_dtype, const torch::Tensor& baseline,
                     const torch::Tensor& ref, const torch::Tensor& ref_abs, int64_t terms, const std::string& what) {
  if (ref.numel() == 0) return;
  const double e = max_err(ours, ref);
  if (in_dtype == torch::kFloat32) {
    const double gamma = double(terms) * std::ldexp(1.0, -24) * 1.001;
    const double excess = ((ours.to(torch::kFloat64).to(ref.device()) - ref).abs() - gamma * ref_abs).max().item<double>();
    EXPECT_LE(excess, 1e-300) << what << ": error " << e << " exceeds the fp32 summation bound (" << terms << " terms)";
    return;
  }
  const double b = max_err(baseline, ref);
  const double floor = std::ldexp(1.0, -9) * std::max(1.0, max_abs(ref));
  EXPECT_LE(e, 2 * b + floor) << what << ": error " << e << " vs PyTorch bf16 baseline " << b;
}

// Checks the four primitives' outputs for one projector (dense64 on the inputs' device).
struct PrimInputs {
  // fp32: Y [k, n], Z [n, k], D [d, k], T [d, k], W0 [n, k]; for apply_cols U [k, d], Wc0 [k, n]
  torch::Tensor Y, Z, D, T, W0, U, Wc0;
  double alpha = 0.3;
};
struct PrimOutputs {
  torch::Tensor right, left, expand, W, Wc;
};
PrimInputs random_inputs(int64_t n, int64_t d, int64_t k, const torch::Device& dev) {
  const auto o = torch::TensorOptions().device(dev);
  return {torch::randn({k, n}, o), torch::randn({n, k}, o), torch::randn({d, k}, o), torch::randn({d, k}, o),
          torch::randn({n, k}, o), torch::randn({k, d}, o), torch::randn({k, n}, o), 0.3};
}
void check_outputs(const PrimOutputs& out, const PrimInputs& in, const torch::Tensor& dense64, int64_t r,
                   torch::ScalarType dtype, const std::string& tag) {
  const auto f64 = [](const torch::Tensor& t) { return t.to(torch::kFloat64); };
  const torch::Tensor Pa = dense64.abs(), Pd = dense64.to(dtype);
  const int64_t col_terms = (dense64 != 0).sum(0).max().item<int64_t>();
  expect_accurate(out.right, dtype, torch::matmul(in.Y.to(dtype), Pd), torch::matmul(f64(in.Y), dense64),
                  torch::matmul(f64(in.Y).abs(), Pa), col_terms, "right_project " + tag);
  expect_accurate(out.left, dtype, torch::matmul(Pd.t(), in.Z.to(dtype)), torch::matmul(dense64.t(), f64(in.Z)),
                  torch::matmul(Pa.t(), f64(in.Z).abs()), col_terms, "left_project " + tag);
  expect_accurate(out.expand, dtype, torch::matmul(Pd, in.D.to(dtype)), torch::matmul(dense64, f64(in.D)),
                  torch::matmul(Pa, f64(in.D).abs()), r, "expand " + tag);
  expect_accurate(out.W, dtype, in.W0.to(dtype) + in.alpha * torch::matmul(Pd, in.T.to(dtype)),
                  f64(in.W0) + in.alpha * torch::matmul(dense64, f64(in.T)),
                  f64(in.W0).abs() + std::abs(in.alpha) * torch::matmul(Pa, f64(in.T).abs()), r + 2, "apply_rows " + tag);
  expect_accurate(out.Wc, dtype, in.Wc0.to(dtype) + in.alpha * torch::matmul(in.U.to(dtype), Pd.t()),
                  f64(in.Wc0) + in.alpha * torch::matmul(f64(in.U), dense64.t()),
                  f64(in.Wc0).abs() + std::abs(in.alpha) * torch::matmul(f64(in.U).abs(), Pa.t()), r + 2,
                  "apply_cols " + tag);
}

#ifdef LSPO_WITH_CUDA
TEST(ProjectorKernelEmulation, MatchDenseFp64) {
  torch::manual_seed(11);
  const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> cases = {
      {1, 1, 1, 1}, {7, 3, 3, 5}, {33, 1, 1, 17}, {4097, 64, 8, 33}, {1000, 300, 16, 1}, {700, 96, 4, 260},
      {64, 64, 64, 12}, {2100, 40, 5, 9}, {1026, 6, 3, 7} /* 2-wide staging loads */};
  for (auto [n, d, r, k] : cases) {
    const HostProjector P = host_projector(n, d, r);
    for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
      const std::string tag = std::string(dtype == torch::kBFloat16 ? "bf16" : "fp32") + " n=" + std::to_string(n) +
                              " d=" + std::to_string(d) + " r=" + std::to_string(r) + " k=" + std::to_string(k);
      SCOPED_TRACE(tag);
      const PrimInputs in = random_inputs(n, d, k, torch::kCPU);
      const torch::Tensor &Y = in.Y, &Z = in.Z, &D = in.D, &T = in.T, &W0 = in.W0;
      const torch::Tensor right = emu_right(P, Y.to(dtype), 65535), left = emu_left(P, Z.to(dtype), 65535);
      const torch::Tensor expand = emu_expand(P, D.to(dtype), 65535);
      torch::Tensor W = W0.to(dtype).clone();
      emu_apply(P, W, T, float(in.alpha), 65535);
      torch::Tensor Wc = in.Wc0.to(dtype).clone();
      emu_apply_cols(P, Wc, in.U, float(in.alpha), 65535);
      check_outputs({right, left, expand, W, Wc}, in, P.dense64, r, dtype, tag);

      // Determinism by construction: a capped grid (grid-stride loops) and the scalar path of
      // misaligned inputs give bitwise the same result.
      if (n * k <= 300000) {
        EXPECT_TRUE(torch::equal(right, emu_right(P, Y.to(dtype), 2)));
        EXPECT_TRUE(torch::equal(right, emu_right(P, misaligned(Y.to(dtype)), 65535)));  // 1-wide staging
        EXPECT_TRUE(torch::equal(left, emu_left(P, Z.to(dtype), 1)));
        EXPECT_TRUE(torch::equal(left, emu_left(P, misaligned(Z.to(dtype)), 3)));
        EXPECT_TRUE(torch::equal(expand, emu_expand(P, misaligned(D.to(dtype)), 1)));
        torch::Tensor W2 = misaligned(W0.to(dtype));
        emu_apply(P, W2, T, float(in.alpha), 1);
        EXPECT_TRUE(torch::equal(W, W2));
        torch::Tensor Wc2 = in.Wc0.to(dtype).clone();
        emu_apply_cols(P, Wc2, in.U, float(in.alpha), 1);
        EXPECT_TRUE(torch::equal(Wc, Wc2));
        torch::Tensor Wc3 = in.Wc0.to(dtype).clone();
        emu_apply_cols(P, Wc3, misaligned(in.U), float(in.alpha), 65535);
        EXPECT_TRUE(torch::equal(Wc, Wc3));
      }
    }
  }
}
#endif

// ------------------------------------------------------------------ device tests
struct TestProjector {
  SparseProjector P;       // on the GPU
  torch::Tensor dense64;   // [n, d] fp64 on the GPU
};

TestProjector make_projector(int64_t n, int64_t d, int64_t r, bool sorted) {
  const torch::Tensor idx = random_indices(n, d, r, sorted);
  const torch::Tensor val = torch::randn({n, r}) / std::sqrt(double(r));
  TestProjector t;
  t.P.indices = idx.to(torch::kCUDA);
  t.P.values = val.to(torch::kCUDA);
  t.P.d = d;
  t.dense64 = torch::zeros({n, d}, torch::kFloat64).scatter_(1, idx.to(torch::kLong), val.to(torch::kFloat64));
  t.dense64 = t.dense64.to(torch::kCUDA);
  return t;
}

struct Shape {
  int64_t n, d, r, k;
};
const std::vector<Shape>& shapes() {
  static const std::vector<Shape> s = {
      {1, 1, 1, 1},      // everything 1
      {7, 3, 3, 5},      // r = d, odd
      {33, 1, 1, 17},    // d = 1
      {4097, 64, 8, 33}, // n = 4097: five 1024-row chunks in the right projection
      {1000, 256, 16, 1},// k = 1
      {2500, 128, 4, 4097},
      {64, 64, 64, 12},  // r = d, vectorised (k % 4 == 0)
  };
  return s;
}

std::string name_of(ProjectorBackend b) { return b == ProjectorBackend::kGather ? "gather" : "cusparse"; }

class ProjectorCudaOps : public ::testing::TestWithParam<std::tuple<ProjectorBackend, torch::ScalarType, bool>> {};

TEST_P(ProjectorCudaOps, MatchDenseFp64) {
  REQUIRE_GPU();
  const auto [backend, dtype, sorted] = GetParam();
  torch::manual_seed(3);
  const bool bf = dtype == torch::kBFloat16;
  for (const Shape& s : shapes()) {
    const std::string tag = name_of(backend) + (bf ? " bf16" : " fp32") + " n=" + std::to_string(s.n) +
                            " d=" + std::to_string(s.d) + " r=" + std::to_string(s.r) + " k=" + std::to_string(s.k);
    SCOPED_TRACE(tag);
    const TestProjector t = make_projector(s.n, s.d, s.r, sorted);
    PrimInputs in = random_inputs(s.n, s.d, s.k, torch::kCUDA);
    in.alpha = -0.37;
    PrimOutputs out;
    out.right = ld::cuda_right_project(in.Y.to(dtype), t.P, backend);
    out.left = ld::cuda_left_project(t.P, in.Z.to(dtype), backend);
    out.expand = ld::cuda_expand(t.P, in.D.to(dtype), backend);
    out.W = in.W0.to(dtype).clone();
    ld::cuda_apply_rows_(out.W, t.P, in.T, in.alpha, backend);
    out.Wc = in.Wc0.to(dtype).clone();
    ld::cuda_apply_cols_(out.Wc, in.U, t.P, in.alpha, backend);
    ASSERT_EQ(out.right.sizes(), (std::vector<int64_t>{s.k, s.d}));
    ASSERT_EQ(out.left.sizes(), (std::vector<int64_t>{s.d, s.k}));
    ASSERT_EQ(out.expand.sizes(), (std::vector<int64_t>{s.n, s.k}));
    ASSERT_EQ(out.right.scalar_type(), torch::kFloat32);
    ASSERT_EQ(out.W.scalar_type(), dtype);
    check_outputs(out, in, t.dense64, s.r, dtype, tag);
  }
}

INSTANTIATE_TEST_SUITE_P(
    All, ProjectorCudaOps,
    ::testing::Combine(::testing::Values(ProjectorBackend::kGather, ProjectorBackend::kCuSparse, ProjectorBackend::kAuto),
                       ::testing::Values(torch::kFloat32, torch::kBFloat16), ::testing::Values(false, true)),
    [](const ::testing::TestParamInfo<ProjectorCudaOps::ParamType>& info) {
      const auto b = std::get<0>(info.param);
      const std::string backend = b == ProjectorBackend::kAuto ? "auto" : name_of(b);
      return backend + (std::get<1>(info.param) == torch::kBFloat16 ? "_bf16" : "_fp32") +
             (std::get<2>(info.param) ? "_sortedrows" : "_unsortedrows");
    });

TEST(ProjectorCuda, EmptyOperands) {
  REQUIRE_GPU();
  const TestProjector t = make_projector(10, 4, 2, false);
  for (auto b : {ProjectorBackend::kGather, ProjectorBackend::kCuSparse}) {
    const auto cuda = torch::TensorOptions().device(torch::kCUDA);
    EXPECT_EQ(ld::cuda_right_project(torch::zeros({0, 10}, cuda), t.P, b).sizes(), (std::vector<int64_t>{0, 4}));
    EXPECT_EQ(ld::cuda_left_project(t.P, torch::zeros({10, 0}, cuda), b).sizes(), (std::vector<int64_t>{4, 0}));
    EXPECT_EQ(ld::cuda_expand(t.P, torch::zeros({4, 0}, cuda), b).sizes(), (std::vector<int64_t>{10, 0}));
    torch::Tensor W = torch::zeros({10, 0}, cuda);
    EXPECT_NO_THROW(ld::cuda_apply_rows_(W, t.P, torch::zeros({4, 0}, cuda), 1.0, b));
    torch::Tensor Wc = torch::zeros({0, 10}, cuda);
    EXPECT_NO_THROW(ld::cuda_apply_cols_(Wc, torch::zeros({0, 4}, cuda), t.P, 1.0, b));
  }
}

// A dense basis with shared positions moves to the GPU with one row of positions and gives the CPU's
// results (both run ATen GEMMs; tolerance: fp32 GEMMs with different summation orders, TF32 off).
TEST(ProjectorCuda, DenseBasisKeepsSharedPositions) {
  REQUIRE_GPU();
  const SparseProjector P = SparseProjector::dense_basis(300, 24, 9);
  const SparseProjector G = P.to(torch::kCUDA);
  EXPECT_TRUE(G.shared_positions());
  EXPECT_EQ(G.indices.storage().nbytes(), static_cast<size_t>(4 * 24));
  const torch::Tensor Y = torch::randn({300, 7});
  const torch::Tensor a = lspo::left_project(P, Y), b = lspo::left_project(G, Y.cuda()).cpu();
  EXPECT_LT((a - b).abs().max().item<double>(), 1e-4 * (1 + a.abs().max().item<double>()));
  EXPECT_TRUE(G.to(torch::kCPU).shared_positions());
}

// Misaligned (storage offset 1) inputs take the scalar path and still match.
TEST(ProjectorCuda, MisalignedInputs) {
  REQUIRE_GPU();
  torch::manual_seed(4);
  const TestProjector t = make_projector(300, 32, 4, false);
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  const int64_t k = 64;
  const torch::Tensor Z = torch::randn({300 * k + 1}, cuda).slice(0, 1).view({300, k});
  ASSERT_TRUE(Z.is_contiguous());
  const torch::Tensor ref = torch::matmul(t.dense64.t(), Z.to(torch::kFloat64));
  EXPECT_LT(max_err(ld::cuda_left_project(t.P, Z, ProjectorBackend::kGather), ref), 1e-4);
  const torch::Tensor D = torch::randn({32 * k + 1}, cuda).slice(0, 1).view({32, k});
  EXPECT_LT(max_err(ld::cuda_expand(t.P, D, ProjectorBackend::kGather), torch::matmul(t.dense64, D.to(torch::kFloat64))),
            1e-4);
}

// Gather kernels: bitwise equal on repeated runs and on another stream.
TEST(ProjectorCuda, GatherIsDeterministic) {
  REQUIRE_GPU();
  torch::manual_seed(5);
  const TestProjector t = make_projector(4097, 512, 8, false);
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    const torch::Tensor Y = torch::randn({257, 4097}, cuda).to(dtype), Z = torch::randn({4097, 257}, cuda).to(dtype);
    const torch::Tensor D = torch::randn({512, 257}, cuda).to(dtype), T = torch::randn({512, 257}, cuda);
    const torch::Tensor W0 = torch::randn({4097, 257}, cuda).to(dtype);
    auto run = [&] {
      torch::Tensor W = W0.clone(), Wc = W0.t().contiguous();
      ld::cuda_apply_rows_(W, t.P, T, 0.5, ProjectorBackend::kGather);
      ld::cuda_apply_cols_(Wc, T.t().contiguous(), t.P, 0.5, ProjectorBackend::kGather);
      return std::vector<torch::Tensor>{ld::cuda_right_project(Y, t.P, ProjectorBackend::kGather),
                                        ld::cuda_left_project(t.P, Z, ProjectorBackend::kGather),
                                        ld::cuda_expand(t.P, D, ProjectorBackend::kGather), W, Wc};
    };
    const auto a = run(), b = run();
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_TRUE(torch::equal(a[i], b[i])) << "output " << i << " differs between two runs";
    }
#ifdef LSPO_WITH_CUDA
    std::vector<torch::Tensor> c;
    {
      c10::cuda::CUDAStreamGuard g(c10::cuda::getStreamFromPool());
      c = run();
      c10::cuda::getCurrentCUDAStream().synchronize();
    }
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_TRUE(torch::equal(a[i], c[i])) << "output " << i << " differs on another stream";
    }
#endif
  }
}

// The host emulation runs the kernels' own bodies: on a device, gather results must equal it
// bitwise (explicit fmaf on both sides, same order), which is what makes the CPU-only emulation
// test meaningful.
TEST(ProjectorCuda, GatherEqualsHostEmulationBitwise) {
  REQUIRE_GPU();
#ifdef LSPO_WITH_CUDA
  torch::manual_seed(8);
  for (auto [n, d, r, k] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
           {4097, 64, 8, 33}, {700, 96, 4, 260}, {33, 1, 1, 17}}) {
    const HostProjector H = host_projector(n, d, r);
    SparseProjector P;
    P.indices = H.idx.to(torch::kCUDA);
    P.values = H.val.to(torch::kCUDA);
    P.d = d;
    for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
      const PrimInputs in = random_inputs(n, d, k, torch::kCPU);
      const auto cuda = [](const torch::Tensor& t) { return t.to(torch::kCUDA); };
      const auto g = ProjectorBackend::kGather;
      EXPECT_TRUE(torch::equal(ld::cuda_right_project(cuda(in.Y.to(dtype)), P, g).cpu(), emu_right(H, in.Y.to(dtype), 65535)));
      EXPECT_TRUE(torch::equal(ld::cuda_left_project(P, cuda(in.Z.to(dtype)), g).cpu(), emu_left(H, in.Z.to(dtype), 65535)));
      EXPECT_TRUE(torch::equal(ld::cuda_expand(P, cuda(in.D.to(dtype)), g).cpu(), emu_expand(H, in.D.to(dtype), 65535)));
      torch::Tensor W = cuda(in.W0.to(dtype)), Wh = in.W0.to(dtype).clone();
      ld::cuda_apply_rows_(W, P, cuda(in.T), 0.3, g);
      emu_apply(H, Wh, in.T, 0.3f, 65535);
      EXPECT_TRUE(torch::equal(W.cpu(), Wh));
      torch::Tensor Wc = cuda(in.Wc0.to(dtype)), Wch = in.Wc0.to(dtype).clone();
      ld::cuda_apply_cols_(Wc, cuda(in.U), P, 0.3, g);
      emu_apply_cols(H, Wch, in.U, 0.3f, 65535);
      EXPECT_TRUE(torch::equal(Wc.cpu(), Wch));
    }
  }
#endif
}

// The column-index cache: one entry per live projector, rebuilt when the indices change in place.
TEST(ProjectorCuda, ColumnIndexCache) {
  REQUIRE_GPU();
  torch::manual_seed(6);
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  const torch::Tensor Y = torch::randn({9, 200}, cuda);
  {
    TestProjector t = make_projector(200, 16, 2, false);
    ld::cuda_right_project(Y, t.P, ProjectorBackend::kGather);
    EXPECT_EQ(ld::projector_cuda_cache_entries(), 1u);  // earlier tests' projectors are gone
    // In-place change of the pattern: the next call must see it.
    const torch::Tensor idx2 = random_indices(200, 16, 2, false);
    t.P.indices.copy_(idx2.to(torch::kCUDA));
    const torch::Tensor dense2 = torch::zeros({200, 16}, torch::kFloat64)
                                     .scatter_(1, idx2.to(torch::kLong), t.P.values.cpu().to(torch::kFloat64))
                                     .to(torch::kCUDA);
    EXPECT_LT(max_err(ld::cuda_right_project(Y, t.P, ProjectorBackend::kGather),
                      torch::matmul(Y.to(torch::kFloat64), dense2)),
              1e-4);
    EXPECT_EQ(ld::projector_cuda_cache_entries(), 1u);
  }
  TestProjector u = make_projector(200, 16, 2, false);
  ld::cuda_right_project(Y, u.P, ProjectorBackend::kGather);
  EXPECT_EQ(ld::projector_cuda_cache_entries(), 1u);  // the dead projector's entry was dropped
}

TEST(ProjectorCuda, RejectsBadInput) {
  REQUIRE_GPU();
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  TestProjector t = make_projector(20, 8, 2, false);
  EXPECT_THROW(ld::cuda_right_project(torch::randn({3, 19}, cuda), t.P, ProjectorBackend::kGather), lspo::Error);
  EXPECT_THROW(ld::cuda_right_project(torch::randn({3, 20}, cuda).to(torch::kFloat64), t.P, ProjectorBackend::kGather),
               lspo::Error);
  EXPECT_THROW(ld::cuda_right_project(torch::randn({20, 3}, cuda).t(), t.P, ProjectorBackend::kGather), lspo::Error);
  EXPECT_THROW(ld::cuda_left_project(t.P, torch::randn({20, 3}), ProjectorBackend::kGather), lspo::Error);  // CPU
  torch::Tensor W = torch::zeros({20, 5}, cuda);
  EXPECT_THROW(ld::cuda_apply_rows_(W, t.P, torch::zeros({8, 5}, cuda).to(torch::kBFloat16), 1.0,
                                    ProjectorBackend::kGather),
               lspo::Error);  // T must be fp32
  EXPECT_THROW(ld::cuda_apply_rows_(W, t.P, torch::zeros({8, 4}, cuda), 1.0, ProjectorBackend::kGather), lspo::Error);
  torch::Tensor Wc = torch::zeros({5, 20}, cuda);
  EXPECT_THROW(ld::cuda_apply_cols_(Wc, torch::zeros({5, 7}, cuda), t.P, 1.0, ProjectorBackend::kGather),
               lspo::Error);  // U must be [m, d]
  EXPECT_THROW(ld::cuda_apply_cols_(Wc, Wc.view({-1}).slice(0, 0, 40).view({5, 8}), t.P, 1.0, ProjectorBackend::kGather),
               lspo::Error);  // U aliases W
  SparseProjector bad = t.P;
  bad.indices = t.P.indices.clone();
  bad.indices.index_put_({0, 0}, 8);  // == d: out of range
  EXPECT_THROW(ld::cuda_expand(bad, torch::zeros({8, 5}, cuda), ProjectorBackend::kGather), lspo::Error);
}

}  // namespace
