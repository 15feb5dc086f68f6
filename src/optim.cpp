// lspo::OffloadAdamW / lspo::LSPAdamW (lspo/optim.h): registration, the step pipeline, options.
// Serialisation (save/load) lives in optim_serialize.cpp.
#include "lspo/optim.h"

#include <cmath>
#include <limits>
#include <map>
#include <sstream>

#include "optim_internal.h"

namespace lspo {

namespace {

std::string shape_str(const torch::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// 0-dim tensors on any devices -> host fp32 scalars, one device->host transfer per device.
std::vector<torch::Tensor> to_host(const std::vector<torch::Tensor>& xs) {
  std::vector<torch::Tensor> out(xs.size());
  std::map<std::string, std::vector<size_t>> by_dev;
  for (size_t i = 0; i < xs.size(); ++i) by_dev[xs[i].device().str()].push_back(i);
  for (const auto& kv : by_dev) {
    std::vector<torch::Tensor> v;
    for (size_t i : kv.second) v.push_back(xs[i].to(torch::kFloat));
    torch::Tensor host = torch::stack(v).to(torch::kCPU);
    for (size_t k = 0; k < kv.second.size(); ++k) out[kv.second[k]] = host[static_cast<int64_t>(k)];
  }
  return out;
}

torch::Tensor norm_fp32(const torch::Tensor& t) {
  return torch::linalg_vector_norm(t, 2, c10::nullopt, false, torch::kFloat);
}

void check_common(const char* name, double lr, double b1, double b2, double eps, double wd) {
  LSPO_CHECK(std::isfinite(lr) && lr >= 0, name, ": invalid lr ", lr, " (need a finite value >= 0)");
  LSPO_CHECK(std::isfinite(eps) && eps >= 0, name, ": invalid eps ", eps, " (need >= 0)");
  LSPO_CHECK(b1 >= 0 && b1 < 1, name, ": invalid betas[0] ", b1, " (need 0 <= beta < 1)");
  LSPO_CHECK(b2 >= 0 && b2 < 1, name, ": invalid betas[1] ", b2, " (need 0 <= beta < 1)");
  LSPO_CHECK(std::isfinite(wd) && wd >= 0, name, ": invalid weight_decay ", wd, " (need >= 0)");
}

// The AdamW hyper-parameters both optimizers' options share, read into a Hyper and checked.
template <class H, class O>
void fill_common(H& h, const O& o, const char* name) {
  h.lr = o.lr();
  h.beta1 = std::get<0>(o.betas());
  h.beta2 = std::get<1>(o.betas());
  h.eps = o.eps();
  h.weight_decay = o.weight_decay();
  check_common(name, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay);
}

void check_global(const char* name, double max_grad_norm, int64_t pinned_limit_bytes) {
  LSPO_CHECK(!std::isnan(max_grad_norm), name, ": max_grad_norm is NaN (use <= 0 to disable clipping)");
  LSPO_CHECK(pinned_limit_bytes >= 0, name, ": pinned_limit_bytes must be >= 0, got ", pinned_limit_bytes);
}

}  // namespace

// ---------------------------------------------------------------- options
OffloadAdamWOptions::OffloadAdamWOptions(double lr) : lr_(lr) {}
double OffloadAdamWOptions::get_lr() const { return lr(); }
void OffloadAdamWOptions::set_lr(const double lr) { this->lr(lr); }
LSPAdamWOptions::LSPAdamWOptions(double lr) : lr_(lr) {}
double LSPAdamWOptions::get_lr() const { return lr(); }
void LSPAdamWOptions::set_lr(const double lr) { this->lr(lr); }

// ---------------------------------------------------------------- construction, registration
OffloadOptimizerBase::OffloadOptimizerBase(const std::vector<torch::optim::OptimizerParamGroup>& groups,
                                           std::unique_ptr<torch::optim::OptimizerOptions> defaults,
                                           const char* name, Global global)
    : torch::optim::Optimizer(groups, std::move(defaults)), name_(name), global_(global) {
  check_global(name, global.max_grad_norm, global.pinned_limit_bytes);
  EngineOptions eo;
  eo.overlap = global.overlap;
  eo.record_timeline = global.record_timeline;
  eo.pinned_limit_bytes = global.pinned_limit_bytes;
  eo.state_dir = global.state_dir;
  eo.host_memory_limit_bytes = global.host_memory_limit_bytes;
  engine_ = std::make_unique<OffloadEngine>(eo);
}

OffloadOptimizerBase::~OffloadOptimizerBase() = default;

void OffloadOptimizerBase::sync_slots() {
  for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
    auto& group = param_groups_[gi];
    const Hyper h = hyper(group.options());
    for (const torch::Tensor& p : group.params()) {
      LSPO_CHECK(p.defined(), name_, ": param group ", gi, " holds an undefined tensor");
      auto it = index_.find(p.unsafeGetTensorImpl());
      if (it != index_.end()) {
        LSPO_CHECK(slots_[it->second]->group == gi, name_, ": a parameter (sizes ", shape_str(p),
                   ") appears in more than one param group (", slots_[it->second]->group, " and ", gi, ")");
        continue;
      }
      const auto dt = p.scalar_type();
      const int64_t idx = static_cast<int64_t>(slots_.size());
      LSPO_CHECK(dt == torch::kFloat || dt == torch::kBFloat16 || dt == torch::kHalf, name_, ": parameter ", idx,
                 " (sizes ", shape_str(p), ") has dtype ", dt, "; need float32, bfloat16 or float16");
      auto s = std::make_unique<ParamSlot>();
      s->param = p;
      s->group = gi;
      s->name = "param" + std::to_string(idx) + ":" + shape_str(p);
      const int64_t min_dim = h.min_dim > 0 ? h.min_dim : h.subspace;
      if (!h.lsp) {
        s->projected = false;
      } else if (h.project.has_value()) {
        LSPO_CHECK(!*h.project || (p.dim() == 2 && p.size(0) >= h.nnz && p.size(1) >= h.nnz), name_,
                   ": cannot project parameter ", idx, " of sizes ", shape_str(p), " (project(true) needs 2-D with ",
                   "both dims >= nnz = ", h.nnz, ")");
        s->projected = *h.project;
      } else {
        s->projected = p.dim() == 2 && p.size(0) >= min_dim && p.size(1) >= min_dim && p.requires_grad();
      }
      if (s->projected) {
        LSPO_CHECK(dt != torch::kHalf, name_, ": projected parameter ", idx, " (sizes ", shape_str(p),
                   ") is float16; projected weights must be float32 or bfloat16 (put it in a group with "
                   "project(false))");
        LSPO_CHECK(p.is_contiguous(), name_, ": projected parameter ", idx, " (sizes ", shape_str(p),
                   ") must be contiguous (it is updated in place)");
        const int64_t i = num_projected_;
        const auto seed = static_cast<uint64_t>(global_.seed);
        s->P = SparseProjector::random(p.size(0), std::min(h.subspace, p.size(0)), h.nnz, seed + 2 * i, p.device());
        s->Q = SparseProjector::random(p.size(1), std::min(h.subspace, p.size(1)), h.nnz, seed + 2 * i + 1,
                                       p.device());
        s->slot = engine_->add_slot(s->name, torch::Tensor(), s->P.d * s->Q.d, torch::kFloat, torch::kFloat, idx);
        ++num_projected_;
      } else {
        s->slot = engine_->add_slot(s->name, p.detach(), p.numel(), dt, dt, idx);
      }
      refresh_state(*s);
      index_[p.unsafeGetTensorImpl()] = slots_.size();
      slots_.push_back(std::move(s));
    }
  }
}

void OffloadOptimizerBase::refresh_state(ParamSlot& s) {
  auto st = std::make_unique<OffloadParamState>();
  st->step(s.step);
  const torch::Tensor& p = s.param;
  if (engine_->on_disk(s.slot)) {
    // state in files: nothing to alias (exp_avg() & co. read copies)
  } else if (s.projected) {
    st->exp_avg(engine_->exp_avg(s.slot).view({s.P.d, s.Q.d}));
    st->exp_avg_sq(engine_->exp_avg_sq(s.slot).view({s.P.d, s.Q.d}));
  } else {
    st->exp_avg(engine_->exp_avg(s.slot).view(p.sizes()));
    st->exp_avg_sq(engine_->exp_avg_sq(s.slot).view(p.sizes()));
    st->master(engine_->master(s.slot).view(p.sizes()));
  }
  state_[p.unsafeGetTensorImpl()] = std::move(st);
}

// ---------------------------------------------------------------- the step
void OffloadOptimizerBase::refit_if_due(ParamSlot& s, const torch::Tensor& g, const Hyper& h) {
  const int64_t t = s.step + 1;
  if (h.refit_every <= 0 || (t - 1) % h.refit_every != 0) return;
  torch::AutoGradMode grad_on(true);  // fit() learns the values with autograd
  if (!should_refit(s.P, s.Q, std::vector<torch::Tensor>{g}, h.refit_threshold)) return;
  const double t0 = engine_->now_us();
  SparseProjector P_old = s.P.to(torch::kCPU), Q_old = s.Q.to(torch::kCPU);
  P_old.values = P_old.values.clone();  // fit() overwrites s.P's values in place (shared on the CPU)
  Q_old.values = Q_old.values.clone();
  FitOptions fo;
  fo.max_iters = h.refit_iters;
  fo.lr = h.refit_lr;
  fit(s.P, s.Q, std::vector<torch::Tensor>{g}, fo);
  torch::NoGradGuard ng;
  if (t > 1) {  // carry the committed moments into the new subspace, on the host, in place
    const bool disk = engine_->on_disk(s.slot);
    torch::Tensor M = (disk ? engine_->load_state(s.slot, StateKind::kExpAvg) : engine_->exp_avg(s.slot)).view({s.P.d, s.Q.d});
    torch::Tensor V =
        (disk ? engine_->load_state(s.slot, StateKind::kExpAvgSq) : engine_->exp_avg_sq(s.slot)).view({s.P.d, s.Q.d});
    carry_state(P_old, Q_old, s.P.to(torch::kCPU), s.Q.to(torch::kCPU), M, V);
    if (disk) {
      engine_->store_state(s.slot, StateKind::kExpAvg, M);
      engine_->store_state(s.slot, StateKind::kExpAvgSq, V);
    }
  }
  ++refits_;
  engine_->add_event("refit", s.name, 0, t0, engine_->now_us());
}

AdamConfig OffloadOptimizerBase::adam_config(const ParamSlot& s, const Hyper& h, double grad_scale) const {
  AdamConfig c;
  c.lr = h.lr;
  c.beta1 = h.beta1;
  c.beta2 = h.beta2;
  c.eps = h.eps;
  c.weight_decay = s.projected ? 0.0 : h.weight_decay;  // projected: decay applied to W directly
  c.adamw_mode = true;
  c.bias_correction = true;
  c.grad_scale = grad_scale;
  return c;
}

void OffloadOptimizerBase::write_back(ParamSlot& s, const Hyper& h) {
  torch::Tensor out = engine_->out_buffer(s.slot);
  torch::Tensor p = s.param;
  const double t0 = engine_->now_us();
  if (s.projected) {
    torch::Tensor u = out.view({s.P.d, s.Q.d});
    if (u.device() != p.device()) u = u.to(p.device());
    if (h.weight_decay > 0) p.mul_(1.0 - h.lr * h.weight_decay);
    apply_(p, s.P, s.Q, u, 1.0);
    engine_->add_event("apply", s.name, 0, t0, engine_->now_us());
  } else {
    p.copy_(out.view(p.sizes()));
    engine_->add_event("h2d", s.name, 3, t0, engine_->now_us());
  }
}

torch::Tensor OffloadOptimizerBase::step(LossClosure closure) {
  torch::Tensor loss;
  if (closure) {
    torch::AutoGradMode grad_on(true);
    loss = closure();
  }
  torch::NoGradGuard no_grad;
  sync_slots();
  last_step_skipped_ = false;
  const double t_step = engine_->now_us();
  std::vector<ParamSlot*> live;
  std::vector<Hyper> hp;
  for (auto& sp : slots_) {
    ParamSlot& s = *sp;
    const torch::Tensor& g = s.param.grad();
    if (!g.defined()) continue;
    LSPO_CHECK(!g.is_sparse(), name_, ": parameter ", s.slot, " has a sparse gradient (not supported)");
    LSPO_CHECK(g.sizes() == s.param.sizes(), name_, ": the gradient of parameter ", s.slot, " has sizes ",
               shape_str(g), " but the parameter ", shape_str(s.param));
    LSPO_CHECK(g.is_floating_point(), name_, ": the gradient of parameter ", s.slot, " is not floating point");
    live.push_back(&s);
    hp.push_back(hyper(param_groups_[s.group].options()));
  }
  if (live.empty()) return loss;

  // 1. one fp32 norm per gradient: any inf/NaN skips the step before anything changes
  std::vector<torch::Tensor> norms;
  for (ParamSlot* s : live) norms.push_back(norm_fp32(s->param.grad()));
  norms = to_host(norms);
  if (!torch::isfinite(torch::stack(norms)).all().item<bool>()) {
    last_step_skipped_ = true;
    ++skipped_steps_;
    last_grad_norm_ = std::numeric_limits<double>::quiet_NaN();
    return loss;
  }

  const bool clip = global_.max_grad_norm > 0;
  try {
    // 2. refit / compress / copy, and (without clipping) submit at once
    for (size_t k = 0; k < live.size(); ++k) {
      ParamSlot& s = *live[k];
      const torch::Tensor& g = s.param.grad();
      torch::Tensor buf = engine_->grad_buffer(s.slot);
      const double t0 = engine_->now_us();
      if (s.projected) {
        refit_if_due(s, g, hp[k]);
        const double t1 = engine_->now_us();
        torch::Tensor S = compress(s.P, s.Q, g);
        buf.copy_(S.reshape(-1));
        norms[k] = norm_fp32(S);
        engine_->add_event("compress", s.name, 0, t1, engine_->now_us());
      } else {
        buf.copy_(g.reshape(-1));
        engine_->add_event("d2h", s.name, 2, t0, engine_->now_us());
      }
      if (!clip) engine_->submit(s.slot, adam_config(s, hp[k], 1.0), s.step + 1);
    }
    // 3. the global norm (dense grads of the others, S of the projected), clipping
    norms = to_host(norms);
    const double total = torch::linalg_vector_norm(torch::stack(norms), 2).item<double>();
    last_grad_norm_ = total;
    if (clip) {
      double scale = 1.0;
      const double coef = global_.max_grad_norm / (total + 1e-6);
      if (coef < 1.0) scale = static_cast<double>(static_cast<float>(coef));
      for (size_t k = 0; k < live.size(); ++k)
        engine_->submit(live[k]->slot, adam_config(*live[k], hp[k], scale), live[k]->step + 1);
    }
    // 4. commit and write back in forward order (the worker keeps running the later slots)
    for (size_t k = 0; k < live.size(); ++k) {
      ParamSlot& s = *live[k];
      engine_->commit(s.slot);
      write_back(s, hp[k]);
      s.step += 1;
      refresh_state(s);
    }
  } catch (...) {
    try {
      engine_->wait_all();
    } catch (...) {
    }
    throw;
  }
  engine_->persist();  // state_dir: this step, wholly, in the files (no-op without one)
  engine_->add_event("step", "engine", 0, t_step, engine_->now_us());
  return loss;
}

// ---------------------------------------------------------------- introspection
const OffloadOptimizerBase::ParamSlot& OffloadOptimizerBase::slot_of(const torch::Tensor& param,
                                                                       const char* fn) const {
  auto it = param.defined() ? index_.find(param.unsafeGetTensorImpl()) : index_.end();
  LSPO_CHECK(it != index_.end(), name_, "::", fn, ": the tensor is not a parameter of this optimizer");
  return *slots_[it->second];
}

int64_t OffloadOptimizerBase::step_count(const torch::Tensor& p) const { return slot_of(p, "step_count").step; }
bool OffloadOptimizerBase::is_projected(const torch::Tensor& p) const { return slot_of(p, "is_projected").projected; }
torch::Tensor OffloadOptimizerBase::exp_avg(const torch::Tensor& p) const {
  const ParamSlot& s = slot_of(p, "exp_avg");
  return engine_->load_state(s.slot, StateKind::kExpAvg)
      .view(s.projected ? std::vector<int64_t>{s.P.d, s.Q.d} : p.sizes().vec());
}
torch::Tensor OffloadOptimizerBase::exp_avg_sq(const torch::Tensor& p) const {
  const ParamSlot& s = slot_of(p, "exp_avg_sq");
  return engine_->load_state(s.slot, StateKind::kExpAvgSq)
      .view(s.projected ? std::vector<int64_t>{s.P.d, s.Q.d} : p.sizes().vec());
}
torch::Tensor OffloadOptimizerBase::master(const torch::Tensor& p) const {
  const ParamSlot& s = slot_of(p, "master");
  if (s.projected) return {};
  return engine_->load_state(s.slot, StateKind::kMaster).view(p.sizes());
}
const SparseProjector& OffloadOptimizerBase::row_projector(const torch::Tensor& p) const {
  const ParamSlot& s = slot_of(p, "row_projector");
  LSPO_CHECK(s.projected, name_, "::row_projector: parameter ", s.slot, " is not projected");
  return s.P;
}
const SparseProjector& OffloadOptimizerBase::col_projector(const torch::Tensor& p) const {
  const ParamSlot& s = slot_of(p, "col_projector");
  LSPO_CHECK(s.projected, name_, "::col_projector: parameter ", s.slot, " is not projected");
  return s.Q;
}

// ---------------------------------------------------------------- the two optimizers
OffloadAdamW::OffloadAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                           OffloadAdamWOptions d)
    : OffloadOptimizerBase(param_groups, std::make_unique<OffloadAdamWOptions>(d), "OffloadAdamW",
                           Global{d.max_grad_norm(), d.overlap(), d.record_timeline(), d.pinned_limit_bytes(), 0,
                                  d.state_dir(), d.host_memory_limit_bytes()}) {
  hyper(defaults());
  sync_slots();
}

OffloadOptimizerBase::Hyper OffloadAdamW::hyper(const torch::optim::OptimizerOptions& options) const {
  const auto* o = dynamic_cast<const OffloadAdamWOptions*>(&options);
  LSPO_CHECK(o, "OffloadAdamW: a param group's options are not lspo::OffloadAdamWOptions");
  Hyper h;
  fill_common(h, *o, "OffloadAdamW");
  return h;
}

LSPAdamW::LSPAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, LSPAdamWOptions d)
    : OffloadOptimizerBase(param_groups, std::make_unique<LSPAdamWOptions>(d), "LSPAdamW",
                           Global{d.max_grad_norm(), d.overlap(), d.record_timeline(), d.pinned_limit_bytes(),
                                  d.seed(), d.state_dir(), d.host_memory_limit_bytes()}) {
  LSPO_CHECK(d.seed() >= 0, "LSPAdamW: seed must be >= 0, got ", d.seed());
  hyper(defaults());
  sync_slots();
}

OffloadOptimizerBase::Hyper LSPAdamW::hyper(const torch::optim::OptimizerOptions& options) const {
  const auto* o = dynamic_cast<const LSPAdamWOptions*>(&options);
  LSPO_CHECK(o, "LSPAdamW: a param group's options are not lspo::LSPAdamWOptions");
  Hyper h;
  fill_common(h, *o, "LSPAdamW");
  h.lsp = true;
  h.project = o->project();
  h.subspace = o->subspace();
  h.nnz = o->nnz();
  h.min_dim = o->min_dim();
  h.refit_every = o->refit_every();
  h.refit_threshold = o->refit_threshold();
  h.refit_iters = o->refit_iters();
  h.refit_lr = o->refit_lr();
  LSPO_CHECK(h.subspace >= 1, "LSPAdamW: subspace must be >= 1, got ", h.subspace);
  LSPO_CHECK(h.nnz >= 1 && h.nnz <= h.subspace, "LSPAdamW: nnz must be in [1, subspace = ", h.subspace, "], got ",
             h.nnz);
  LSPO_CHECK(h.min_dim >= 0, "LSPAdamW: min_dim must be >= 0 (0: = subspace), got ", h.min_dim);
  LSPO_CHECK(h.min_dim == 0 || h.min_dim >= h.nnz, "LSPAdamW: min_dim (", h.min_dim, ") must be >= nnz (", h.nnz,
             "): a projector of a dimension smaller than nnz cannot have nnz nonzeros per row");
  LSPO_CHECK(h.refit_every >= 0, "LSPAdamW: refit_every must be >= 0 (0: never), got ", h.refit_every);
  LSPO_CHECK(std::isfinite(h.refit_threshold) && h.refit_threshold >= 0,
             "LSPAdamW: refit_threshold must be a finite value >= 0, got ", h.refit_threshold);
  LSPO_CHECK(h.refit_iters >= 1, "LSPAdamW: refit_iters must be >= 1, got ", h.refit_iters);
  LSPO_CHECK(std::isfinite(h.refit_lr) && h.refit_lr > 0, "LSPAdamW: refit_lr must be a finite value > 0, got ",
             h.refit_lr);
  return h;
}

}  // namespace lspo
