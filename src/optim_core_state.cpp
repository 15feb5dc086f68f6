// The optimizer core's state (lspo/optim_core.h): what both faces' checkpoints
// hold, one format.
#include <sstream>

#include "optim_core_internal.h"

namespace lspo {

namespace detail {
std::string shape_str(const torch::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}
}  // namespace detail

c10::impl::GenericDict slot_state_to_dict(const SlotState& st) {
  c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
  d.insert("step", torch::tensor(static_cast<double>(st.step), torch::kFloat));
  d.insert("exp_avg", st.exp_avg);
  d.insert("exp_avg_sq", st.exp_avg_sq);
  if (st.master_param.defined()) d.insert("master_param", st.master_param);
  if (st.P_indices.defined()) {
    d.insert("proj_P_indices", st.P_indices.cpu());
    d.insert("proj_P_values", st.P_values.cpu());
    d.insert("proj_Q_indices", st.Q_indices.cpu());
    d.insert("proj_Q_values", st.Q_values.cpu());
    if (st.P_whiten.defined()) d.insert("proj_P_whiten", st.P_whiten.cpu());  // (a side kept whole has none)
    if (st.Q_whiten.defined()) d.insert("proj_Q_whiten", st.Q_whiten.cpu());
    d.insert("proj_refit_ref", torch::tensor(st.refit_ref, torch::kDouble));
    d.insert("proj_refit_checks", torch::tensor(st.refit_checks, torch::kLong));
  }
  return d;
}

SlotState slot_state_from_dict(const c10::impl::GenericDict& d, const std::string& who) {
  auto t = [&](const char* k) {
    if (!d.contains(k) || d.at(k).isNone()) return torch::Tensor();
    LSPO_CHECK(d.at(k).isTensor(), who, ": state entry '", k, "' is not a tensor");
    return d.at(k).toTensor();
  };
  SlotState st;
  LSPO_CHECK(d.contains("step"), who, ": a parameter's state lacks 'step'");
  const c10::IValue& step = d.at("step");
  st.step = static_cast<int64_t>(step.isTensor() ? step.toTensor().item<double>()
                                 : step.isInt()  ? static_cast<double>(step.toInt())
                                                 : step.toDouble());
  st.exp_avg = t("exp_avg");
  st.exp_avg_sq = t("exp_avg_sq");
  st.master_param = t("master_param");
  st.P_indices = t("proj_P_indices");
  st.P_values = t("proj_P_values");
  st.Q_indices = t("proj_Q_indices");
  st.Q_values = t("proj_Q_values");
  st.P_whiten = t("proj_P_whiten");
  st.Q_whiten = t("proj_Q_whiten");
  if (d.contains("proj_refit_ref") && !d.at("proj_refit_ref").isNone()) {
    const c10::IValue& r = d.at("proj_refit_ref");
    LSPO_CHECK(r.isTensor() || r.isDouble(), who, ": state entry 'proj_refit_ref' is not a number");
    st.refit_ref = r.isTensor() ? r.toTensor().item<double>() : r.toDouble();
  }
  if (d.contains("proj_refit_checks") && !d.at("proj_refit_checks").isNone()) {
    const c10::IValue& c = d.at("proj_refit_checks");
    LSPO_CHECK(c.isTensor() || c.isInt(), who, ": state entry 'proj_refit_checks' is not an integer");
    st.refit_checks = c.isTensor() ? c.toTensor().item<int64_t>() : c.toInt();
    LSPO_CHECK(st.refit_checks >= 0, who, ": proj_refit_checks must be >= 0, got ", st.refit_checks);
  }
  return st;
}

void put_projectors(const CoreSlot& s, SlotState& st, bool copy) {
  auto keep = [&](const torch::Tensor& t) { return copy ? t.clone() : t; };
  // positions never change after construction: shared, not cloned (a clone would also expand a
  // dense basis's one row of shared positions to [n, d])
  st.P_indices = s.P.indices;
  st.P_values = keep(s.P.values);
  st.Q_indices = s.Q.indices;
  st.Q_values = keep(s.Q.values);
  if (s.P.whitened()) st.P_whiten = keep(s.P.whiten);
  if (s.Q.whitened()) st.Q_whiten = keep(s.Q.whiten);
  st.refit_ref = s.refit_ref;
  st.refit_checks = s.checks;
}

void check_whitening(const SlotState& st, const CoreSlot& s, const std::string& who) {
  LSPO_CHECK(st.P_whiten.defined() == s.P.whitened() && st.Q_whiten.defined() == s.Q.whitened(), who,
             ": saved projectors are ", st.P_whiten.defined() ? "" : "not ", "whitened (P), ",
             st.Q_whiten.defined() ? "" : "not ", "whitened (Q); this optimizer's are ", s.P.whitened() ? "" : "not ",
             "whitened (P), ", s.Q.whitened() ? "" : "not ", "whitened (Q) (whiten=..., one_sided=...)");
}

std::optional<SlotState> OptimizerCore::state(int64_t i, bool copy) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const CoreSlot& s = impl_->slot(i, "state");
  if (s.eslot < 0) return std::nullopt;  // no gradient yet: no state (as torch's optimizers)
  OffloadEngine& eng = *impl_->engine;
  eng.wait(s.eslot);
  const std::vector<int64_t> shape = s.projected  ? std::vector<int64_t>{s.P.d, s.Q.d}
                                     : s.len >= 0 ? std::vector<int64_t>{s.len}  // data parallel: a split slot's range
                                                  : s.param.sizes().vec();
  const bool disk = eng.on_disk(s.eslot);  // no host tensor to alias: a copy read from the files
  auto part = [&](StateKind k) {
    return disk                      ? eng.load_state(s.eslot, k)
           : k == StateKind::kMaster ? eng.master(s.eslot)
           : k == StateKind::kExpAvg ? eng.exp_avg(s.eslot)
                                     : eng.exp_avg_sq(s.eslot);
  };
  auto view = [&](const torch::Tensor& t) { return copy && !disk ? t.view(shape).clone() : t.view(shape); };
  SlotState st;
  st.step = s.step;
  st.exp_avg = view(part(StateKind::kExpAvg));
  st.exp_avg_sq = view(part(StateKind::kExpAvgSq));
  if (s.projected) {
    put_projectors(s, st, copy);
  } else {
    st.master_param = view(part(StateKind::kMaster));
  }
  return st;
}

void OptimizerCore::load_state(int64_t i, const SlotState& st, bool dry_run) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lk(I.mu);
  CoreSlot& s = I.slot(i, "load_state");
  const std::string who = I.opt.name + ".load_state_dict (parameter " + std::to_string(i) + ", '" + s.name + "')";
  torch::NoGradGuard ng;
  LSPO_CHECK(st.step >= 0, who, ": step must be >= 0, got ", st.step);
  LSPO_CHECK(st.exp_avg.defined() && st.exp_avg_sq.defined(), who, ": the state lacks exp_avg / exp_avg_sq");
  LSPO_CHECK(!(s.projected && !st.P_indices.defined() && st.master_param.defined()), who,
             ": saved as a dense parameter, projected here (different "
             "subspace/min_dim/project options?)");
  LSPO_CHECK(!(!s.projected && st.P_indices.defined()), who,
             ": saved as a projected parameter, dense here (different "
             "subspace/min_dim/project options?)");
  SparseProjector P, Q;
  if (s.projected) {
    LSPO_CHECK(st.P_indices.defined() && st.P_values.defined() && st.Q_indices.defined() && st.Q_values.defined(), who,
               ": the state of a projected parameter lacks its projectors "
               "(proj_P_indices, proj_P_values, ",
               "proj_Q_indices, proj_Q_values); was it saved by an LSPAdamW "
               "over the same parameters?");
    LSPO_CHECK(st.exp_avg.numel() == s.P.d * s.Q.d && st.exp_avg_sq.numel() == s.P.d * s.Q.d, who, ": exp_avg has ",
               st.exp_avg.numel(), " elements, this optimizer's subspace is ", s.P.d, " x ", s.Q.d,
               " (a different subspace, or another layout: state saved with one_sided=False, basis=\"sparse\", the "
               "layout before the one-sided SVD default, loads into an optimizer built with those options)");
    check_whitening(st, s, who);
    P = SparseProjector::from_tensors(st.P_indices.to(s.param.device()), st.P_values.to(s.param.device()), s.P.d);
    Q = SparseProjector::from_tensors(st.Q_indices.to(s.param.device()), st.Q_values.to(s.param.device()), s.Q.d);
    if (st.P_whiten.defined()) P.whiten = st.P_whiten.to(s.param.device(), torch::kFloat);
    if (st.Q_whiten.defined()) Q.whiten = st.Q_whiten.to(s.param.device(), torch::kFloat);
    if (st.P_whiten.defined() || st.Q_whiten.defined()) {
      P.validate();
      Q.validate();
    }
    LSPO_CHECK(P.n() == s.P.n() && Q.n() == s.Q.n() && P.r() == s.P.r() && Q.r() == s.Q.r(), who,
               ": the saved projectors (", P.n(), " x ", P.r(), ", ", Q.n(), " x ", Q.r(),
               ") do not fit this parameter's (", s.P.n(), " x ", s.P.r(), ", ", s.Q.n(), " x ", s.Q.r(),
               ") (different subspace?)");
  } else {
    LSPO_CHECK(st.master_param.defined(), who, ": the state lacks 'master_param' (was it saved by an lspo ",
               "offloading optimizer? torch's AdamW state has no master copy)");
    const int64_t n = s.len >= 0 ? s.len : s.param.numel();  // data parallel: a split slot's range
    LSPO_CHECK(st.exp_avg.numel() == n && st.exp_avg_sq.numel() == n && st.master_param.numel() == n, who,
               ": exp_avg / exp_avg_sq / master_param have ", st.exp_avg.numel(), " / ", st.exp_avg_sq.numel(), " / ",
               st.master_param.numel(), " elements, the parameter ", n);
  }
  for (const torch::Tensor* t : {&st.exp_avg, &st.exp_avg_sq, &st.master_param})
    if (t->defined())
      LSPO_CHECK(t->is_floating_point(), who, ": state tensors must be floating point, got ", t->scalar_type());
  if (dry_run) return;
  if (!I.owns(s)) {  // data parallel: the owner holds the moments; every rank the projectors
    if (s.projected) {
      s.P = std::move(P);
      s.Q = std::move(Q);
      s.refit_ref = st.refit_ref;
      s.checks = st.refit_checks;
    }
    s.step = st.step;
    I.drop(s);
    return;
  }
  I.ensure_allocated(s);
  OffloadEngine& eng = *I.engine;
  eng.wait(s.eslot);
  eng.store_state(s.eslot, StateKind::kExpAvg, st.exp_avg.reshape(-1).to(torch::kCPU, torch::kFloat));
  eng.store_state(s.eslot, StateKind::kExpAvgSq, st.exp_avg_sq.reshape(-1).to(torch::kCPU, torch::kFloat));
  if (s.projected) {
    s.P = std::move(P);
    s.Q = std::move(Q);
    s.refit_ref = st.refit_ref;
    s.checks = st.refit_checks;
  } else {
    eng.store_state(s.eslot, StateKind::kMaster, st.master_param.reshape(-1).to(torch::kCPU, torch::kFloat));
    s.param_version = s.param._version();  // the loaded master is the truth for
                                           // the current weights
  }
  s.step = st.step;
  I.drop(s);
}

}  // namespace lspo
