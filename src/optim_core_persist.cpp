// The projected slots' part of the state directory (lspo/optim_core.h,
// CoreOptions::state_dir).
//
// The engine's files hold every slot's moments (and the dense slots' fp32
// masters, from which resume restores their weights). A projected slot has no
// master on the host: its weight W lives on its device and changes in place,
// and its projectors change at refit checks. So every step that persists also
// writes `proj.s<T>.pt` (T: the largest step count of the projected slots), a
// torch.save-format dict (lspo/torch_file.h) {"format": 1, "step": T, "slots": {"<slot>": entry}},
// where an entry is the slot's checkpoint entry (slot_state_to_dict: step,
// projectors, whitening, refit reference and check count; the moments are left
// empty, they are in the engine's files) plus "weight", W in its dtype on the
// host. The file is written durably (save_torch_file: a temporary name,
// fsync, rename, directory fsync) before the engine's MANIFEST is committed; after the commit, older proj files are
// removed. A crash at any point leaves the proj file of the committed step on
// disk: resume reads the newest proj file whose T is at most the committed
// step, and removes any newer one (a step that never committed).
#include <dirent.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "lspo/torch_file.h"
#include "optim_core_internal.h"

namespace lspo {

namespace {

constexpr const char* kPrefix = "proj.s";
constexpr const char* kSuffix = ".pt";

std::string proj_path(const std::string& dir, int64_t tag) {
  return dir + "/" + kPrefix + std::to_string(tag) + kSuffix;
}

// The tags of the proj files in `dir` (ignores everything else, temporaries
// included).
std::vector<int64_t> proj_tags(const std::string& dir) {
  std::vector<int64_t> tags;
  DIR* d = ::opendir(dir.c_str());
  LSPO_CHECK(d != nullptr, "state_dir: cannot list '", dir, "': ", std::strerror(errno));
  const size_t np = std::strlen(kPrefix), ns = std::strlen(kSuffix);
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n.size() <= np + ns || n.compare(0, np, kPrefix) != 0 || n.compare(n.size() - ns, ns, kSuffix) != 0) continue;
    const std::string num = n.substr(np, n.size() - np - ns);
    if (num.empty() || num.find_first_not_of("0123456789") != std::string::npos) continue;
    tags.push_back(std::stoll(num));
  }
  ::closedir(d);
  return tags;
}

void remove_file(const std::string& p) {
  LSPO_CHECK(::unlink(p.c_str()) == 0 || errno == ENOENT, "state_dir: cannot remove '", p, "': ", std::strerror(errno));
}

}  // namespace

int64_t OptimizerCore::Impl::projected_tag() const {
  int64_t tag = -1;
  for (const auto& sp : slots)
    if (sp->projected && sp->eslot >= 0) tag = std::max(tag, sp->step);
  return tag;
}

int64_t OptimizerCore::Impl::write_projected() {
  const int64_t tag = projected_tag();
  if (tag < 0) return -1;  // no projected slot holds state
  c10::impl::GenericDict entries(c10::StringType::get(), c10::AnyType::get());
  for (const auto& sp : slots) {
    const CoreSlot& s = *sp;
    if (!s.projected || s.eslot < 0) continue;
    SlotState st;
    st.step = s.step;
    st.exp_avg = st.exp_avg_sq = torch::empty({0});  // in the engine's files
    put_projectors(s, st, /*copy=*/false);
    c10::impl::GenericDict e = slot_state_to_dict(st);
    e.insert("weight", s.param.detach().to(torch::kCPU).clone());
    entries.insert(std::to_string(s.index), e);
  }
  c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
  d.insert("format", int64_t(1));
  d.insert("step", tag);
  d.insert("slots", entries);
  save_torch_file(c10::IValue(d), proj_path(opt.state_dir, tag), /*durable=*/true);
  return tag;
}

void OptimizerCore::Impl::prune_projected(int64_t keep) {
  for (int64_t t : proj_tags(opt.state_dir))
    if (t != keep) remove_file(proj_path(opt.state_dir, t));
}

void OptimizerCore::Impl::resume_projected() {
  const int64_t committed = projected_tag();  // the slots' steps are the MANIFEST's by now
  if (committed < 0) return;
  const std::string& dir = opt.state_dir;
  int64_t best = -1;
  for (int64_t t : proj_tags(dir))
    if (t <= committed) best = std::max(best, t);
  if (committed == 0 && best < 0) return;  // nothing was ever committed for the projected slots
  LSPO_CHECK(best >= 0, opt.name, ": the state directory '", dir, "' has committed step ", committed,
             " of its projected parameters but no projector file (", kPrefix, "<step>", kSuffix,
             ") of that step; was it written by an lspo older than this one?");
  const std::string path = proj_path(dir, best);
  const c10::IValue v = load_torch_file(path, opt.name + ": resume");
  LSPO_CHECK(v.isGenericDict(), opt.name, ": '", path, "' is not an lspo projector file");
  const c10::impl::GenericDict d = v.toGenericDict();
  LSPO_CHECK(d.contains("slots") && d.at("slots").isGenericDict(), opt.name, ": '", path, "' lacks 'slots'");
  const c10::impl::GenericDict entries = d.at("slots").toGenericDict();
  for (auto& sp : slots) {
    CoreSlot& s = *sp;
    if (!s.projected || s.eslot < 0) continue;
    const std::string key = std::to_string(s.index);
    const std::string who = opt.name + ": resume of '" + s.name + "' from '" + path + "'";
    LSPO_CHECK(entries.contains(key), who, ": the file has no entry for this parameter (different model or ",
               "options?)");
    const c10::impl::GenericDict e = entries.at(key).toGenericDict();
    const SlotState st = slot_state_from_dict(e, who);
    LSPO_CHECK(st.step == s.step, who, ": the projectors are of step ", st.step, ", the moments of step ", s.step);
    LSPO_CHECK(st.P_indices.defined() && torch::equal(st.P_indices, s.P.indices.cpu()) && st.Q_indices.defined() &&
                   torch::equal(st.Q_indices, s.Q.indices.cpu()),
               who,
               ": the saved projector positions differ from this optimizer's "
               "(different seed, subspace or nnz?)");
    check_whitening(st, s, who);
    LSPO_CHECK(e.contains("weight") && e.at("weight").isTensor(), who, ": the entry lacks 'weight'");
    const torch::Tensor w = e.at("weight").toTensor();
    LSPO_CHECK(w.sizes() == s.param.sizes() && w.scalar_type() == s.param.scalar_type(), who,
               ": the saved weight has sizes ", detail::shape_str(w), " and dtype ", w.scalar_type(),
               ", the parameter ", detail::shape_str(s.param), " and ", s.param.scalar_type());
    const torch::Device dev = s.param.device();
    s.P.values.copy_(st.P_values.to(dev, torch::kFloat));
    s.Q.values.copy_(st.Q_values.to(dev, torch::kFloat));
    if (s.P.whitened()) s.P.whiten.copy_(st.P_whiten.to(dev, torch::kFloat));
    if (s.Q.whitened()) s.Q.whiten.copy_(st.Q_whiten.to(dev, torch::kFloat));
    s.P.validate();
    s.Q.validate();
    s.refit_ref = st.refit_ref;
    s.checks = st.refit_checks;
    s.param.copy_(w.to(dev));
  }
  for (int64_t t : proj_tags(dir))
    if (t > committed) remove_file(proj_path(dir, t));  // written by a step that never committed
}

}  // namespace lspo
