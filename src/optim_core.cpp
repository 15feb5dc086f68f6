// The optimizer core (lspo/optim_core.h): slots, the per-gradient pipeline, the
// step boundary. State import/export lives in optim_core_state.cpp, the CUDA
// copy plumbing in optim_core_copy.cpp.
#include "lspo/optim_core.h"

#include <torch/csrc/autograd/variable.h>

#include <cmath>
#include <limits>
#include <map>
#include <sstream>

#include "optim_core_internal.h"

namespace lspo {

namespace {

using detail::shape_str;

torch::Tensor norm_fp32(const torch::Tensor& t) {
  return torch::linalg_vector_norm(t, 2, c10::nullopt, false, torch::kFloat);
}

// 0-dim tensors on any devices -> host doubles, one device->host transfer per
// device.
std::vector<double> to_host(const std::vector<torch::Tensor>& xs) {
  std::vector<double> out(xs.size());
  std::map<std::string, std::vector<size_t>> by_dev;
  for (size_t i = 0; i < xs.size(); ++i) by_dev[xs[i].device().str()].push_back(i);
  for (const auto& kv : by_dev) {
    std::vector<torch::Tensor> v;
    for (size_t i : kv.second) v.push_back(xs[i].to(torch::kFloat));
    torch::Tensor host = torch::stack(v).to(torch::kCPU, torch::kDouble).contiguous();
    const double* h = host.data_ptr<double>();
    for (size_t k = 0; k < kv.second.size(); ++k) out[kv.second[k]] = h[k];
  }
  return out;
}

}  // namespace

bool SpecKey::operator==(const SpecKey& o) const {
  return step == o.step && lr == o.lr && beta1 == o.beta1 && beta2 == o.beta2 && eps == o.eps &&
         weight_decay == o.weight_decay && grad_scale == o.grad_scale;
}

OptimizerCore::OptimizerCore(CoreOptions opt) : impl_(std::make_unique<Impl>()) {
  LSPO_CHECK(!std::isnan(opt.max_grad_norm), opt.name, ": max_grad_norm is NaN (use <= 0 to disable clipping)");
  LSPO_CHECK(opt.pinned_limit_bytes >= 0, opt.name, ": pinned_limit_bytes must be >= 0, got ", opt.pinned_limit_bytes);
  impl_->opt = opt;
  EngineOptions eo;
  eo.overlap = opt.overlap;
  eo.record_timeline = opt.record_timeline;
  eo.pinned_limit_bytes = opt.pinned_limit_bytes;
  eo.state_dir = opt.state_dir;
  eo.host_memory_limit_bytes = opt.host_memory_limit_bytes;
  eo.resume = opt.resume;
  LSPO_CHECK(!opt.resume || !opt.state_dir.empty(), opt.name, ": resume needs a state_dir");
  impl_->engine = std::make_unique<OffloadEngine>(eo);
}

OptimizerCore::~OptimizerCore() {
  if (!impl_) return;
  try {
    impl_->engine->wait_all();
  } catch (...) {
  }
}

OffloadEngine& OptimizerCore::engine() { return *impl_->engine; }
const OffloadEngine& OptimizerCore::engine() const { return *impl_->engine; }
int64_t OptimizerCore::num_slots() const {
  std::lock_guard<std::mutex> g(impl_->mu);
  return static_cast<int64_t>(impl_->slots.size());
}

CoreSlot& OptimizerCore::Impl::slot(int64_t i, const char* fn) const {
  LSPO_CHECK(i >= 0 && i < static_cast<int64_t>(slots.size()), opt.name, "::", fn, ": no slot ", i, " (", slots.size(),
             " registered)");
  return *slots[i];
}

double default_update_scale(ProjectorBasis basis) { return basis == ProjectorBasis::kSvd ? 3.0 : 1.0; }

int64_t square_state_bytes(int64_t m, int64_t n, int64_t d, int64_t r, bool whitened) {
  LSPO_CHECK(m >= 1 && n >= 1 && d >= 1 && r >= 1, "square_state_bytes: sizes must be >= 1");
  const int64_t dP = std::min(d, m), dQ = std::min(d, n);
  return 8 * dP * dQ + 8 * r * (m + n) + (whitened ? 4 : 0) * (dP * dP + dQ * dQ);
}

int64_t one_sided_rank(int64_t m, int64_t n, int64_t d, int64_t r, bool whitened, bool dense) {
  LSPO_CHECK(m >= 1 && n >= 1 && d >= 1 && r >= 1, "one_sided_rank: sizes must be >= 1");
  const int64_t big = std::max(m, n), small = std::min(m, n);
  const int64_t w = whitened ? 4 : 0;
  const int64_t budget = square_state_bytes(m, n, d, r, whitened);
  // moments 8 big k, the whole side's identity 8 big, the projected side: a (k, r)-sparse ELL (8 r small)
  // and its whitening factor, or a dense basis with shared positions (4 k small + 4 k, no factor)
  auto cost = [&](int64_t k) {
    return 8 * big * k + 8 * big + (dense ? 4 * k * small + 4 * k : 8 * r * small + w * k * k);
  };
  int64_t k = std::min(r, small);
  while (k < small && cost(k + 1) <= budget) ++k;
  return k;
}

int64_t OptimizerCore::add_param(const torch::Tensor& p, int64_t group, bool projected, int64_t subspace, int64_t nnz) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> g(I.mu);
  const std::string& nm = I.opt.name;
  LSPO_CHECK(p.defined(), nm, ": a parameter is an undefined tensor");
  const int64_t idx = static_cast<int64_t>(I.slots.size());
  const auto dt = p.scalar_type();
  LSPO_CHECK(dt == torch::kFloat || dt == torch::kBFloat16 || dt == torch::kHalf, nm, ": parameter ", idx, " (sizes ",
             shape_str(p), ") has dtype ", dt, "; need float32, bfloat16 or float16");
  LSPO_CHECK(group >= 0, nm, ": group index must be >= 0");
  auto s = std::make_unique<CoreSlot>();
  s->param = p;
  s->group = group;
  s->index = idx;
  s->projected = projected;
  if (projected) {
    LSPO_CHECK(p.dim() == 2, nm, ": cannot project parameter ", idx, " of sizes ", shape_str(p), " (need 2-D)");
    LSPO_CHECK(nnz >= 1 && subspace >= nnz, nm, ": invalid projector size subspace=", subspace, ", nnz=", nnz);
    LSPO_CHECK(p.size(0) >= nnz && p.size(1) >= nnz, nm, ": cannot project parameter ", idx, " of sizes ", shape_str(p),
               " (both dims must be >= nnz = ", nnz, ")");
    LSPO_CHECK(dt != torch::kHalf, nm, ": projected parameter ", idx, " (sizes ", shape_str(p),
               ") is float16; projected weights must be float32 or bfloat16");
    LSPO_CHECK(p.is_contiguous(), nm, ": projected parameter ", idx, " (sizes ", shape_str(p),
               ") must be contiguous (it is updated in place)");
    const int64_t k = I.num_projected++;
    s->number = k;
    // square layout: min(d, m) x min(d, n); one-sided: the larger side whole (identity), the other one_sided_rank
    const int64_t m = p.size(0), n = p.size(1);
    const bool whole_rows = I.opt.one_sided && m >= n, whole_cols = I.opt.one_sided && m < n;
    const bool dense = I.opt.basis == ProjectorBasis::kSvd;  // dense orthonormal sides (dense_basis)
    const int64_t k1 = I.opt.one_sided ? one_sided_rank(m, n, subspace, nnz, I.opt.whiten, dense) : 0;
    auto side = [&](int64_t size, int64_t d, bool whole, uint64_t seed) {
      if (whole) return SparseProjector::identity(size, p.device());
      if (dense) return SparseProjector::dense_basis(size, d, seed, p.device());
      return SparseProjector::random(size, d, nnz, seed, p.device(), ProjectorInit::kGaussian, I.opt.whiten);
    };
    s->P = side(m, whole_cols ? k1 : std::min(subspace, m), whole_rows, I.opt.seed + 2 * k);
    s->Q = side(n, whole_rows ? k1 : std::min(subspace, n), whole_cols, I.opt.seed + 2 * k + 1);
    s->scale = I.opt.scale_auto ? std::sqrt(static_cast<double>(p.size(0)) * static_cast<double>(p.size(1)) /
                                            static_cast<double>(s->P.d * s->Q.d))
                                : I.opt.update_scale.value_or(default_update_scale(I.opt.basis));
    std::ostringstream os;
    os << "lsp" << k << ":" << shape_str(p) << "->" << s->P.d << "x" << s->Q.d;
    s->name = os.str();
  } else {
    s->name = "param" + std::to_string(idx) + ":" + shape_str(p);
  }
  if (I.comm) I.assign_owner(*s);
  I.slots.push_back(std::move(s));
  return idx;
}

void OptimizerCore::set_groups(std::vector<GroupHyper> groups) {
  std::lock_guard<std::mutex> g(impl_->mu);
  for (size_t i = 0; i < groups.size(); ++i) {
    const GroupHyper& h = groups[i];
    const std::string& nm = impl_->opt.name;
    LSPO_CHECK(std::isfinite(h.lr) && h.lr >= 0, nm, ": invalid lr ", h.lr, " in group ", i);
    LSPO_CHECK(std::isfinite(h.eps) && h.eps >= 0, nm, ": invalid eps ", h.eps, " in group ", i);
    LSPO_CHECK(h.beta1 >= 0 && h.beta1 < 1 && h.beta2 >= 0 && h.beta2 < 1, nm, ": invalid betas (", h.beta1, ", ",
               h.beta2, ") in group ", i, " (need 0 <= beta < 1)");
    LSPO_CHECK(std::isfinite(h.weight_decay) && h.weight_decay >= 0, nm, ": invalid weight_decay ", h.weight_decay,
               " in group ", i);
    LSPO_CHECK(h.refit_every >= 0 && h.refit_iters >= 1 && h.refit_threshold >= 0 && h.refit_lr > 0 &&
                   h.refit_l2 >= 0 && h.refit_drift >= 0,
               nm, ": invalid refit options in group ", i,
               " (need refit_every >= 0, refit_iters >= 1, refit_threshold >= "
               "0, refit_lr > 0, refit_l2 >= 0, "
               "refit_drift >= 0)");
  }
  impl_->groups = std::move(groups);
}

void OptimizerCore::set_max_grad_norm(double v) {
  LSPO_CHECK(!std::isnan(v), impl_->opt.name, ": max_grad_norm is NaN (use <= 0 to disable clipping)");
  std::lock_guard<std::mutex> g(impl_->mu);
  impl_->opt.max_grad_norm = v;
}

const GroupHyper& OptimizerCore::Impl::hyper(const CoreSlot& s) const {
  LSPO_CHECK(s.group < static_cast<int64_t>(groups.size()), opt.name, ": slot '", s.name, "' is in group ", s.group,
             " but only ", groups.size(), " group(s) were set (set_groups)");
  return groups[s.group];
}

bool OptimizerCore::Impl::refit_pending(const CoreSlot& s) const {
  if (!s.projected || s.group >= static_cast<int64_t>(groups.size())) return false;
  const int64_t k = groups[s.group].refit_every;
  if (k <= 0) return false;
  // the next step t = step + 1 is a check when (t - 1 - offset) % k == 0, t - 1 >= offset; staggered,
  // projected slot number j has offset j % k, so about 1/k of the layers hold dense sums at a time
  const int64_t off = opt.refit_stagger ? s.number % k : 0;
  return s.step >= off && (s.step - off) % k == 0;
}

SpecKey OptimizerCore::Impl::key(const CoreSlot& s, int64_t step, double grad_scale) const {
  const GroupHyper& h = hyper(s);
  // projected: weight decay is applied to W on its device, not in the subspace
  return SpecKey{step, h.lr, h.beta1, h.beta2, h.eps, s.projected ? 0.0 : h.weight_decay, grad_scale};
}

void OptimizerCore::Impl::ensure_allocated(CoreSlot& s) {
  if (s.eslot >= 0 || !owns(s)) return;  // data parallel: host state only for the slots this rank owns
  if (s.projected) {
    s.eslot = engine->add_slot(s.name, torch::Tensor(), s.P.d * s.Q.d, torch::kFloat, torch::kFloat, s.index);
  } else {
    const auto dt = s.param.scalar_type();
    torch::Tensor master = part(s, s.param.detach());  // data parallel: a split slot's range
    s.eslot = engine->add_slot(s.name, master, master.numel(), dt, dt, s.index);
    s.param_version = s.param._version();
  }
}

// Weights changed in place since the host master was last written
// (model.load_state_dict after the optimizer was built, ...): adopt them, as
// torch's AdamW (which steps the parameter itself) does. A bf16/fp16 parameter
// that still equals its master's rounding keeps the more precise master.
void OptimizerCore::Impl::sync_master(CoreSlot& s) {
  if (s.projected || s.eslot < 0) return;
  const auto v = s.param._version();
  if (v == s.param_version) return;
  engine->wait(s.eslot);
  torch::Tensor master = engine->load_state(s.eslot, StateKind::kMaster);
  torch::Tensor w = part(s, s.param.detach()).reshape(-1).to(torch::kCPU);
  const bool same =
      w.scalar_type() == torch::kFloat ? torch::equal(w, master) : torch::equal(w, master.to(w.scalar_type()));
  if (!same) engine->store_state(s.eslot, StateKind::kMaster, w.to(torch::kFloat));
  s.param_version = v;
  s.has_spec = false;
}

void OptimizerCore::Impl::submit(CoreSlot& s, const SpecKey& k) {
  const GroupHyper& h = hyper(s);
  AdamConfig c;
  c.lr = h.lr;
  c.beta1 = h.beta1;
  c.beta2 = h.beta2;
  c.eps = h.eps;
  c.weight_decay = k.weight_decay;
  c.adamw_mode = true;
  c.bias_correction = true;
  c.grad_scale = k.grad_scale;
  wait_upload(s);  // the job rewrites out_buffer: its previous upload must be done
  engine->submit(s.eslot, c, k.step, ready_event(s));
  s.has_spec = true;
  s.spec = k;
}

// ---------------------------------------------------------------- backward
void OptimizerCore::on_grad(int64_t i) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lk(I.mu);
  CoreSlot& s = I.slot(i, "on_grad");
  torch::NoGradGuard ng;
  torch::Tensor g = s.param.grad();
  if (!g.defined()) return;
  LSPO_CHECK(!g.is_sparse(), I.opt.name, ": parameter '", s.name, "' has a sparse gradient (not supported)");
  LSPO_CHECK(g.sizes() == s.param.sizes(), I.opt.name, ": the gradient of '", s.name, "' has sizes ", shape_str(g),
             " but the parameter ", shape_str(s.param));
  s.host_fresh = false;
  if (s.projected) {
    if (I.refit_pending(s)) {  // a refit-check step: the dense gradient joins
                               // the fit / held-out sum
      I.add_dense(s, g);
      s.param.mutable_grad() = torch::Tensor();
      return;
    }
    I.ensure_allocated(s);
    const double t0 = I.engine->now_us();
    torch::Tensor S = compress(s.P, s.Q, g);
    s.param.mutable_grad() = torch::Tensor();  // the dense gradient is not needed any more
    if (!S.is_cuda()) I.engine->add_event("compress", s.name, 0, t0, I.engine->now_us());
    I.accumulate(s, S, /*owned=*/true);
    return;
  }
  if (!I.opt.overlap || I.comm) return;  // serial schedule or data parallel: everything happens in step()
  I.ensure_allocated(s);
  I.sync_master(s);
  I.copy_to_host(s, g);
  I.submit(s, I.key(s, s.step + 1, I.spec_scale));
}

void OptimizerCore::on_compressed(int64_t i, const torch::Tensor& S) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lk(I.mu);
  CoreSlot& s = I.slot(i, "on_compressed");
  LSPO_CHECK(s.projected, I.opt.name, ": on_compressed for '", s.name, "', which is not projected");
  LSPO_CHECK(S.defined() && S.dim() == 2 && S.size(0) == s.P.d && S.size(1) == s.Q.d, I.opt.name,
             ": the compressed gradient of '", s.name, "' must be [", s.P.d, ", ", s.Q.d, "], got ",
             S.defined() ? shape_str(S) : std::string("undefined"));
  LSPO_CHECK(S.device() == s.param.device(), I.opt.name, ": the compressed gradient of '", s.name, "' is on ",
             S.device(), ", the weight on ", s.param.device());
  LSPO_CHECK(!I.refit_pending(s), I.opt.name, ": '", s.name, "' is on a refit step and needs its dense gradient ",
             "(dense_this_step() is true): a compressed gradient cannot be refitted");
  torch::NoGradGuard ng;
  I.ensure_allocated(s);
  I.accumulate(s, S.detach().to(torch::kFloat), /*owned=*/false);
}

void OptimizerCore::Impl::accumulate(CoreSlot& s, const torch::Tensor& S, bool owned) {
  s.host_fresh = false;
  if (s.acc_count == 0) {
    s.acc = owned ? S.contiguous() : S.clone(at::MemoryFormat::Contiguous);
  } else {
    before_acc_write(s);  // the previous D2H of acc must finish before acc changes (CUDA)
    s.acc.add_(S);
  }
  s.acc_count += 1;
  if (!opt.overlap || comm) return;  // data parallel: Adam must see the reduced S (step())
  copy_to_host(s, s.acc);
  submit(s, key(s, s.step + 1, spec_scale));
}

bool OptimizerCore::dense_this_step(int64_t i) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->refit_pending(*impl_->slots.at(i));
}

// ---------------------------------------------------------------- the step
// boundary
bool OptimizerCore::Impl::has_grad(const CoreSlot& s) const {
  // projected: compressed micro-batches, and/or a dense gradient the hooks did
  // not consume (a refit step, or gradients assigned without backward)
  return (s.projected && (s.acc_count > 0 || s.dense_count > 0)) || s.param.grad().defined();
}

void OptimizerCore::Impl::add_dense(CoreSlot& s, const torch::Tensor& g) {
  torch::Tensor& sum = s.dense_count % 2 == 0 ? s.fit_sum : s.held_sum;
  if (sum.defined()) {
    sum.add_(g);
  } else {
    // in the gradient's dtype, as autograd itself accumulates (bf16 weights: half the memory of fp32)
    sum = g.clone(at::MemoryFormat::Contiguous);
  }
  s.dense_count += 1;
}

void OptimizerCore::Impl::drop(CoreSlot& s) {
  s.has_spec = false;
  s.host_fresh = false;
  if (s.projected) {
    s.acc_count = 0;
    s.acc = torch::Tensor();
    s.fit_sum = s.held_sum = torch::Tensor();
    s.dense_count = 0;
  }
}

StepResult OptimizerCore::step(const StepInputs& in) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lk(I.mu);
  torch::NoGradGuard ng;
  OffloadEngine& eng = *I.engine;
  const double t_step = eng.now_us();
  StepResult res;
  I.last_skipped = false;
  std::vector<CoreSlot*> live;
  for (auto& sp : I.slots)
    if (I.has_grad(*sp)) live.push_back(sp.get());
  if (live.empty()) {
    if (I.comm)  // data parallel: a rank without gradients must not leave the others waiting
      I.dist_check_live(live);
    return res;
  }
  res.ran = true;
  for (CoreSlot* s : live) {
    I.hyper(*s);  // every live slot's group was set
    if (s->param.grad().defined()) {
      const torch::Tensor& g = s->param.grad();
      LSPO_CHECK(!g.is_sparse(), I.opt.name, ": parameter '", s->name, "' has a sparse gradient (not supported)");
      LSPO_CHECK(g.sizes() == s->param.sizes(), I.opt.name, ": the gradient of '", s->name, "' has sizes ",
                 shape_str(g), " but the parameter ", shape_str(s->param));
    }
  }
  if (!in.amp_scale && in.unscaled_by_caller) {
    for (CoreSlot* s : live)
      LSPO_CHECK(!s->projected, I.opt.name,
                 ": GradScaler.unscale_(optimizer) before step() is not "
                 "supported: the projected layers' gradients "
                 "are compressed during backward. Call scaler.step(optimizer) "
                 "directly and clip with "
                 "max_grad_norm=...");
  }
  const double inv_scale = in.amp_scale ? 1.0 / *in.amp_scale : 1.0;
  if (I.comm) {  // data parallel: the same live slots everywhere, their gradients summed on the owners
    I.dist_check_live(live);
    I.dist_reduce(live);
  }

  // gradients assigned to a projected weight without backward (no hook ran) on
  // a check step join its sums
  for (CoreSlot* s : live)
    if (s->projected && s->param.grad().defined() && I.refit_pending(*s)) {
      I.add_dense(*s, s->param.grad());
      s->param.mutable_grad() = torch::Tensor();
    }

  // 1. norms of what each slot holds; any inf/NaN (or AMP's found_inf) skips
  // the whole step
  std::vector<torch::Tensor> nt,
      extra;  // extra: further tensors of a slot, checked for finiteness
  for (CoreSlot* s : live) {
    if (!I.owns(*s)) {  // data parallel: the owner measures, the sum over ranks below
      nt.push_back(torch::zeros({}, torch::kFloat));
      continue;
    }
    if (s->projected && s->dense_count > 0) {  // a check step's sums (the real norm is S's, after step 2)
      nt.push_back(norm_fp32(s->fit_sum));
      if (s->held_sum.defined()) extra.push_back(norm_fp32(s->held_sum));
      continue;
    }
    const bool acc = s->projected && s->acc_count > 0;
    nt.push_back(norm_fp32(acc ? s->acc : I.part(*s, s->param.grad())));
    if (acc && s->param.grad().defined()) extra.push_back(norm_fp32(s->param.grad()));
  }
  std::vector<double> norms = to_host(nt);
  bool finite = !in.found_inf;
  if (!extra.empty())
    for (double n : to_host(extra)) finite = finite && std::isfinite(n);
  if (I.comm) {  // every rank: the same norms and the same skip decision
    norms.push_back(finite ? 0.0 : 1.0);
    I.dist_norms(norms, live);
    finite = norms.back() == 0.0;
    norms.pop_back();
  }
  for (double n : norms) finite = finite && std::isfinite(n);
  if (!finite) {
    eng.wait_all();
    for (CoreSlot* s : live) I.drop(*s);
    I.last_skipped = true;
    I.skipped += 1;
    I.last_norm = std::numeric_limits<double>::quiet_NaN();
    res.skipped = true;
    res.grad_norm = I.last_norm;
    return res;
  }

  try {
    // 2. projected slots holding dense gradients: a check step's sums (refit
    // check, then compressed), or a gradient assigned without backward
    // (compressed)
    std::vector<torch::Tensor> refit_norms;
    std::vector<size_t> refit_pos;
    std::vector<CoreSlot*> refitted;  // data parallel: projectors to broadcast from their owners
    const size_t first_record = I.refits.size();
    for (size_t k = 0; k < live.size(); ++k) {
      CoreSlot& s = *live[k];
      if (!s.projected) continue;
      if (!I.owns(s)) {  // data parallel: the owner checks, refits and compresses the reduced sums
        if (s.dense_count == 0 && !s.param.grad().defined()) continue;
        if (s.dense_count > 0) refitted.push_back(&s);
        s.param.mutable_grad() = torch::Tensor();
        s.fit_sum = s.held_sum = torch::Tensor();
        s.dense_count = 0;
        refit_norms.push_back(torch::zeros({}, torch::kFloat));
        refit_pos.push_back(k);
        continue;
      }
      if (s.dense_count > 0) {
        LSPO_CHECK(s.acc_count == 0, I.opt.name, ": '", s.name, "' received compressed gradients on a refit step");
        I.ensure_allocated(s);
        I.refit(s);
        refitted.push_back(&s);
        refit_norms.push_back(norm_fp32(s.acc));
        refit_pos.push_back(k);
        continue;
      }
      if (!s.param.grad().defined()) continue;
      torch::Tensor G = s.param.grad();
      I.ensure_allocated(s);
      torch::Tensor S = compress(s.P, s.Q, G);
      s.param.mutable_grad() = torch::Tensor();
      if (s.acc_count == 0) {
        s.acc = S.contiguous();
      } else {
        I.before_acc_write(s);
        s.acc.add_(S);
      }
      s.acc_count += 1;
      s.host_fresh = false;
      refit_norms.push_back(norm_fp32(s.acc));
      refit_pos.push_back(k);
    }
    if (I.comm && !refitted.empty()) I.dist_sync_refits(refitted, first_record);
    if (!refit_pos.empty()) {
      std::vector<double> rn = to_host(refit_norms);
      if (I.comm) I.dist_sum(rn, "refit norms");
      for (size_t j = 0; j < rn.size(); ++j) norms[refit_pos[j]] = rn[j];
    }
    // 3. global norm (S for projected slots: what Adam consumes), clipping
    // folded into grad_scale as torch.nn.utils.clip_grad_norm_: the fp32 L2
    // norm of the per-tensor fp32 norms
    std::vector<float> nf(norms.begin(), norms.end());
    const double total =
        torch::linalg_vector_norm(torch::from_blob(nf.data(), {static_cast<int64_t>(nf.size())}, torch::kFloat), 2)
            .item<double>();
    I.last_norm = total * inv_scale;
    res.grad_norm = I.last_norm;
    double scale = inv_scale;
    if (I.opt.max_grad_norm > 0) {
      const double coef = I.opt.max_grad_norm / (total * inv_scale + 1e-6);
      if (coef < 1.0) scale = inv_scale * static_cast<double>(static_cast<float>(coef));
    }
    // 4. keep each speculation that used exactly these inputs, recompute the
    // others
    for (CoreSlot* sp : live) {
      CoreSlot& s = *sp;
      if (!I.owns(s)) continue;  // data parallel: the owner's result arrives in dist_gather
      I.ensure_allocated(s);
      if (!s.projected) I.sync_master(s);
      const SpecKey k = I.key(s, s.step + 1, scale);
      const torch::Tensor src = s.projected ? s.acc : I.part(s, s.param.grad());
      const bool fresh = s.host_fresh && (s.projected || I.same_grad(s, src));
      if (!s.projected && s.host_fresh && !fresh) I.grads_modified += 1;
      bool ok = fresh && s.has_spec && s.spec == k;
      if (ok) {
        eng.wait(s.eslot);
        ok = eng.has_result(s.eslot);
      }
      if (!ok) {
        if (!fresh) I.copy_to_host(s, src);
        I.submit(s, k);
      }
    }
    // 5. commit and apply in forward order (the worker keeps running the later
    // slots)
    for (CoreSlot* sp : live) {
      CoreSlot& s = *sp;
      if (I.owns(s)) {
        eng.commit(s.eslot);
        I.finish(s);
      }
      s.step += 1;
      s.has_spec = false;
      s.host_fresh = false;
    }
    if (I.comm) I.dist_gather(live);  // data parallel: the owners' results to every other rank
  } catch (...) {
    try {
      eng.wait_all();
    } catch (...) {
    }
    for (CoreSlot* s : live) I.drop(*s);
    throw;
  }
  I.spec_scale = inv_scale;
  if (!I.opt.state_dir.empty()) {             // this step, wholly, in the state directory
    const int64_t tag = I.write_projected();  // the projected slots' weights and
                                              // projectors first
    eng.persist();                            // the commit point (MANIFEST)
    if (tag >= 0) I.prune_projected(tag);
  }
  eng.add_event("step", "engine", 0, t_step, eng.now_us());
  return res;
}

void OptimizerCore::Impl::refit(CoreSlot& s) {
  const GroupHyper& h = hyper(s);
  const double t0 = engine->now_us();
  s.checks += 1;
  RefitOptions o;
  o.iters = h.refit_iters;
  o.lr = h.refit_lr;
  o.l2 = h.refit_l2;
  o.threshold = h.refit_threshold;
  o.drift = h.refit_drift;
  o.reinit = h.refit_reinit;
  o.basis = opt.basis;
  o.reference_error = s.refit_ref;
  // a different seed per layer and check for the fresh values of a re-init
  o.seed = (opt.seed * 1000003ULL + static_cast<uint64_t>(s.number) * 7919ULL + static_cast<uint64_t>(s.checks)) &
           0x7FFFFFFFULL;
  // fp32 for the check (one layer at a time, transient)
  torch::Tensor fit = s.fit_sum.to(torch::kFloat), held;
  if (s.held_sum.defined()) held = s.held_sum.to(torch::kFloat);
  s.fit_sum = s.held_sum = torch::Tensor();
  const std::vector<GradSample> fit_samples{GradSample::dense(fit)};
  std::vector<GradSample> heldout;
  if (held.defined()) heldout.push_back(GradSample::dense(held));
  RefitRecord rec;
  rec.step = s.step + 1;
  rec.param = s.name;
  rec.check = s.checks;
  torch::Tensor M, V;  // the committed moments (host), carried into the new
                       // subspace when a fit is kept
  if (s.step > 0) {
    engine->wait(s.eslot);
    M = engine->load_state(s.eslot, StateKind::kExpAvg).view({s.P.d, s.Q.d});
    V = engine->load_state(s.eslot, StateKind::kExpAvgSq).view({s.P.d, s.Q.d});
  }
  {
    torch::AutoGradMode grad_on(true);  // the fit learns the values with autograd
    rec.result = lspo::refit(s.P, s.Q, fit_samples, heldout, o, M.defined() ? &M : nullptr, V.defined() ? &V : nullptr);
  }
  torch::NoGradGuard ng;
  if (rec.result.kept && M.defined()) {
    engine->store_state(s.eslot, StateKind::kExpAvg, M.reshape(-1));
    engine->store_state(s.eslot, StateKind::kExpAvgSq, V.reshape(-1));
  }
  s.refit_ref = rec.result.reference_error;
  if (opt.refit_diagnostics) {
    const uint64_t seed = static_cast<uint64_t>(s.checks) * 65537ULL + 2ULL * static_cast<uint64_t>(s.number);
    // (a side kept whole stays the identity)
    auto random_like = [](const SparseProjector& X, uint64_t sd) {  // orthonormal like the ones compared with
      if (X.is_identity()) return X;
      if (X.shared_positions()) return SparseProjector::dense_basis(X.n(), X.d, sd, X.values.device());
      return SparseProjector::random(X.n(), X.d, X.r(), sd, X.values.device(), ProjectorInit::kGaussian, true);
    };
    SparseProjector Pr = random_like(s.P, seed), Qr = random_like(s.Q, seed + 1);
    rec.random_heldout = relative_error(Pr, Qr, heldout.empty() ? fit_samples : heldout);
  }
  // the step's whole gradient, compressed with the projectors the check left
  if (held.defined()) fit.add_(held);
  s.acc = compress(s.P, s.Q, fit).contiguous();
  s.acc_count = 1;
  s.host_fresh = false;
  s.dense_count = 0;
  refits.push_back(rec);
  engine->add_event("refit", s.name, 0, t0, engine->now_us());
}

void OptimizerCore::allocate_all() {
  std::lock_guard<std::mutex> lk(impl_->mu);
  for (auto& sp : impl_->slots)
    if (sp->param.requires_grad()) impl_->ensure_allocated(*sp);
}

void OptimizerCore::resume() {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lk(I.mu);
  torch::NoGradGuard ng;
  for (auto& sp : I.slots) {
    CoreSlot& s = *sp;
    if (s.eslot < 0) continue;
    s.step = I.engine->committed_step(s.eslot);
    if (s.step > 0 && !s.projected) {
      s.param.copy_(I.engine->load_state(s.eslot, StateKind::kMaster).view(s.param.sizes()));
      s.param_version = s.param._version();
    }
  }
  I.resume_projected();
}

bool OptimizerCore::on_disk(int64_t i) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const CoreSlot& s = impl_->slot(i, "on_disk");
  return s.eslot >= 0 && impl_->engine->on_disk(s.eslot);
}

int64_t OptimizerCore::slots_on_disk() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  int64_t n = 0;
  for (const auto& sp : impl_->slots) n += sp->eslot >= 0 && impl_->engine->on_disk(sp->eslot) ? 1 : 0;
  return n;
}

void OptimizerCore::zero_grad() {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lk(I.mu);
  for (auto& sp : I.slots) {
    CoreSlot& s = *sp;
    if (s.projected && s.acc_count > 0) {
      if (s.eslot >= 0) I.engine->wait(s.eslot);  // a queued speculation may still read the host buffer
      I.drop(s);
    }
  }
}

// ----------------------------------------------------------------
// introspection
bool OptimizerCore::is_projected(int64_t i) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->slot(i, "is_projected").projected;
}
torch::Tensor OptimizerCore::accumulated(int64_t i) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const CoreSlot& s = impl_->slot(i, "accumulated");
  return s.projected && s.acc_count > 0 ? s.acc.clone() : torch::Tensor();
}
bool OptimizerCore::allocated(int64_t i) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->slot(i, "allocated").eslot >= 0;
}
int64_t OptimizerCore::step_count(int64_t i) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->slot(i, "step_count").step;
}
const std::string& OptimizerCore::slot_name(int64_t i) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->slot(i, "slot_name").name;
}
std::pair<SparseProjector, SparseProjector> OptimizerCore::projectors(int64_t i) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const CoreSlot& s = impl_->slot(i, "projectors");
  LSPO_CHECK(s.projected, impl_->opt.name, ": '", s.name, "' is not projected");
  return {s.P, s.Q};
}
std::vector<RefitRecord> OptimizerCore::refits() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->refits;
}
int64_t OptimizerCore::skipped_steps() const { return impl_->skipped; }
bool OptimizerCore::last_step_skipped() const { return impl_->last_skipped; }
double OptimizerCore::last_grad_norm() const { return impl_->last_norm; }
int64_t OptimizerCore::grads_modified_after_hook() const { return impl_->grads_modified; }

}  // namespace lspo
