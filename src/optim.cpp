// lspo::OffloadAdamW / lspo::LSPAdamW (lspo/optim.h): registration, the step
// pipeline, options. Serialisation (save/load) lives in optim_serialize.cpp.
#include "lspo/optim.h"

#include <torch/csrc/autograd/variable.h>

#include <cmath>
#include <limits>
#include <map>
#include <sstream>

namespace lspo {

namespace {

using detail::shape_str;

void check_common(const char* name, double lr, double b1, double b2, double eps, double wd) {
  LSPO_CHECK(std::isfinite(lr) && lr >= 0, name, ": invalid lr ", lr, " (need a finite value >= 0)");
  LSPO_CHECK(std::isfinite(eps) && eps >= 0, name, ": invalid eps ", eps, " (need >= 0)");
  LSPO_CHECK(b1 >= 0 && b1 < 1, name, ": invalid betas[0] ", b1, " (need 0 <= beta < 1)");
  LSPO_CHECK(b2 >= 0 && b2 < 1, name, ": invalid betas[1] ", b2, " (need 0 <= beta < 1)");
  LSPO_CHECK(std::isfinite(wd) && wd >= 0, name, ": invalid weight_decay ", wd, " (need >= 0)");
}

// The AdamW hyper-parameters both optimizers' options share, read into a Hyper
// and checked.
template <class H, class O>
void fill_common(H& h, const O& o, const char* name) {
  h.lr = o.lr();
  h.beta1 = std::get<0>(o.betas());
  h.beta2 = std::get<1>(o.betas());
  h.eps = o.eps();
  h.weight_decay = o.weight_decay();
  check_common(name, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay);
}

}  // namespace

// ---------------------------------------------------------------- options
OffloadAdamWOptions::OffloadAdamWOptions(double lr) : lr_(lr) {}
double OffloadAdamWOptions::get_lr() const { return lr(); }
void OffloadAdamWOptions::set_lr(const double lr) { this->lr(lr); }
LSPAdamWOptions::LSPAdamWOptions(double lr) : lr_(lr) {}
double LSPAdamWOptions::get_lr() const { return lr(); }
void LSPAdamWOptions::set_lr(const double lr) { this->lr(lr); }

// ----------------------------------------------------------------
// construction, registration
namespace {

// The post-accumulate-grad hook of a parameter: one call into the core per
// gradient. A tensor has one such hook: one that was there before (another
// optimizer's) is chained and runs first. A hook whose optimizer is gone does
// nothing (it holds the core weakly).
struct CoreGradHook : torch::autograd::PostAccumulateGradHook {
  CoreGradHook(std::weak_ptr<OptimizerCore> core, int64_t slot,
               std::unique_ptr<torch::autograd::PostAccumulateGradHook> next)
      : core_(std::move(core)), slot_(slot), next_(std::move(next)) {}
  void operator()(const torch::autograd::Variable& param) override {
    if (next_) (*next_)(param);
    if (auto c = core_.lock()) c->on_grad(slot_);
  }
  std::weak_ptr<OptimizerCore> core_;
  int64_t slot_;
  std::unique_ptr<torch::autograd::PostAccumulateGradHook> next_;
};

}  // namespace

OffloadOptimizerBase::OffloadOptimizerBase(const std::vector<torch::optim::OptimizerParamGroup>& groups,
                                           std::unique_ptr<torch::optim::OptimizerOptions> defaults, const char* name,
                                           Global global)
    : torch::optim::Optimizer(groups, std::move(defaults)), name_(name) {
  LSPO_CHECK(global.pinned_limit_bytes >= 0, name, ": pinned_limit_bytes must be >= 0, got ",
             global.pinned_limit_bytes);
  CoreOptions co;
  co.name = name;
  co.overlap = global.overlap;
  co.record_timeline = global.record_timeline;
  co.pinned_limit_bytes = global.pinned_limit_bytes;
  co.max_grad_norm = global.max_grad_norm;
  co.seed = static_cast<uint64_t>(global.seed);
  co.state_dir = global.state_dir;
  co.host_memory_limit_bytes = global.host_memory_limit_bytes;
  co.resume = global.resume;
  LSPO_CHECK(!global.resume || !global.state_dir.empty(), name, ": resume needs a state_dir");
  co.whiten = global.whiten;
  co.update_scale = global.scale;
  co.scale_auto = global.scale_auto;
  co.refit_diagnostics = global.refit_diagnostics;
  co.refit_stagger = global.refit_stagger;
  co.one_sided = global.one_sided;
  co.basis = parse_basis(global.basis, name);
  core_ = std::make_shared<OptimizerCore>(co);
}

OffloadOptimizerBase::~OffloadOptimizerBase() {
  // the hooks hold a weak reference to the core; remove ours so the parameters
  // stay clean
  for (const auto& p : params_) {
    auto& h = torch::autograd::impl::post_acc_grad_hooks(p);
    auto* mine = dynamic_cast<CoreGradHook*>(h.get());
    if (mine && mine->core_.lock() == core_)  // ours on top: restore what it chained
      torch::autograd::impl::set_post_acc_grad_hooks(p, std::move(mine->next_));
  }
}

void OffloadOptimizerBase::sync_slots() {
  for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
    auto& group = param_groups_[gi];
    const Hyper h = hyper(group.options());
    for (const torch::Tensor& p : group.params()) {
      LSPO_CHECK(p.defined(), name_, ": param group ", gi, " holds an undefined tensor");
      auto it = index_.find(p.unsafeGetTensorImpl());
      if (it != index_.end()) {
        LSPO_CHECK(group_of_[it->second] == gi, name_, ": a parameter (sizes ", shape_str(p),
                   ") appears in more than one param group (", group_of_[it->second], " and ", gi, ")");
        continue;
      }
      const int64_t idx = static_cast<int64_t>(params_.size());
      const int64_t min_dim = h.min_dim > 0 ? h.min_dim : h.subspace;
      bool projected = false;
      if (h.lsp && h.project.has_value()) {
        LSPO_CHECK(!*h.project || (p.dim() == 2 && p.size(0) >= h.nnz && p.size(1) >= h.nnz), name_,
                   ": cannot project parameter ", idx, " of sizes ", shape_str(p), " (project(true) needs 2-D with ",
                   "both dims >= nnz = ", h.nnz, ")");
        projected = *h.project;
      } else if (h.lsp) {
        projected = p.dim() == 2 && p.size(0) >= min_dim && p.size(1) >= min_dim && p.requires_grad();
      }
      const int64_t slot = core_->add_param(p, static_cast<int64_t>(gi), projected, h.subspace, h.nnz);
      LSPO_CHECK(slot == idx, name_, ": internal: slot ", slot, " for parameter ", idx);
      if (p.requires_grad()) {
        auto prev = std::move(torch::autograd::impl::post_acc_grad_hooks(p));
        torch::autograd::impl::set_post_acc_grad_hooks(p, std::make_unique<CoreGradHook>(core_, slot, std::move(prev)));
      }
      index_[p.unsafeGetTensorImpl()] = idx;
      group_of_.push_back(gi);
      params_.push_back(p);
    }
  }
  sync_groups();
  if (!core_->engine().options().state_dir.empty()) core_->allocate_all();  // disk tier: placement in order
}

void OffloadOptimizerBase::sync_groups() {
  std::vector<GroupHyper> gs;
  for (auto& group : param_groups_) {
    const Hyper h = hyper(group.options());
    GroupHyper g;
    g.lr = h.lr;
    g.beta1 = h.beta1;
    g.beta2 = h.beta2;
    g.eps = h.eps;
    g.weight_decay = h.weight_decay;
    if (h.lsp) {
      g.refit_every = h.refit_every;
      g.refit_threshold = h.refit_threshold;
      g.refit_iters = h.refit_iters;
      g.refit_lr = h.refit_lr;
      g.refit_l2 = h.refit_l2;
      g.refit_drift = h.refit_drift;
      g.refit_reinit = h.refit_reinit;
    }
    gs.push_back(g);
  }
  core_->set_groups(std::move(gs));
}

void OffloadOptimizerBase::resume_from_state_dir() {
  torch::NoGradGuard ng;
  core_->resume();  // step counts, weights (and projectors) of the directory's
                    // last committed step
  refresh_state();
}

void OffloadOptimizerBase::refresh_state() {
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto slot = static_cast<int64_t>(i);
    if (core_->on_disk(slot)) {  // only the step: reading the files every step
                                 // would be a second pass of I/O
      auto ps = std::make_unique<OffloadParamState>();
      ps->step(core_->step_count(slot));
      state_[params_[i].unsafeGetTensorImpl()] = std::move(ps);
      continue;
    }
    auto st = core_->state(slot, /*copy=*/false);
    if (!st) continue;
    auto ps = std::make_unique<OffloadParamState>();
    ps->step(st->step);
    ps->exp_avg(st->exp_avg);
    ps->exp_avg_sq(st->exp_avg_sq);
    if (st->master_param.defined()) ps->master(st->master_param);
    state_[params_[i].unsafeGetTensorImpl()] = std::move(ps);
  }
}

// ---------------------------------------------------------------- the step
torch::Tensor OffloadOptimizerBase::step(LossClosure closure) {
  torch::Tensor loss;
  if (closure) {
    torch::AutoGradMode grad_on(true);
    loss = closure();
  }
  sync_slots();
  StepInputs in;
  in.amp_scale = grad_scale_;
  const StepResult r = core_->step(in);
  if (r.ran && !r.skipped) refresh_state();
  return loss;
}

void OffloadOptimizerBase::zero_grad(bool set_to_none) {
  torch::optim::Optimizer::zero_grad(set_to_none);
  core_->zero_grad();
}

int64_t OffloadOptimizerBase::refits() const {
  int64_t n = 0;
  for (const auto& r : core_->refits()) n += r.result.kept ? 1 : 0;
  return n;
}

// ----------------------------------------------------------------
// introspection
int64_t OffloadOptimizerBase::slot_of(const torch::Tensor& param, const char* fn) const {
  auto it = param.defined() ? index_.find(param.unsafeGetTensorImpl()) : index_.end();
  LSPO_CHECK(it != index_.end(), name_, "::", fn, ": the tensor is not a parameter of this optimizer");
  return it->second;
}

int64_t OffloadOptimizerBase::step_count(const torch::Tensor& p) const {
  return core_->step_count(slot_of(p, "step_count"));
}
bool OffloadOptimizerBase::is_projected(const torch::Tensor& p) const {
  return core_->is_projected(slot_of(p, "is_projected"));
}
torch::Tensor OffloadOptimizerBase::exp_avg(const torch::Tensor& p) const {
  auto st = core_->state(slot_of(p, "exp_avg"), true);
  return st ? st->exp_avg : torch::Tensor();
}
torch::Tensor OffloadOptimizerBase::exp_avg_sq(const torch::Tensor& p) const {
  auto st = core_->state(slot_of(p, "exp_avg_sq"), true);
  return st ? st->exp_avg_sq : torch::Tensor();
}
torch::Tensor OffloadOptimizerBase::master(const torch::Tensor& p) const {
  auto st = core_->state(slot_of(p, "master"), true);
  return st ? st->master_param : torch::Tensor();
}
SparseProjector OffloadOptimizerBase::row_projector(const torch::Tensor& p) const {
  return core_->projectors(slot_of(p, "row_projector")).first;
}
SparseProjector OffloadOptimizerBase::col_projector(const torch::Tensor& p) const {
  return core_->projectors(slot_of(p, "col_projector")).second;
}

// ---------------------------------------------------------------- the two
// optimizers
OffloadAdamW::OffloadAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, OffloadAdamWOptions d)
    : OffloadOptimizerBase(param_groups, std::make_unique<OffloadAdamWOptions>(d), "OffloadAdamW",
                           Global{d.max_grad_norm(), d.overlap(), d.record_timeline(), d.pinned_limit_bytes(), 0,
                                  d.state_dir(), d.host_memory_limit_bytes(), d.resume()}) {
  LSPO_CHECK(!std::isnan(d.max_grad_norm()), "OffloadAdamW: max_grad_norm is NaN (use <= 0 to disable clipping)");
  hyper(defaults());
  sync_slots();
  if (d.resume()) resume_from_state_dir();
}

OffloadOptimizerBase::Hyper OffloadAdamW::hyper(const torch::optim::OptimizerOptions& options) const {
  const auto* o = dynamic_cast<const OffloadAdamWOptions*>(&options);
  LSPO_CHECK(o,
             "OffloadAdamW: a param group's options are not "
             "lspo::OffloadAdamWOptions");
  Hyper h;
  fill_common(h, *o, "OffloadAdamW");
  return h;
}

LSPAdamW::LSPAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, LSPAdamWOptions d)
    : OffloadOptimizerBase(param_groups, std::make_unique<LSPAdamWOptions>(d), "LSPAdamW",
                           Global{d.max_grad_norm(), d.overlap(), d.record_timeline(), d.pinned_limit_bytes(), d.seed(),
                                  d.state_dir(), d.host_memory_limit_bytes(), d.resume(), d.whiten(), d.scale_auto(),
                                  d.refit_diagnostics(), d.refit_stagger(), d.scale(), d.one_sided(), d.basis()}) {
  LSPO_CHECK(d.seed() >= 0, "LSPAdamW: seed must be >= 0, got ", d.seed());
  LSPO_CHECK(!d.scale() || (std::isfinite(*d.scale()) && *d.scale() > 0), "LSPAdamW: scale must be a finite value > 0, got ",
             d.scale().value_or(0.0));
  hyper(defaults());
  sync_slots();
  if (d.resume()) resume_from_state_dir();
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
  h.refit_l2 = o->refit_l2();
  h.refit_drift = o->refit_drift();
  h.refit_reinit = lspo::parse_reinit(o->refit_reinit(), "LSPAdamW");
  LSPO_CHECK(h.subspace >= 1, "LSPAdamW: subspace must be >= 1, got ", h.subspace);
  LSPO_CHECK(h.nnz >= 1 && h.nnz <= h.subspace, "LSPAdamW: nnz must be in [1, subspace = ", h.subspace, "], got ",
             h.nnz);
  LSPO_CHECK(h.min_dim >= 0, "LSPAdamW: min_dim must be >= 0 (0: = subspace), got ", h.min_dim);
  LSPO_CHECK(h.min_dim == 0 || h.min_dim >= h.nnz, "LSPAdamW: min_dim (", h.min_dim, ") must be >= nnz (", h.nnz,
             "): a projector of a dimension smaller than nnz cannot have nnz "
             "nonzeros per row");
  LSPO_CHECK(h.refit_every >= 0, "LSPAdamW: refit_every must be >= 0 (0: never), got ", h.refit_every);
  LSPO_CHECK(std::isfinite(h.refit_threshold) && h.refit_threshold >= 0,
             "LSPAdamW: refit_threshold must be a finite value >= 0, got ", h.refit_threshold);
  LSPO_CHECK(h.refit_iters >= 1, "LSPAdamW: refit_iters must be >= 1, got ", h.refit_iters);
  LSPO_CHECK(std::isfinite(h.refit_lr) && h.refit_lr > 0, "LSPAdamW: refit_lr must be a finite value > 0, got ",
             h.refit_lr);
  LSPO_CHECK(std::isfinite(h.refit_l2) && h.refit_l2 >= 0, "LSPAdamW: refit_l2 must be a finite value >= 0, got ",
             h.refit_l2);
  LSPO_CHECK(std::isfinite(h.refit_drift) && h.refit_drift >= 0,
             "LSPAdamW: refit_drift must be a finite value >= 0, got ", h.refit_drift);
  return h;
}

}  // namespace lspo
