// The C++ face with real backward passes: gradient hooks registered from C++ hand each gradient to
// the optimizer core during backward (overlapped == serial, bitwise; projected weights never keep
// their dense gradient outside refit steps), gradient accumulation with refits, and AMP's loss scale.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "lspo/optim.h"

namespace {

struct OneThread {
  int saved = at::get_num_threads();
  OneThread() { at::set_num_threads(1); }
  ~OneThread() { at::set_num_threads(saved); }
};

struct Net : torch::nn::Module {
  torch::nn::Linear l1{nullptr}, l2{nullptr}, l3{nullptr};
  explicit Net(uint64_t seed) {
    torch::manual_seed(seed);
    l1 = register_module("l1", torch::nn::Linear(24, 40));
    l2 = register_module("l2", torch::nn::Linear(40, 33));
    l3 = register_module("l3", torch::nn::Linear(33, 5));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return l3->forward(torch::gelu(l2->forward(torch::tanh(l1->forward(x)))));
  }
};

torch::Tensor batch_x(int64_t i, int64_t n = 8) {
  torch::manual_seed(1000 + i);
  return torch::randn({n, 24});
}
torch::Tensor batch_y(int64_t i, int64_t n = 8) {
  torch::manual_seed(2000 + i);
  return torch::randint(0, 5, {n});
}

lspo::LSPAdamWOptions lsp_opts(bool overlap) {
  return lspo::LSPAdamWOptions(1e-2)
      .one_sided(false)  // the learned sparse square layout (the default is one-sided SVD)
      .basis("sparse")
      .weight_decay(0.01)
      .subspace(16)
      .nnz(4)
      .refit_every(3)
      .refit_threshold(0.0)
      .refit_iters(5)
      .max_grad_norm(1.0)
      .seed(5)
      .overlap(overlap);
}

struct Case {
  std::string name;
  bool lsp;
  int accum;
};

class HookedTraining : public ::testing::TestWithParam<Case> {};

std::vector<torch::Tensor> train(const Case& c, bool overlap, double loss_scale = 1.0) {
  auto net = std::make_shared<Net>(7);
  std::unique_ptr<lspo::OffloadOptimizerBase> opt;
  if (c.lsp)
    opt = std::make_unique<lspo::LSPAdamW>(net->parameters(), lsp_opts(overlap));
  else
    opt = std::make_unique<lspo::OffloadAdamW>(net->parameters(),
                                               lspo::OffloadAdamWOptions(1e-2).max_grad_norm(1.0).overlap(overlap));
  if (loss_scale != 1.0) opt->set_grad_scale(loss_scale);
  for (int64_t s = 0; s < 6; ++s) {
    for (int k = 0; k < c.accum; ++k) {
      const int64_t i = s * c.accum + k;
      auto loss = torch::nn::functional::cross_entropy(net->forward(batch_x(i)), batch_y(i)) / c.accum;
      (loss * loss_scale).backward();
    }
    if (c.lsp && overlap) {
      // the hooks consumed the projected weights' gradients: compressed, or on refit steps (1, 4)
      // moved into the check's dense sums (no compressed gradient yet)
      const bool refit_step = s % 3 == 0;
      EXPECT_FALSE(net->l1->weight.grad().defined()) << "step " << s + 1;
      EXPECT_EQ(opt->core().accumulated(0).defined(), !refit_step) << "step " << s + 1;
      EXPECT_TRUE(net->l1->bias.grad().defined());
    }
    opt->step();
    EXPECT_FALSE(opt->last_step_skipped());
    opt->zero_grad();
  }
  if (c.lsp) {
    EXPECT_EQ(opt->core().refits().size(), 2u * 2u);  // checks at steps 1 and 4, two projected layers
    EXPECT_GE(opt->refits(), 2);                      // fits kept: at least the first checks'
  }
  std::vector<torch::Tensor> w;
  for (const auto& p : net->parameters()) w.push_back(p.detach().clone());
  return w;
}

TEST_P(HookedTraining, OverlappedEqualsSerialBitwise) {
  OneThread one;
  auto a = train(GetParam(), true), b = train(GetParam(), false);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << "parameter " << i;
}

TEST_P(HookedTraining, LossScaleIsUndoneExactly) {
  OneThread one;
  // a power-of-two scale is exact in fp32: the unscaled run and the scaled one agree bitwise
  auto a = train(GetParam(), true), b = train(GetParam(), true, 1024.0);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << "parameter " << i;
}

INSTANTIATE_TEST_SUITE_P(Faces, HookedTraining,
                         ::testing::Values(Case{"lsp_accum1", true, 1}, Case{"lsp_accum2", true, 2},
                                           Case{"offload_accum1", false, 1}, Case{"offload_accum2", false, 2}),
                         [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

TEST(HookedTraining, OverflowUnderLossScaleSkipsTheStep) {
  OneThread one;
  auto net = std::make_shared<Net>(3);
  lspo::LSPAdamW opt(net->parameters(), lsp_opts(true));
  opt.set_grad_scale(1e30);
  auto before = net->l1->weight.detach().clone();
  auto loss = torch::nn::functional::cross_entropy(net->forward(batch_x(0)), batch_y(0));
  (loss * 1e30 * 1e30).backward();  // overflows to inf
  opt.step();
  EXPECT_TRUE(opt.last_step_skipped());
  EXPECT_EQ(opt.skipped_steps(), 1);
  EXPECT_TRUE(torch::equal(before, net->l1->weight.detach()));
  EXPECT_EQ(opt.step_count(net->l1->weight), 0);
}

TEST(HookedTraining, GradientAccumulationWithRefitsEqualsOneBigBatch) {
  // A refit check fits on the even micro-batches' sum and judges on the odd ones' (lspo/refit.h):
  // 4 micro-batches (a, b, c, d) and 2 micro-batches (a + c, b + d) give it the same two sums, and
  // the step the same whole gradient, so they agree up to fp32 summation order, refits included.
  OneThread one;
  auto run = [](bool four) {
    auto net = std::make_shared<Net>(11);
    lspo::LSPAdamW opt(net->parameters(), lsp_opts(true));
    for (int64_t s = 0; s < 5; ++s) {
      auto x = batch_x(s, 16), y = batch_y(s, 16);
      auto part = [&](int k) { return torch::arange(4 * k, 4 * k + 4); };
      std::vector<torch::Tensor> rows;
      if (four) {
        for (int k = 0; k < 4; ++k) rows.push_back(part(k));
      } else {
        rows = {torch::cat({part(0), part(2)}), torch::cat({part(1), part(3)})};
      }
      for (const auto& r : rows) {
        const double n = static_cast<double>(rows.size());
        (torch::nn::functional::cross_entropy(net->forward(x.index({r})), y.index({r})) / n).backward();
      }
      opt.step();
      opt.zero_grad();
    }
    EXPECT_GE(opt.refits(), 1);
    std::vector<torch::Tensor> w;
    for (const auto& p : net->parameters()) w.push_back(p.detach().clone());
    return w;
  };
  auto a = run(false), b = run(true);
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_LT((a[i] - b[i]).abs().max().item<double>(), 1e-4) << "parameter " << i;  // fp32 summation order
}

}  // namespace
