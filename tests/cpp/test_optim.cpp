// lspo::OffloadAdamW and lspo::LSPAdamW (lspo/optim.h): torch::optim::AdamW parity, a manual
// LSP reference composed from the library's primitives (bitwise), overlap == serial (bitwise),
// non-finite skip, clipping, save/load continuation (bitwise), bad options.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "lspo/common.h"
#include "lspo/cpu_adam.h"
#include "lspo/optim.h"
#include "lspo/refit.h"
#include "lspo/projector.h"

namespace {

using lspo::LSPAdamW;
using lspo::LSPAdamWOptions;
using lspo::OffloadAdamW;
using lspo::OffloadAdamWOptions;
using torch::optim::OptimizerParamGroup;

bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  if (a.numel() == 0) return true;  // (memcmp on the null data pointer of an empty tensor is UB)
  auto ac = a.contiguous().cpu(), bc = b.contiguous().cpu();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.numel() * ac.element_size()) == 0;
}

std::vector<torch::Tensor> make_params(const std::vector<std::vector<int64_t>>& shapes, torch::ScalarType dt,
                                       uint64_t seed) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> ps;
  for (const auto& s : shapes) ps.push_back(torch::randn(s).to(dt).requires_grad_(true));
  return ps;
}

std::vector<torch::Tensor> clone_params(const std::vector<torch::Tensor>& ps) {
  std::vector<torch::Tensor> out;
  for (const auto& p : ps) out.push_back(p.detach().clone().requires_grad_(true));
  return out;
}

// Deterministic gradients of step t (same for every optimizer under comparison).
std::vector<torch::Tensor> grads_at(const std::vector<torch::Tensor>& ps, int t) {
  torch::manual_seed(1000 + t);
  std::vector<torch::Tensor> gs;
  for (const auto& p : ps) gs.push_back(torch::randn(p.sizes()).to(p.scalar_type()));
  return gs;
}

void set_grads(std::vector<torch::Tensor>& ps, const std::vector<torch::Tensor>& gs) {
  for (size_t i = 0; i < ps.size(); ++i) ps[i].mutable_grad() = gs[i].clone();
}

// The tensors here are tiny: ATen's OpenMP fork/spin overhead dominates, and on a busy 2-core
// machine its spinning threads compete with the engine's worker and lspo's pool (seen: 20 s instead
// of 0.2 s for one test). Results do not depend on it (every comparison runs under the same setting).
struct OneAtenThread {
  int saved = at::get_num_threads();
  OneAtenThread() { at::set_num_threads(1); }
  ~OneAtenThread() { at::set_num_threads(saved); }
};

const std::vector<std::vector<int64_t>> kShapes = {{33, 17}, {1}, {4097}, {7, 5}, {48, 40}};

// ---------------------------------------------------------------- OffloadAdamW vs torch AdamW
// Tolerance: both evaluate AdamW in fp32 but in different operation orders (torch: m*b1 + g*(1-b1),
// sqrt(v)/sqrt(bc2), addcdiv with -lr/bc1; lspo: torch's lerp, sqrt(v)*(1/sqrt(bc2)), (-lr/bc1 * m)/d).
// Each step the update u differs by at most a few ulp of |u| <= lr*|m_hat|/sqrt(v_hat) <= 10 lr
// (for b1 = 0.9, b2 = 0.999 over few steps |m_hat|/sqrt(v_hat) <= sqrt((1-b1)/(1-b2)) = 10), and the
// differently-rounded sum p + u by 1 ulp of |p|; moments are contractions, so nothing compounds:
// after N steps |p_lspo - p_torch| <= N * eps32 * (2 max|p| + 16 * 10 * lr).
double adamw_tol(int steps, double max_abs_p, double lr) {
  const double eps32 = std::numeric_limits<float>::epsilon();
  return steps * eps32 * (2 * max_abs_p + 160 * lr);
}

TEST(OffloadAdamW, MatchesTorchAdamWWithGroupsAndScheduler) {
  OneAtenThread one_thread;
  const int N = 20;
  const double lr0 = 1e-2;
  auto a = make_params(kShapes, torch::kFloat, 1);
  auto b = clone_params(a);
  // two groups: the second with its own lr and weight decay
  std::vector<torch::Tensor> a0(a.begin(), a.begin() + 3), a1(a.begin() + 3, a.end());
  std::vector<torch::Tensor> b0(b.begin(), b.begin() + 3), b1(b.begin() + 3, b.end());
  OffloadAdamW oa({OptimizerParamGroup(a0), OptimizerParamGroup(a1, std::make_unique<OffloadAdamWOptions>(
                                                                         OffloadAdamWOptions(3e-2).weight_decay(0.3)))},
                  OffloadAdamWOptions(lr0).weight_decay(0.1).betas({0.9, 0.99}));
  torch::optim::AdamW ta({OptimizerParamGroup(b0),
                          OptimizerParamGroup(b1, std::make_unique<torch::optim::AdamWOptions>(
                                                      torch::optim::AdamWOptions(3e-2).weight_decay(0.3)))},
                         torch::optim::AdamWOptions(lr0).weight_decay(0.1).betas({0.9, 0.99}));
  torch::optim::StepLR sa(oa, 5, 0.5), sb(ta, 5, 0.5);
  for (int t = 1; t <= N; ++t) {
    auto g = grads_at(a, t);
    set_grads(a, g);
    set_grads(b, g);
    oa.step();
    ta.step();
    sa.step();
    sb.step();
  }
  double max_p = 0;
  for (auto& p : b) max_p = std::max(max_p, p.abs().max().item<double>());
  const double tol = adamw_tol(N, max_p, 3e-2);
  for (size_t i = 0; i < a.size(); ++i) {
    const double err = (a[i] - b[i]).abs().max().item<double>();
    EXPECT_LE(err, tol) << "param " << i;
    EXPECT_TRUE(same_bits(a[i].detach(), oa.master(a[i])));  // fp32 param == its fp32 master
    EXPECT_EQ(oa.step_count(a[i]), N);
  }
  // the scheduler changed the lr the optimizer reads, exactly as it did torch's
  for (size_t gi = 0; gi < 2; ++gi) {
    const double lr_a = static_cast<OffloadAdamWOptions&>(oa.param_groups()[gi].options()).lr();
    EXPECT_DOUBLE_EQ(lr_a, static_cast<torch::optim::AdamWOptions&>(ta.param_groups()[gi].options()).lr());
    EXPECT_LT(lr_a, gi == 0 ? lr0 / 4 : 3e-2 / 4);
  }
  // state() exposes the committed state
  auto& st = static_cast<lspo::OffloadParamState&>(*oa.state().at(a[0].unsafeGetTensorImpl()));
  EXPECT_EQ(st.step(), N);
  EXPECT_TRUE(same_bits(st.exp_avg(), oa.exp_avg(a[0])));
}

TEST(OffloadAdamW, Bf16ParamsKeepAnFp32Master) {
  OneAtenThread one_thread;
  const int N = 10;
  const double lr = 1e-2;
  auto a = make_params(kShapes, torch::kBFloat16, 2);
  std::vector<torch::Tensor> b;
  for (auto& p : a) b.push_back(p.detach().to(torch::kFloat).requires_grad_(true));
  OffloadAdamW oa(a, OffloadAdamWOptions(lr).weight_decay(0.1));
  torch::optim::AdamW ta(b, torch::optim::AdamWOptions(lr).weight_decay(0.1));
  for (int t = 1; t <= N; ++t) {
    auto g = grads_at(a, t);  // bf16 gradients, exactly representable in fp32
    set_grads(a, g);
    for (size_t i = 0; i < b.size(); ++i) b[i].mutable_grad() = g[i].to(torch::kFloat);
    oa.step();
    ta.step();
  }
  double max_p = 0;
  for (auto& p : b) max_p = std::max(max_p, p.abs().max().item<double>());
  for (size_t i = 0; i < a.size(); ++i) {
    auto m = oa.master(a[i]);
    EXPECT_LE((m - b[i]).abs().max().item<double>(), adamw_tol(N, max_p, lr)) << "param " << i;
    // the bf16 parameter is the round-to-nearest-even copy of the master, never accumulated in bf16
    EXPECT_TRUE(same_bits(a[i].detach(), m.to(torch::kBFloat16))) << "param " << i;
  }
}

// ---------------------------------------------------------------- the LSP reference
struct RefOpts {
  double lr = 2e-2, wd = 0.05, b1 = 0.9, b2 = 0.999, eps = 1e-8, max_norm = 0;
  int64_t subspace = 16, nnz = 4, refit_every = 3, refit_iters = 5, seed = 7;
  double refit_threshold = 0.0;  // always refit when due
  double refit_lr = 0.07;
};

LSPAdamWOptions lsp_options(const RefOpts& r, bool overlap = true) {
  return LSPAdamWOptions(r.lr)
      .weight_decay(r.wd)
      .betas({r.b1, r.b2})
      .eps(r.eps)
      .subspace(r.subspace)
      .nnz(r.nnz)
      .refit_every(r.refit_every)
      .refit_threshold(r.refit_threshold)
      .refit_iters(r.refit_iters)
      .refit_lr(r.refit_lr)
      .seed(r.seed)
      .max_grad_norm(r.max_norm)
      .overlap(overlap)
      .one_sided(false)  // the reference is the learned sparse square layout (the default is one-sided SVD)
      .basis("sparse");
}

// A plain, serial re-statement of LSPAdamW's documented step, composed from compress,
// adam_step_reference (the scalar definition of the fused kernel) and apply_.
struct Reference {
  struct Slot {
    torch::Tensor W;
    bool proj = false;
    lspo::SparseProjector P, Q;
    torch::Tensor m, v, master, out;
    int64_t step = 0, number = 0, checks = 0;
    double ref_err = std::numeric_limits<double>::quiet_NaN();
  };
  RefOpts o;
  std::vector<Slot> s;
  int64_t kept = 0;  // refit checks that kept a fit
  Reference(const std::vector<torch::Tensor>& ps, RefOpts opts) : o(opts) {
    int64_t i = 0;
    for (const auto& p : ps) {
      Slot x;
      x.W = p;
      x.proj = p.dim() == 2 && p.size(0) >= o.subspace && p.size(1) >= o.subspace;
      if (x.proj) {
        // whitened: LSPAdamWOptions::whiten defaults to true
        x.P = lspo::SparseProjector::random(p.size(0), std::min(o.subspace, p.size(0)), o.nnz, o.seed + 2 * i,
                                            torch::kCPU, lspo::ProjectorInit::kGaussian, true);
        x.Q = lspo::SparseProjector::random(p.size(1), std::min(o.subspace, p.size(1)), o.nnz, o.seed + 2 * i + 1,
                                            torch::kCPU, lspo::ProjectorInit::kGaussian, true);
        x.number = i++;
        x.m = torch::zeros({x.P.d, x.Q.d});
        x.out = torch::zeros({x.P.d, x.Q.d});
      } else {
        x.master = p.detach().to(torch::kFloat).clone().reshape(-1);
        x.m = torch::zeros({p.numel()});
        x.out = torch::empty({p.numel()}, p.scalar_type());
      }
      x.v = torch::zeros_like(x.m);
      s.push_back(std::move(x));
    }
  }
  void step(const std::vector<torch::Tensor>& grads) {
    torch::NoGradGuard ng;
    std::vector<torch::Tensor> norms, in;
    for (const auto& g : grads) norms.push_back(torch::linalg_vector_norm(g, 2, c10::nullopt, false, torch::kFloat));
    if (!torch::isfinite(torch::stack(norms)).all().item<bool>()) return;
    for (size_t k = 0; k < s.size(); ++k) {
      Slot& x = s[k];
      const int64_t t = x.step + 1;
      if (x.proj) {
        if (o.refit_every > 0 && (t - 1) % o.refit_every == 0) {
          // one micro-batch: the check's fit sum is the gradient, its held-out check in-sample
          torch::AutoGradMode on(true);
          x.checks += 1;
          lspo::RefitOptions ro;
          ro.iters = o.refit_iters;
          ro.lr = o.refit_lr;
          ro.threshold = o.refit_threshold;
          ro.reference_error = x.ref_err;
          ro.seed = (uint64_t(o.seed) * 1000003ULL + uint64_t(x.number) * 7919ULL + uint64_t(x.checks)) & 0x7FFFFFFFULL;
          const auto r = lspo::refit(x.P, x.Q, {lspo::GradSample::dense(grads[k].to(torch::kFloat))}, {}, ro,
                                     t > 1 ? &x.m : nullptr, t > 1 ? &x.v : nullptr);
          x.ref_err = r.reference_error;
          kept += r.kept ? 1 : 0;
          in.push_back(lspo::compress(x.P, x.Q, grads[k].to(torch::kFloat)));  // the check's fp32 sum
        } else {
          in.push_back(lspo::compress(x.P, x.Q, grads[k]));
        }
        norms[k] = torch::linalg_vector_norm(in.back(), 2, c10::nullopt, false, torch::kFloat);
      } else {
        in.push_back(grads[k].contiguous().reshape(-1));
      }
    }
    const double total = torch::linalg_vector_norm(torch::stack(norms), 2).item<double>();
    double scale = 1.0;
    if (o.max_norm > 0 && o.max_norm / (total + 1e-6) < 1.0) scale = float(o.max_norm / (total + 1e-6));
    for (size_t k = 0; k < s.size(); ++k) {
      Slot& x = s[k];
      x.step += 1;
      lspo::AdamConfig c;
      c.lr = o.lr;
      c.beta1 = o.b1;
      c.beta2 = o.b2;
      c.eps = o.eps;
      c.weight_decay = x.proj ? 0.0 : o.wd;
      c.grad_scale = scale;
      lspo::AdamBuffers b;
      b.param = x.proj ? nullptr : x.master.data_ptr<float>();
      b.exp_avg = x.m.data_ptr<float>();
      b.exp_avg_sq = x.v.data_ptr<float>();
      b.grad = in[k].data_ptr();
      b.grad_dtype = in[k].scalar_type() == torch::kFloat ? lspo::DType::kFloat32 : lspo::DType::kBFloat16;
      b.param_out = x.out.data_ptr();
      b.out_dtype = x.out.scalar_type() == torch::kFloat ? lspo::DType::kFloat32 : lspo::DType::kBFloat16;
      b.n = x.m.numel();
      lspo::adam_step_reference(c, x.step, b);
      if (x.proj) {
        if (o.wd > 0) x.W.mul_(1.0 - o.lr * o.wd);
        torch::Tensor W = x.W;
        lspo::apply_(W, x.P, x.Q, x.out, 1.0);
      } else {
        x.W.copy_(x.out.view(x.W.sizes()));
      }
    }
  }
};

// fp32 and bf16, projected (two) and not (three: 1-D, small 2-D, 4097); 8 steps with refits at t = 1, 4, 7.
void lsp_vs_reference(torch::ScalarType dt, const RefOpts& ro, bool overlap) {
  const int N = 8;
  auto a = make_params(kShapes, dt, 3);
  auto b = clone_params(a);
  LSPAdamW opt(a, lsp_options(ro, overlap));
  Reference ref(b, ro);
  for (int t = 1; t <= N; ++t) {
    auto g = grads_at(a, t);
    set_grads(a, g);
    opt.step();
    ref.step(g);
    EXPECT_FALSE(opt.last_step_skipped());
  }
  EXPECT_EQ(opt.refits(), ref.kept);  // checks at steps 1, 4, 7 that kept a fit
  EXPECT_GE(ref.kept, 2);             // at least the first checks' fits
  EXPECT_TRUE(opt.is_projected(a[0]) && opt.is_projected(a[4]));
  EXPECT_FALSE(opt.is_projected(a[1]) || opt.is_projected(a[2]) || opt.is_projected(a[3]));
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(same_bits(a[i].detach(), b[i].detach())) << "param " << i << " max diff "
                                                         << (a[i] - b[i]).abs().max().item<double>();
    EXPECT_TRUE(same_bits(opt.exp_avg(a[i]).reshape(-1), ref.s[i].m.reshape(-1))) << "exp_avg " << i;
    EXPECT_TRUE(same_bits(opt.exp_avg_sq(a[i]).reshape(-1), ref.s[i].v.reshape(-1))) << "exp_avg_sq " << i;
    if (ref.s[i].proj) {
      EXPECT_TRUE(same_bits(opt.row_projector(a[i]).values, ref.s[i].P.values));
      EXPECT_TRUE(same_bits(opt.col_projector(a[i]).values, ref.s[i].Q.values));
    }
  }
}

TEST(LSPAdamW, EqualsManualReferenceBitwise) {
  OneAtenThread one_thread;
  for (auto dt : {torch::kFloat, torch::kBFloat16}) {
    SCOPED_TRACE(dt == torch::kFloat ? "fp32" : "bf16");
    lsp_vs_reference(dt, RefOpts{}, true);
  }
}

TEST(LSPAdamW, SerialScheduleEqualsOverlappedAndReference) {
  OneAtenThread one_thread;
  lsp_vs_reference(torch::kFloat, RefOpts{}, false);
}

TEST(LSPAdamW, ClippingOnNormOfDenseGradsAndCompressedS) {
  OneAtenThread one_thread;
  RefOpts ro;
  ro.max_norm = 1.0;  // the global norm of these gradients is ~100: clipping is active every step
  lsp_vs_reference(torch::kFloat, ro, true);
  // and it is really active: last_grad_norm() > max, results differ from the unclipped run
  auto a = make_params(kShapes, torch::kFloat, 3);
  auto b = clone_params(a);
  LSPAdamW clipped(a, lsp_options(ro)), plain(b, lsp_options(RefOpts{}));
  for (int t = 1; t <= 3; ++t) {
    auto g = grads_at(a, t);
    set_grads(a, g);
    set_grads(b, g);
    clipped.step();
    plain.step();
  }
  EXPECT_GT(clipped.last_grad_norm(), 10.0);
  EXPECT_DOUBLE_EQ(clipped.last_grad_norm(), plain.last_grad_norm());
  EXPECT_FALSE(same_bits(a[2].detach(), b[2].detach()));
}

TEST(OffloadAdamW, ClippingMatchesClipGradNormThenAdamW) {
  OneAtenThread one_thread;
  const int N = 6;
  auto a = make_params(kShapes, torch::kFloat, 4);
  auto b = clone_params(a);
  OffloadAdamW oa(a, OffloadAdamWOptions(1e-2).max_grad_norm(0.5));
  torch::optim::AdamW ta(b, torch::optim::AdamWOptions(1e-2));
  for (int t = 1; t <= N; ++t) {
    auto g = grads_at(a, t);
    set_grads(a, g);
    set_grads(b, g);
    const double norm = torch::nn::utils::clip_grad_norm_(b, 0.5);
    oa.step();
    ta.step();
    EXPECT_NEAR(oa.last_grad_norm(), norm, 1e-5 * norm);
    EXPECT_GT(norm, 0.5);
  }
  double max_p = 0;
  for (auto& p : b) max_p = std::max(max_p, p.abs().max().item<double>());
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_LE((a[i] - b[i]).abs().max().item<double>(), adamw_tol(N, max_p, 1e-2)) << "param " << i;
}

TEST(OffloadAdamW, OverlappedEqualsSerialBitwise) {
  OneAtenThread one_thread;
  auto a = make_params(kShapes, torch::kBFloat16, 5);
  auto b = clone_params(a);
  OffloadAdamW oa(a, OffloadAdamWOptions(1e-2).overlap(true)), ob(b, OffloadAdamWOptions(1e-2).overlap(false));
  for (int t = 1; t <= 4; ++t) {
    auto g = grads_at(a, t);
    set_grads(a, g);
    set_grads(b, g);
    oa.step();
    ob.step();
  }
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(same_bits(a[i].detach(), b[i].detach()));
    EXPECT_TRUE(same_bits(oa.master(a[i]), ob.master(b[i])));
  }
}

// ---------------------------------------------------------------- non-finite gradients
struct Snapshot {
  std::vector<torch::Tensor> t;
  std::vector<int64_t> steps;
};
template <typename Opt>
Snapshot snapshot(const Opt& opt, const std::vector<torch::Tensor>& ps) {
  Snapshot s;
  for (const auto& p : ps) {
    s.t.push_back(p.detach().clone());
    s.t.push_back(opt.exp_avg(p));
    s.t.push_back(opt.exp_avg_sq(p));
    if (opt.is_projected(p)) {
      s.t.push_back(opt.row_projector(p).values.clone());
      s.t.push_back(opt.col_projector(p).values.clone());
    } else {
      s.t.push_back(opt.master(p));
    }
    s.steps.push_back(opt.step_count(p));
  }
  return s;
}
bool same(const Snapshot& a, const Snapshot& b) {
  if (a.steps != b.steps || a.t.size() != b.t.size()) return false;
  for (size_t i = 0; i < a.t.size(); ++i)
    if (!same_bits(a.t[i], b.t[i])) return false;
  return true;
}

TEST(LSPAdamW, NonFiniteGradientSkipsTheWholeStep) {
  OneAtenThread one_thread;
  RefOpts ro;
  ro.refit_every = 1;  // a refit is due at every step, so a skipped step must not refit either
  for (size_t bad : {size_t(0), size_t(2)}) {       // projected / dense
    for (float val : {NAN, INFINITY}) {
      auto a = make_params(kShapes, torch::kFloat, 6);
      LSPAdamW opt(a, lsp_options(ro));
      for (int t = 1; t <= 2; ++t) {
        set_grads(a, grads_at(a, t));
        opt.step();
      }
      const int64_t refits = opt.refits();
      Snapshot before = snapshot(opt, a);
      auto g = grads_at(a, 3);
      g[bad].view({-1})[g[bad].numel() / 2] = val;
      set_grads(a, g);
      opt.step();
      EXPECT_TRUE(opt.last_step_skipped());
      EXPECT_EQ(opt.skipped_steps(), 1);
      EXPECT_TRUE(std::isnan(opt.last_grad_norm()));
      EXPECT_EQ(opt.refits(), refits);
      EXPECT_TRUE(same(before, snapshot(opt, a))) << "param " << bad << " value " << val;
      set_grads(a, grads_at(a, 4));
      opt.step();
      EXPECT_FALSE(opt.last_step_skipped());
      EXPECT_EQ(opt.step_count(a[0]), 3);
      EXPECT_EQ(opt.step_count(a[2]), 3);
    }
  }
}

TEST(OffloadAdamW, NonFiniteGradientSkipsTheWholeStep) {
  OneAtenThread one_thread;
  auto a = make_params(kShapes, torch::kBFloat16, 7);
  OffloadAdamW opt(a, OffloadAdamWOptions(1e-2));
  set_grads(a, grads_at(a, 1));
  opt.step();
  Snapshot before = snapshot(opt, a);
  auto g = grads_at(a, 2);
  g[4].view({-1})[5] = NAN;
  set_grads(a, g);
  opt.step();
  EXPECT_TRUE(opt.last_step_skipped());
  EXPECT_TRUE(same(before, snapshot(opt, a)));
}

// ---------------------------------------------------------------- save / load
template <typename Opt, typename Options>
void save_load_continuation(torch::ScalarType dt, Options options) {
  const int K = 3, M = 4;
  auto a = make_params(kShapes, dt, 8);
  Opt opt_a(a, options);
  for (int t = 1; t <= K; ++t) {
    set_grads(a, grads_at(a, t));
    opt_a.step();
  }
  std::stringstream ss;
  torch::save(opt_a, ss);
  // a fresh model (other values) restored to the step-K weights, a fresh optimizer loading the state
  auto b = make_params(kShapes, dt, 9);
  {
    torch::NoGradGuard ng;
    for (size_t i = 0; i < a.size(); ++i) b[i].copy_(a[i]);
  }
  Opt opt_b(b, options);
  torch::load(opt_b, ss);
  for (int t = K + 1; t <= K + M; ++t) {
    auto g = grads_at(a, t);
    set_grads(a, g);
    set_grads(b, g);
    opt_a.step();
    opt_b.step();
  }
  EXPECT_TRUE(same(snapshot(opt_a, a), snapshot(opt_b, b)));
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(opt_b.step_count(b[i]), K + M);
}

TEST(LSPAdamW, SaveLoadContinuesBitwise) {
  OneAtenThread one_thread;
  RefOpts ro;
  ro.refit_every = 2;  // refits before (t = 1, 3) and after (t = 5, 7) the checkpoint
  ro.max_norm = 5.0;
  save_load_continuation<LSPAdamW>(torch::kFloat, lsp_options(ro));
  save_load_continuation<LSPAdamW>(torch::kBFloat16, lsp_options(ro));
}

TEST(OffloadAdamW, SaveLoadContinuesBitwise) {
  OneAtenThread one_thread;
  save_load_continuation<OffloadAdamW>(torch::kBFloat16, OffloadAdamWOptions(1e-2).weight_decay(0.1));
  save_load_continuation<OffloadAdamW>(torch::kFloat, OffloadAdamWOptions(1e-2).max_grad_norm(1.0));
}

TEST(LSPAdamW, LoadRejectsMismatchedArchives) {
  OneAtenThread one_thread;
  auto a = make_params(kShapes, torch::kFloat, 10);
  LSPAdamW lsp(a, lsp_options(RefOpts{}));
  set_grads(a, grads_at(a, 1));
  lsp.step();
  std::stringstream s1;
  torch::save(lsp, s1);
  auto expect_error = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error (expected one mentioning '" << needle << "')";
    } catch (const lspo::Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto b = make_params(kShapes, torch::kFloat, 10);
  OffloadAdamW off(b, OffloadAdamWOptions());
  expect_error([&] { torch::load(off, s1); }, "not of a OffloadAdamW");
  std::stringstream s2(s1.str());
  auto c = make_params(kShapes, torch::kFloat, 10);
  LSPAdamW other(c, lsp_options(RefOpts{}).subspace(8).nnz(4));  // 8 x 8 instead of 16 x 16
  expect_error([&] { torch::load(other, s2); }, "different subspace");
  std::stringstream s3(s1.str());
  auto d = make_params({{33, 17}, {1}}, torch::kFloat, 10);
  LSPAdamW fewer(d, lsp_options(RefOpts{}));
  expect_error([&] { torch::load(fewer, s3); }, "parameters");
}

// ---------------------------------------------------------------- bad options and inputs
void expect_lspo_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error (expected one naming '" << needle << "')";
  } catch (const lspo::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Optimizers, BadOptionsRaiseNamedErrors) {
  OneAtenThread one_thread;
  auto ps = [] { return make_params({{20, 20}, {3}}, torch::kFloat, 11); };
  expect_lspo_error([&] { OffloadAdamW o(ps(), OffloadAdamWOptions(-1)); }, "lr");
  expect_lspo_error([&] { OffloadAdamW o(ps(), OffloadAdamWOptions().betas({1.0, 0.9})); }, "betas[0]");
  expect_lspo_error([&] { OffloadAdamW o(ps(), OffloadAdamWOptions().betas({0.9, -0.1})); }, "betas[1]");
  expect_lspo_error([&] { OffloadAdamW o(ps(), OffloadAdamWOptions().eps(-1)); }, "eps");
  expect_lspo_error([&] { OffloadAdamW o(ps(), OffloadAdamWOptions().weight_decay(-1)); }, "weight_decay");
  expect_lspo_error([&] { OffloadAdamW o(ps(), OffloadAdamWOptions().max_grad_norm(NAN)); }, "max_grad_norm");
  expect_lspo_error([&] { OffloadAdamW o(ps(), OffloadAdamWOptions().pinned_limit_bytes(-1)); }, "pinned_limit_bytes");
  expect_lspo_error([&] { LSPAdamW o(ps(), LSPAdamWOptions().subspace(0)); }, "subspace");
  expect_lspo_error([&] { LSPAdamW o(ps(), LSPAdamWOptions().nnz(0)); }, "nnz");
  expect_lspo_error([&] { LSPAdamW o(ps(), LSPAdamWOptions().subspace(4).nnz(8)); }, "nnz");
  expect_lspo_error([&] { LSPAdamW o(ps(), LSPAdamWOptions().min_dim(-1)); }, "min_dim");
  expect_lspo_error([&] { LSPAdamW o(ps(), LSPAdamWOptions().min_dim(2).nnz(4)); }, "min_dim");
  expect_lspo_error([&] { LSPAdamW o(ps(), LSPAdamWOptions().refit_every(-1)); }, "refit_every");
  expect_lspo_error([&] { LSPAdamW o(ps(), LSPAdamWOptions().refit_threshold(-0.5)); }, "refit_threshold");
  expect_lspo_error([&] { LSPAdamW o(ps(), LSPAdamWOptions().refit_iters(0)); }, "refit_iters");
  expect_lspo_error([&] { LSPAdamW o(ps(), LSPAdamWOptions().refit_lr(0)); }, "refit_lr");
  expect_lspo_error([&] { LSPAdamW o(ps(), LSPAdamWOptions().seed(-1)); }, "seed");
  // per-group options are checked too, and must be of the optimizer's own type
  expect_lspo_error([&] {
    OffloadAdamW o({OptimizerParamGroup(ps(), std::make_unique<torch::optim::AdamWOptions>())});
  }, "OffloadAdamWOptions");
  expect_lspo_error([&] {
    LSPAdamW o({OptimizerParamGroup(ps(), std::make_unique<LSPAdamWOptions>(LSPAdamWOptions().eps(-1)))});
  }, "eps");
  // parameters
  expect_lspo_error([&] { OffloadAdamW o({torch::zeros({3}, torch::kInt)}); }, "dtype");
  expect_lspo_error(
      [&] { LSPAdamW o({torch::zeros({20, 20}, torch::kHalf).requires_grad_(true)}, LSPAdamWOptions().subspace(8)); },
      "float16");
  auto p = ps();
  expect_lspo_error([&] { OffloadAdamW o({OptimizerParamGroup({p[0]}), OptimizerParamGroup({p[0]})}); },
                    "more than one param group");
  // a scheduler-set (or user-set) invalid lr is caught at step()
  OffloadAdamW o(p, OffloadAdamWOptions());
  static_cast<OffloadAdamWOptions&>(o.param_groups()[0].options()).lr(NAN);
  set_grads(p, grads_at(p, 1));
  expect_lspo_error([&] { o.step(); }, "lr");
  expect_lspo_error([&] { o.exp_avg(torch::zeros({3})); }, "not a parameter");
}

TEST(Optimizers, GroupsAddedLaterAndParamsWithoutGradients) {
  OneAtenThread one_thread;
  auto p = make_params({{20, 20}, {3}, {5}}, torch::kFloat, 12);
  LSPAdamW o({p[0], p[1]}, LSPAdamWOptions(1e-2).subspace(8).nnz(2).refit_every(0));
  o.add_param_group(OptimizerParamGroup({p[2]}, std::make_unique<LSPAdamWOptions>(LSPAdamWOptions(0.5))));
  p[0].mutable_grad() = torch::ones({20, 20});
  p[2].mutable_grad() = torch::ones({5});
  auto p1 = p[1].detach().clone(), p2 = p[2].detach().clone();
  o.step();
  EXPECT_EQ(o.step_count(p[0]), 1);
  EXPECT_EQ(o.step_count(p[1]), 0);  // no gradient: untouched
  EXPECT_TRUE(same_bits(p[1].detach(), p1));
  EXPECT_EQ(o.step_count(p[2]), 1);
  // first AdamW step moves every element by lr (the later group's own lr 0.5) against the gradient
  EXPECT_LT((p2 - p[2].detach() - 0.5).abs().max().item<double>(), 1e-6);
  o.zero_grad();
  EXPECT_FALSE(p[0].grad().defined());
}

struct ToyLM : torch::nn::Module {
  torch::nn::Embedding emb{nullptr};
  torch::nn::Linear up{nullptr}, down{nullptr}, lm_head{nullptr}, out{nullptr};
  ToyLM() {
    emb = register_module("emb", torch::nn::Embedding(50, 32));
    up = register_module("up", torch::nn::Linear(32, 64));
    down = register_module("down", torch::nn::Linear(64, 32));
    lm_head = register_module("lm_head", torch::nn::Linear(32, 40));  // excluded by name
    out = register_module("out", torch::nn::Linear(32, 50));          // an ordinary layer (name, not shape)
  }
};

TEST(LSPAdamW, ParamGroupsFromAModule) {
  OneAtenThread one_thread;
  ToyLM m;
  auto o = LSPAdamWOptions().subspace(16).nnz(4);
  auto groups = lspo::lsp_param_groups(m, o);
  ASSERT_EQ(groups.size(), 2u);
  std::vector<const void*> g0;
  for (auto& p : groups[0].params()) g0.push_back(p.unsafeGetTensorImpl());
  std::vector<const void*> want = {m.up->weight.unsafeGetTensorImpl(), m.down->weight.unsafeGetTensorImpl(),
                                   m.out->weight.unsafeGetTensorImpl()};
  EXPECT_EQ(g0, want);
  EXPECT_EQ(groups[0].params().size() + groups[1].params().size(), m.parameters().size());
  LSPAdamW opt(std::move(groups), o);
  EXPECT_TRUE(opt.is_projected(m.up->weight) && opt.is_projected(m.down->weight));
  EXPECT_TRUE(opt.is_projected(m.out->weight));
  EXPECT_FALSE(opt.is_projected(m.lm_head->weight) || opt.is_projected(m.emb->weight) ||
               opt.is_projected(m.up->bias));
}

TEST(LSPAdamW, WhichParametersAreProjected) {
  OneAtenThread one_thread;
  auto p = make_params({{20, 20}, {20, 3}, {6, 5}, {4}, {30, 30}}, torch::kFloat, 13);
  p[4].requires_grad_(false);  // frozen: never projected automatically
  auto o = LSPAdamWOptions().subspace(8).nnz(2).one_sided(false).basis("sparse");  // the square layout's sizes
  auto forced = std::make_unique<LSPAdamWOptions>(o);
  forced->project(true);   // a small matrix, projected on request (both dims >= nnz)
  auto never = std::make_unique<LSPAdamWOptions>(o);
  never->project(false);
  LSPAdamW opt({OptimizerParamGroup({p[0], p[1], p[4]}), OptimizerParamGroup({p[2]}, std::move(forced)),
                OptimizerParamGroup({p[3]}, std::move(never))},
               o);
  EXPECT_TRUE(opt.is_projected(p[0]));
  EXPECT_FALSE(opt.is_projected(p[1]));  // 3 < min_dim = subspace = 8
  EXPECT_TRUE(opt.is_projected(p[2]));
  EXPECT_EQ(opt.row_projector(p[2]).d, 6);  // dP = min(subspace, m)
  EXPECT_EQ(opt.col_projector(p[2]).d, 5);
  EXPECT_FALSE(opt.is_projected(p[3]));
  EXPECT_FALSE(opt.is_projected(p[4]));
  // seeds: projected parameter i (registration order) uses seed + 2i, seed + 2i + 1
  auto P1 = lspo::SparseProjector::random(6, 6, 2, 0 + 2 * 1);
  EXPECT_TRUE(same_bits(opt.row_projector(p[2]).values, P1.values));
  EXPECT_TRUE(same_bits(opt.row_projector(p[2]).indices, P1.indices));
  auto bad = std::make_unique<LSPAdamWOptions>(o);
  bad->project(true);
  expect_lspo_error([&] { LSPAdamW x({OptimizerParamGroup({p[3]}, std::move(bad))}, o); }, "project(true)");
  // OffloadAdamW never projects
  OffloadAdamW off({p[0]});
  EXPECT_FALSE(off.is_projected(p[0]));
}

}  // namespace
