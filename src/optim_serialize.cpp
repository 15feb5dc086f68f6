// Serialisation of lspo::OffloadAdamW / lspo::LSPAdamW (lspo/optim.h): options, and the optimizer
// state as a torch::serialize archive (torch::save(opt, path) / torch::load(opt, path)).
//
// The checkpoint is the Python face's state_dict(), as a pickled dict (torch.save format):
//   {"state": {i: {"step", "exp_avg", "exp_avg_sq", "master_param" | "proj_P_indices", "proj_P_values",
//                   "proj_Q_indices", "proj_Q_values", ["proj_P_whiten", "proj_Q_whiten"], "proj_refit_ref"}},
//    "param_groups": [{"lr", "betas", "eps", "weight_decay", [refit options], "params": [i, ...]}],
//    "lspo_optimizer": "OffloadAdamW" | "LSPAdamW", "lspo_format": 2}
// save_checkpoint / load_checkpoint read and write it as a file; the torch::serialize archive of
// torch::save(opt, ...) holds the same bytes. Everything that determines later steps is saved.
#include <torch/serialize.h>

#include "lspo/optim.h"
#include "lspo/torch_file.h"
#include <cstring>

namespace lspo {

namespace {

template <typename T>
void put(torch::serialize::OutputArchive& a, const char* key, const T& v) {
  a.write(key, c10::IValue(v));
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
  LSPO_OPT_WRITE(refit_l2);
  LSPO_OPT_WRITE(refit_drift);
  LSPO_OPT_WRITE(refit_reinit);
  LSPO_OPT_WRITE(whiten);
  LSPO_OPT_WRITE(scale);
  LSPO_OPT_WRITE(scale_auto);
  LSPO_OPT_WRITE(refit_diagnostics);
  LSPO_OPT_WRITE(refit_stagger);
  LSPO_OPT_WRITE(one_sided);
  LSPO_OPT_WRITE(basis);
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
  LSPO_OPT_READ(refit_l2);
  LSPO_OPT_READ(refit_drift);
  LSPO_OPT_READ(refit_reinit);
  LSPO_OPT_READ(whiten);
  LSPO_OPT_READ(scale);
  LSPO_OPT_READ(scale_auto);
  LSPO_OPT_READ(refit_diagnostics);
  LSPO_OPT_READ(refit_stagger);
  LSPO_OPT_READ(one_sided);
  LSPO_OPT_READ(basis);
  LSPO_OPT_READ(max_grad_norm);
  LSPO_OPT_READ(overlap);
  LSPO_OPT_READ(record_timeline);
  LSPO_OPT_READ(pinned_limit_bytes);
  LSPO_OPT_READ(seed);
}
#undef LSPO_OPT_WRITE
#undef LSPO_OPT_READ

// ---------------------------------------------------------------- the checkpoint (one format)
namespace {

constexpr int64_t kFormat = 2;

c10::impl::GenericDict group_dict(const torch::optim::OptimizerOptions& options) {
  c10::impl::GenericDict g(c10::StringType::get(), c10::AnyType::get());
  if (const auto* o = dynamic_cast<const OffloadAdamWOptions*>(&options)) {
    g.insert("lr", o->lr());
    g.insert("betas", c10::ivalue::Tuple::create({std::get<0>(o->betas()), std::get<1>(o->betas())}));
    g.insert("eps", o->eps());
    g.insert("weight_decay", o->weight_decay());
  } else if (const auto* l = dynamic_cast<const LSPAdamWOptions*>(&options)) {
    g.insert("lr", l->lr());
    g.insert("betas", c10::ivalue::Tuple::create({std::get<0>(l->betas()), std::get<1>(l->betas())}));
    g.insert("eps", l->eps());
    g.insert("weight_decay", l->weight_decay());
    g.insert("refit_every", l->refit_every());
    g.insert("refit_threshold", l->refit_threshold());
    g.insert("refit_iters", l->refit_iters());
    g.insert("refit_lr", l->refit_lr());
    g.insert("refit_l2", l->refit_l2());
    g.insert("refit_drift", l->refit_drift());
    g.insert("refit_reinit", l->refit_reinit());
    if (l->project().has_value()) g.insert("project", *l->project());
  }
  return g;
}

double num(const c10::IValue& v) { return v.isInt() ? static_cast<double>(v.toInt()) : v.toDouble(); }

// The options of a saved group that both faces understand; others (Python's extra keys) are ignored.
void apply_group(torch::optim::OptimizerOptions& options, const c10::impl::GenericDict& g) {
  auto has = [&](const char* k) { return g.contains(k) && !g.at(k).isNone(); };
  auto betas = [&]() {
    auto t = g.at("betas");
    auto el = t.isTuple() ? t.toTupleRef().elements().vec() : t.toListRef().vec();
    return std::make_tuple(num(el.at(0)), num(el.at(1)));
  };
  if (auto* o = dynamic_cast<OffloadAdamWOptions*>(&options)) {
    if (has("lr")) o->lr(num(g.at("lr")));
    if (has("betas")) o->betas(betas());
    if (has("eps")) o->eps(num(g.at("eps")));
    if (has("weight_decay")) o->weight_decay(num(g.at("weight_decay")));
  } else if (auto* l = dynamic_cast<LSPAdamWOptions*>(&options)) {
    if (has("lr")) l->lr(num(g.at("lr")));
    if (has("betas")) l->betas(betas());
    if (has("eps")) l->eps(num(g.at("eps")));
    if (has("weight_decay")) l->weight_decay(num(g.at("weight_decay")));
    if (has("refit_every")) l->refit_every(static_cast<int64_t>(num(g.at("refit_every"))));
    if (has("refit_threshold")) l->refit_threshold(num(g.at("refit_threshold")));
    if (has("refit_iters")) l->refit_iters(static_cast<int64_t>(num(g.at("refit_iters"))));
    if (has("refit_lr")) l->refit_lr(num(g.at("refit_lr")));
    if (has("refit_l2")) l->refit_l2(num(g.at("refit_l2")));
    if (has("refit_drift")) l->refit_drift(num(g.at("refit_drift")));
    if (has("refit_reinit")) l->refit_reinit(g.at("refit_reinit").toStringRef());
  }
}

}  // namespace

c10::IValue OffloadOptimizerBase::checkpoint() const {
  const_cast<OffloadOptimizerBase*>(this)->sync_slots();  // groups added since the last step
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  for (size_t i = 0; i < params_.size(); ++i) {
    auto st = core_->state(static_cast<int64_t>(i), /*copy=*/true);
    if (!st) continue;
    state.insert(static_cast<int64_t>(i), slot_state_to_dict(*st));
  }
  c10::impl::GenericList groups(c10::AnyType::get());
  int64_t next = 0;
  for (const auto& group : param_groups_) {
    auto g = group_dict(group.options());
    c10::impl::GenericList ids(c10::AnyType::get());  // plain lists: no TorchScript list specialisation
    for (size_t k = 0; k < group.params().size(); ++k) ids.push_back(next++);
    g.insert("params", ids);
    groups.push_back(g);
  }
  c10::impl::GenericDict top(c10::StringType::get(), c10::AnyType::get());
  top.insert("state", state);
  top.insert("param_groups", groups);
  top.insert("lspo_optimizer", name_);
  top.insert("lspo_format", kFormat);
  return top;
}

void OffloadOptimizerBase::load_checkpoint(const c10::IValue& ck) {
  sync_slots();
  const std::string who = name_ + "::load";
  LSPO_CHECK(ck.isGenericDict(), who, ": not an lspo optimizer checkpoint (expected a dict)");
  auto top = ck.toGenericDict();
  LSPO_CHECK(top.contains("state") && top.contains("param_groups"), who,
             ": not an optimizer checkpoint (no 'state' / 'param_groups')");
  if (top.contains("lspo_optimizer")) {
    const std::string kind = top.at("lspo_optimizer").toStringRef();
    LSPO_CHECK(kind == name_, who, ": the checkpoint holds the state of a ", kind, ", not of a ", name_);
  }
  auto groups = top.at("param_groups").toListRef();
  LSPO_CHECK(groups.size() == param_groups_.size(), who, ": the checkpoint has ", groups.size(),
             " param groups, this optimizer ", param_groups_.size());
  size_t total = 0;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    auto g = groups[gi].toGenericDict();
    const size_t n = g.contains("params") ? g.at("params").toListRef().size() : 0;
    LSPO_CHECK(n == param_groups_[gi].params().size(), who, ": group ", gi, " has ", n,
               " parameters in the checkpoint, ", param_groups_[gi].params().size(), " here");
    total += n;
  }
  LSPO_CHECK(total == params_.size(), who, ": the checkpoint has ", total, " parameters, this optimizer ",
             params_.size());
  // read and validate every slot first (load_state validates), then adopt the group options
  std::vector<std::pair<int64_t, SlotState>> slots;
  for (const auto& kv : top.at("state").toGenericDict()) {
    const int64_t i = kv.key().toInt();
    LSPO_CHECK(i >= 0 && i < static_cast<int64_t>(params_.size()), who, ": state for parameter ", i,
               " of ", params_.size());
    SlotState st = slot_state_from_dict(kv.value().toGenericDict(), who);
    slots.emplace_back(i, std::move(st));
  }
  for (auto& [i, st] : slots) core_->load_state(i, st, /*dry_run=*/true);  // all or nothing
  for (auto& [i, st] : slots) core_->load_state(i, st);
  for (size_t gi = 0; gi < groups.size(); ++gi) apply_group(param_groups_[gi].options(), groups[gi].toGenericDict());
  sync_groups();
  refresh_state();
}

void OffloadOptimizerBase::save_checkpoint(const std::string& path) const { save_torch_file(checkpoint(), path); }

void OffloadOptimizerBase::load_checkpoint(const std::string& path) {
  load_checkpoint(load_torch_file(path, name_ + "::load_checkpoint"));
}

void OffloadOptimizerBase::save(torch::serialize::OutputArchive& archive) const {
  std::vector<char> bytes = torch_file_bytes(checkpoint());
  archive.write("lspo_checkpoint",
                torch::from_blob(bytes.data(), {static_cast<int64_t>(bytes.size())}, torch::kUInt8).clone());
}

void OffloadOptimizerBase::load(torch::serialize::InputArchive& archive) {
  torch::Tensor blob;
  LSPO_CHECK(archive.try_read("lspo_checkpoint", blob), name_,
             "::load: the archive holds no lspo checkpoint (saved by another optimizer, or by lspo < 0.2?)");
  blob = blob.contiguous();
  std::vector<char> bytes(static_cast<size_t>(blob.numel()));
  std::memcpy(bytes.data(), blob.data_ptr(), bytes.size());
  load_checkpoint(torch::pickle_load(bytes));
}

}  // namespace lspo
