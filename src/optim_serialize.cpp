// Serialisation of lspo::OffloadAdamW / lspo::LSPAdamW (lspo/optim.h): options, and the optimizer
// state as a torch::serialize archive (torch::save(opt, path) / torch::load(opt, path)).
//
// Archive layout (format 1):
//   optimizer "OffloadAdamW" | "LSPAdamW", format 1, num_groups, num_params, skipped_steps, refits
//   group<g>: the group's options (every field) and num_params
//   param<i> (registration order): sizes, step, projected, exp_avg, exp_avg_sq (fp32 host),
//            master (fp32, non-projected), P_indices/P_values/P_d, Q_indices/Q_values/Q_d (projected)
// Everything that determines later steps is saved, so save at step k + load into a fresh optimizer
// over the same parameters (restored to their step-k values) + continue == the uninterrupted run.
#include <torch/serialize.h>

#include "lspo/optim.h"
#include "optim_internal.h"

namespace lspo {

namespace {

template <typename T>
void put(torch::serialize::OutputArchive& a, const char* key, const T& v) {
  a.write(key, c10::IValue(v));
}

c10::IValue get(torch::serialize::InputArchive& a, const std::string& key, const char* who) {
  c10::IValue v;
  LSPO_CHECK(a.try_read(key, v), who, ": the archive lacks '", key, "' (not an lspo optimizer checkpoint?)");
  return v;
}

torch::Tensor get_tensor(torch::serialize::InputArchive& a, const std::string& key, const std::string& who) {
  torch::Tensor t;
  LSPO_CHECK(a.try_read(key, t), who, ": the archive lacks tensor '", key, "'");
  return t;
}

template <typename T>
void read_opt(torch::serialize::InputArchive& a, const char* key, T& field) {
  c10::IValue v;
  if (a.try_read(key, v)) field = v.to<T>();
}

}  // namespace

// ---------------------------------------------------------------- options
#define LSPO_OPT_WRITE(name) put(archive, #name, name())
#define LSPO_OPT_READ(name) read_opt(archive, #name, name())

void OffloadAdamWOptions::serialize(torch::serialize::OutputArchive& archive) const {
  LSPO_OPT_WRITE(lr);
  LSPO_OPT_WRITE(betas);
  LSPO_OPT_WRITE(eps);
  LSPO_OPT_WRITE(weight_decay);
  LSPO_OPT_WRITE(max_grad_norm);
  LSPO_OPT_WRITE(overlap);
  LSPO_OPT_WRITE(record_timeline);
  LSPO_OPT_WRITE(pinned_limit_bytes);
}
void OffloadAdamWOptions::serialize(torch::serialize::InputArchive& archive) {
  LSPO_OPT_READ(lr);
  LSPO_OPT_READ(betas);
  LSPO_OPT_READ(eps);
  LSPO_OPT_READ(weight_decay);
  LSPO_OPT_READ(max_grad_norm);
  LSPO_OPT_READ(overlap);
  LSPO_OPT_READ(record_timeline);
  LSPO_OPT_READ(pinned_limit_bytes);
}
void LSPAdamWOptions::serialize(torch::serialize::OutputArchive& archive) const {
  LSPO_OPT_WRITE(lr);
  LSPO_OPT_WRITE(betas);
  LSPO_OPT_WRITE(eps);
  LSPO_OPT_WRITE(weight_decay);
  LSPO_OPT_WRITE(project);
  LSPO_OPT_WRITE(subspace);
  LSPO_OPT_WRITE(nnz);
  LSPO_OPT_WRITE(min_dim);
  LSPO_OPT_WRITE(refit_every);
  LSPO_OPT_WRITE(refit_threshold);
  LSPO_OPT_WRITE(refit_iters);
  LSPO_OPT_WRITE(refit_lr);
  LSPO_OPT_WRITE(max_grad_norm);
  LSPO_OPT_WRITE(overlap);
  LSPO_OPT_WRITE(record_timeline);
  LSPO_OPT_WRITE(pinned_limit_bytes);
  LSPO_OPT_WRITE(seed);
}
void LSPAdamWOptions::serialize(torch::serialize::InputArchive& archive) {
  LSPO_OPT_READ(lr);
  LSPO_OPT_READ(betas);
  LSPO_OPT_READ(eps);
  LSPO_OPT_READ(weight_decay);
  LSPO_OPT_READ(project);
  LSPO_OPT_READ(subspace);
  LSPO_OPT_READ(nnz);
  LSPO_OPT_READ(min_dim);
  LSPO_OPT_READ(refit_every);
  LSPO_OPT_READ(refit_threshold);
  LSPO_OPT_READ(refit_iters);
  LSPO_OPT_READ(refit_lr);
  LSPO_OPT_READ(max_grad_norm);
  LSPO_OPT_READ(overlap);
  LSPO_OPT_READ(record_timeline);
  LSPO_OPT_READ(pinned_limit_bytes);
  LSPO_OPT_READ(seed);
}
#undef LSPO_OPT_WRITE
#undef LSPO_OPT_READ

// ---------------------------------------------------------------- optimizer state
void OffloadOptimizerBase::save(torch::serialize::OutputArchive& archive) const {
  // Registration is a cache of param_groups(): bring it up to date (groups added since the last step).
  const_cast<OffloadOptimizerBase*>(this)->sync_slots();
  engine_->wait_all();
  put(archive, "optimizer", name_);
  put(archive, "format", int64_t(1));
  put(archive, "num_groups", static_cast<int64_t>(param_groups_.size()));
  put(archive, "num_params", static_cast<int64_t>(slots_.size()));
  put(archive, "skipped_steps", skipped_steps_);
  put(archive, "refits", refits_);
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    torch::serialize::OutputArchive ga;
    param_groups_[g].options().serialize(ga);
    put(ga, "num_params", static_cast<int64_t>(param_groups_[g].params().size()));
    archive.write("group" + std::to_string(g), ga);
  }
  for (size_t i = 0; i < slots_.size(); ++i) {
    const ParamSlot& s = *slots_[i];
    torch::serialize::OutputArchive pa;
    put(pa, "sizes", s.param.sizes().vec());
    put(pa, "step", s.step);
    put(pa, "projected", s.projected);
    pa.write("exp_avg", engine_->load_state(s.slot, StateKind::kExpAvg));
    pa.write("exp_avg_sq", engine_->load_state(s.slot, StateKind::kExpAvgSq));
    if (s.projected) {
      pa.write("P_indices", s.P.indices.cpu());
      pa.write("P_values", s.P.values.cpu());
      put(pa, "P_d", s.P.d);
      pa.write("Q_indices", s.Q.indices.cpu());
      pa.write("Q_values", s.Q.values.cpu());
      put(pa, "Q_d", s.Q.d);
    } else {
      pa.write("master", engine_->load_state(s.slot, StateKind::kMaster));
    }
    archive.write("param" + std::to_string(i), pa);
  }
}

void OffloadOptimizerBase::load(torch::serialize::InputArchive& archive) {
  sync_slots();
  engine_->wait_all();
  const std::string who = name_ + "::load";
  const std::string kind = get(archive, "optimizer", who.c_str()).toStringRef();
  LSPO_CHECK(kind == name_, who, ": the archive holds the state of a ", kind, ", not of a ", name_);
  const int64_t format = get(archive, "format", who.c_str()).toInt();
  LSPO_CHECK(format == 1, who, ": unknown archive format ", format);
  const int64_t ng = get(archive, "num_groups", who.c_str()).toInt();
  const int64_t np = get(archive, "num_params", who.c_str()).toInt();
  LSPO_CHECK(ng == static_cast<int64_t>(param_groups_.size()), who, ": the archive has ", ng,
             " param groups, this optimizer ", param_groups_.size());
  LSPO_CHECK(np == static_cast<int64_t>(slots_.size()), who, ": the archive has ", np,
             " parameters, this optimizer ", slots_.size());

  // Read and validate everything first, then write: a bad archive leaves the optimizer unchanged.
  struct Loaded {
    int64_t step;
    torch::Tensor m, v, master;
    SparseProjector P, Q;
  };
  std::vector<Loaded> loaded(slots_.size());
  std::vector<torch::serialize::InputArchive> groups(param_groups_.size());
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    LSPO_CHECK(archive.try_read("group" + std::to_string(g), groups[g]), who, ": the archive lacks group ", g);
    const int64_t n = get(groups[g], "num_params", who.c_str()).toInt();
    LSPO_CHECK(n == static_cast<int64_t>(param_groups_[g].params().size()), who, ": group ", g, " has ", n,
               " parameters in the archive, ", param_groups_[g].params().size(), " here");
  }
  for (size_t i = 0; i < slots_.size(); ++i) {
    const ParamSlot& s = *slots_[i];
    const std::string pw = who + " (parameter " + std::to_string(i) + ")";
    torch::serialize::InputArchive pa;
    LSPO_CHECK(archive.try_read("param" + std::to_string(i), pa), pw, ": missing from the archive");
    const auto sizes = get(pa, "sizes", pw.c_str()).toIntVector();
    LSPO_CHECK(sizes == s.param.sizes().vec(), pw, ": saved with sizes ", c10::IntArrayRef(sizes),
               ", the parameter has ", s.param.sizes());
    const bool projected = get(pa, "projected", pw.c_str()).toBool();
    LSPO_CHECK(projected == s.projected, pw, ": projected ", projected, " in the archive, ", s.projected,
               " here (different subspace/min_dim/project options?)");
    Loaded& L = loaded[i];
    L.step = get(pa, "step", pw.c_str()).toInt();
    LSPO_CHECK(L.step >= 0, pw, ": negative step count ", L.step);
    if (s.projected) {
      L.P = SparseProjector::from_tensors(get_tensor(pa, "P_indices", pw), get_tensor(pa, "P_values", pw),
                                          get(pa, "P_d", pw.c_str()).toInt());
      L.Q = SparseProjector::from_tensors(get_tensor(pa, "Q_indices", pw), get_tensor(pa, "Q_values", pw),
                                          get(pa, "Q_d", pw.c_str()).toInt());
      LSPO_CHECK(L.P.n() == s.P.n() && L.P.d == s.P.d && L.Q.n() == s.Q.n() && L.Q.d == s.Q.d, pw,
                 ": saved projectors are [", L.P.n(), ", ", L.P.d, "] and [", L.Q.n(), ", ", L.Q.d, "], this ",
                 "optimizer's [", s.P.n(), ", ", s.P.d, "] and [", s.Q.n(), ", ", s.Q.d, "] (different subspace?)");
      L.P = L.P.to(s.param.device());
      L.Q = L.Q.to(s.param.device());
    } else {
      L.master = get_tensor(pa, "master", pw);
      const int64_t n = s.param.numel();
      LSPO_CHECK(L.master.numel() == n && L.master.scalar_type() == torch::kFloat, pw,
                 ": saved master must be float32 with ", n, " elements");
    }
    const int64_t n = s.projected ? s.P.d * s.Q.d : s.param.numel();
    L.m = get_tensor(pa, "exp_avg", pw);
    L.v = get_tensor(pa, "exp_avg_sq", pw);
    for (const torch::Tensor* t : {&L.m, &L.v})
      LSPO_CHECK(t->numel() == n && t->scalar_type() == torch::kFloat, pw,
                 ": saved moments must be float32 with ", n, " elements, got ", t->numel(), " of ", t->scalar_type());
  }
  // commit
  for (size_t g = 0; g < param_groups_.size(); ++g) param_groups_[g].options().serialize(groups[g]);
  for (size_t i = 0; i < slots_.size(); ++i) {
    ParamSlot& s = *slots_[i];
    Loaded& L = loaded[i];
    engine_->store_state(s.slot, StateKind::kExpAvg, L.m);
    engine_->store_state(s.slot, StateKind::kExpAvgSq, L.v);
    if (s.projected) {
      s.P = L.P;
      s.Q = L.Q;
    } else {
      engine_->store_state(s.slot, StateKind::kMaster, L.master);
    }
    s.step = L.step;
    refresh_state(s);
  }
  c10::IValue v;
  if (archive.try_read("skipped_steps", v)) skipped_steps_ = v.toInt();
  if (archive.try_read("refits", v)) refits_ = v.toInt();
}

}  // namespace lspo
