// lspo::OffloadAdamW / lspo::LSPAdamW on CUDA parameters against the same run on CPU parameters.
// Skips cleanly without a device.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstring>
#include <vector>

#include "lspo/optim.h"

namespace {

bool have_gpu() { return torch::cuda::is_available(); }

std::vector<torch::Tensor> params_on(torch::Device dev, torch::ScalarType dt) {
  torch::manual_seed(21);
  std::vector<torch::Tensor> ps;
  for (auto s : std::vector<std::vector<int64_t>>{{48, 40}, {7}, {33, 17}, {4097}})
    ps.push_back(torch::randn(s).to(dev, dt).requires_grad_(true));
  return ps;
}

void set_grads(std::vector<torch::Tensor>& ps, int t) {
  torch::manual_seed(500 + t);
  for (auto& p : ps) p.mutable_grad() = torch::randn(p.sizes()).to(p.device(), p.scalar_type());
}

bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  auto ac = a.detach().cpu().contiguous(), bc = b.detach().cpu().contiguous();
  return ac.sizes() == bc.sizes() && ac.scalar_type() == bc.scalar_type() &&
         (ac.numel() == 0 || std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.numel() * ac.element_size()) == 0);
}

// The host kernel does the arithmetic; gradients and weights cross the bus exactly: bitwise
// (without clipping: the GPU's norm may round differently from the CPU's).
TEST(OptimCuda, OffloadAdamWOnCudaEqualsCpuBitwise) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  for (auto dt : {torch::kFloat, torch::kBFloat16}) {
    auto a = params_on(torch::kCUDA, dt), b = params_on(torch::kCPU, dt);
    lspo::OffloadAdamW oa(a, lspo::OffloadAdamWOptions(1e-2));
    lspo::OffloadAdamW ob(b, lspo::OffloadAdamWOptions(1e-2));
    for (int t = 1; t <= 3; ++t) {
      set_grads(a, t);
      set_grads(b, t);
      oa.step();
      ob.step();
    }
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_TRUE(a[i].is_cuda());
      EXPECT_TRUE(same_bits(oa.master(a[i]), ob.master(b[i]))) << "param " << i;
      EXPECT_TRUE(same_bits(a[i], b[i])) << "param " << i;
    }
  }
}

// Projected weights: compress and apply_ run on the GPU with another summation order than on the
// CPU (relative differences ~1e-6 in S); Adam's u = -lr m/(sqrt(v)+eps) changes by about lr times
// that, and apply_ rounds W differently by an ulp: after 3 steps |dW| <= 1e-5 (lr = 1e-2, |W| ~ 4).
TEST(OptimCuda, LSPAdamWOnCudaMatchesCpu) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  auto o = lspo::LSPAdamWOptions(1e-2).subspace(16).nnz(4).refit_every(0).weight_decay(0.1);
  auto a = params_on(torch::kCUDA, torch::kFloat), b = params_on(torch::kCPU, torch::kFloat);
  lspo::LSPAdamW oa(a, o), ob(b, o);
  EXPECT_TRUE(oa.is_projected(a[0]) && oa.is_projected(a[2]));
  EXPECT_TRUE(oa.row_projector(a[0]).indices.is_cuda());
  for (int t = 1; t <= 3; ++t) {
    set_grads(a, t);
    set_grads(b, t);
    oa.step();
    ob.step();
  }
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_LE((a[i].detach().cpu() - b[i].detach()).abs().max().item<double>(), 1e-5) << "param " << i;
  // a refit on the GPU runs (fit + carry_state of the host moments) and keeps the weights finite
  lspo::LSPAdamW oc(params_on(torch::kCUDA, torch::kBFloat16),
                    lspo::LSPAdamWOptions(o).refit_every(1).refit_threshold(0.0));
  auto c = oc.parameters();
  for (int t = 1; t <= 2; ++t) {
    set_grads(c, t);
    oc.step();
  }
  EXPECT_EQ(oc.core().refits().size(), 4u);  // two checks x two projected parameters
  EXPECT_GE(oc.refits(), 2);
  for (auto& p : c) EXPECT_TRUE(torch::isfinite(p.detach()).all().item<bool>());
}

}  // namespace
