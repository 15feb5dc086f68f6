// Data parallel for the optimizer core (lspo/dist.h): slot ownership, the reduction of the gradients
// onto their owners, the global norm, the projector sync after refits, the owners' results to
// every rank. step() in optim_core.cpp calls these at the points dist.h lists.
#include <algorithm>
#include <cmath>

#include "optim_core_internal.h"

namespace lspo {

int64_t least_loaded(const std::vector<int64_t>& load) {
  LSPO_CHECK(!load.empty(), "least_loaded: no ranks");
  return static_cast<int64_t>(std::min_element(load.begin(), load.end()) - load.begin());
}

namespace {
// Host bytes the owner of a slot allocates (engine.h): both halves of the double-buffered fp32 state
// (2 x 8 B moments-only, 2 x 12 B with the master) plus the gradient and result buffers.
int64_t host_bytes(const CoreSlot& s, int64_t numel = -1) {
  if (!s.param.requires_grad()) return 0;  // frozen: never allocated
  if (numel < 0) numel = s.param.numel();
  return s.projected ? 24 * s.P.d * s.Q.d : (24 + 2 * static_cast<int64_t>(s.param.element_size())) * numel;
}

// Rank r's range of n elements split over w ranks.
std::pair<int64_t, int64_t> range_of(int64_t n, int64_t w, int64_t r) {
  const int64_t lo = n * r / w;
  return {lo, n * (r + 1) / w - lo};
}
}  // namespace

void OptimizerCore::Impl::assign_owner(CoreSlot& s) {
  const int64_t w = static_cast<int64_t>(owner_load.size());
  if (!s.projected && w > 1 && split_min_numel > 0 && s.param.numel() >= split_min_numel && s.param.is_contiguous()) {
    s.owner = -1;  // split: every rank owns one contiguous range
    for (int64_t r = 0; r < w; ++r) owner_load[r] += host_bytes(s, range_of(s.param.numel(), w, r).second);
    std::tie(s.lo, s.len) = range_of(s.param.numel(), w, comm->rank());
    return;
  }
  s.lo = 0;
  s.len = -1;
  s.owner = least_loaded(owner_load);
  owner_load[s.owner] += host_bytes(s);
}

void OptimizerCore::set_communicator(std::shared_ptr<Communicator> comm, int64_t split_min_numel) {
  Impl& I = *impl_;
  std::lock_guard<std::mutex> lk(I.mu);
  const std::string& nm = I.opt.name;
  LSPO_CHECK(I.opt.state_dir.empty(), nm, ": data parallel with a state_dir (the disk tier) is not supported");
  for (const auto& sp : I.slots)
    LSPO_CHECK(sp->eslot < 0 && sp->acc_count == 0 && sp->step == 0, nm,
               ": set the communicator before the first gradient and before loading a checkpoint ('", sp->name,
               "' already has state)");
  LSPO_CHECK(split_min_numel >= 0, nm, ": split_min_numel must be >= 0, got ", split_min_numel);
  I.comm = std::move(comm);
  I.split_min_numel = split_min_numel;
  I.owner_load.clear();
  if (!I.comm) {
    for (auto& sp : I.slots) {
      sp->owner = 0;
      sp->lo = 0;
      sp->len = -1;
    }
    return;
  }
  const int64_t w = I.comm->world_size();
  LSPO_CHECK(w >= 1 && I.comm->rank() >= 0 && I.comm->rank() < w, nm, ": invalid rank ", I.comm->rank(),
             " of world size ", w);
  I.owner_load.assign(static_cast<size_t>(w), 0);
  // largest first onto the least loaded rank (slots added later: least loaded, in order)
  std::vector<CoreSlot*> order;
  for (auto& sp : I.slots) order.push_back(sp.get());
  std::stable_sort(order.begin(), order.end(),
                   [](const CoreSlot* a, const CoreSlot* b) { return host_bytes(*a) > host_bytes(*b); });
  for (CoreSlot* s : order) I.assign_owner(*s);
}

bool OptimizerCore::distributed() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->comm != nullptr;
}

int64_t OptimizerCore::owner(int64_t slot) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->slot(slot, "owner").owner;
}

std::pair<int64_t, int64_t> OptimizerCore::shard_range(int64_t slot) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  const CoreSlot& s = impl_->slot(slot, "shard_range");
  return {s.lo, s.len};
}

bool OptimizerCore::owns(int64_t slot) const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->owns(impl_->slot(slot, "owns"));
}

// Every rank must hold gradients for the same slots (else the collectives below would pair
// different tensors): per slot, "has S", "has a fit sum", "has a held-out sum" (refit-check steps)
// and "has a dense gradient", summed over ranks.
void OptimizerCore::Impl::dist_check_live(const std::vector<CoreSlot*>& live) {
  constexpr int kinds = 4;
  static const char* what[kinds] = {"a compressed gradient", "a refit fit sum", "a refit held-out sum",
                                    "a dense gradient"};
  const int64_t n = static_cast<int64_t>(slots.size());
  torch::Tensor f = torch::zeros({kinds * n}, torch::kDouble);
  double* p = f.data_ptr<double>();
  for (CoreSlot* s : live) {
    p[kinds * s->index] = s->projected && s->acc_count > 0 ? 1.0 : 0.0;
    p[kinds * s->index + 1] = s->fit_sum.defined() ? 1.0 : 0.0;
    p[kinds * s->index + 2] = s->held_sum.defined() ? 1.0 : 0.0;
    p[kinds * s->index + 3] = s->param.grad().defined() ? 1.0 : 0.0;
  }
  comm->all_reduce_sum(f, "gradient presence check");
  const double w = static_cast<double>(comm->world_size());
  for (int64_t i = 0; i < n; ++i)
    for (int k = 0; k < kinds; ++k) {
      const double v = p[kinds * i + k];
      LSPO_CHECK(v == 0.0 || v == w, opt.name, ": rank ", comm->rank(), ": '", slots[i]->name, "' has ", what[k],
                 " on ", v, " of ", w, " ranks; every rank must run the same backward passes (as many ",
                 "micro-batches) over the same parameters before step()");
    }
}

void OptimizerCore::Impl::dist_reduce(const std::vector<CoreSlot*>& live) {
  std::vector<torch::Tensor> ts;
  std::vector<int64_t> owners;
  for (CoreSlot* s : live) reduce_pieces(*s, ts, owners);
  comm->reduce_sum(ts, owners, "gradient reduce");
  const double inv = 1.0 / static_cast<double>(comm->world_size());
  for (size_t k = 0; k < ts.size(); ++k)
    if (owners[k] == comm->rank()) ts[k].mul_(inv);
}

std::pair<std::vector<torch::Tensor>, std::vector<int64_t>> OptimizerCore::reduce_pieces(int64_t slot) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  LSPO_CHECK(impl_->comm, impl_->opt.name, ": reduce_pieces needs a communicator (set_communicator)");
  std::pair<std::vector<torch::Tensor>, std::vector<int64_t>> out;
  impl_->reduce_pieces(impl_->slot(slot, "reduce_pieces"), out.first, out.second);
  return out;
}

// What the slot sends to the step's reduce, now: its compressed sum and/or its dense gradient (a split
// slot's in one range per rank), with the rank each piece is summed onto.
void OptimizerCore::Impl::reduce_pieces(CoreSlot& slot, std::vector<torch::Tensor>& ts, std::vector<int64_t>& owners) {
  CoreSlot* s = &slot;
  {
    if (s->projected && s->acc_count > 0) {
      ts.push_back(s->acc);
      owners.push_back(s->owner);
    }
    for (const torch::Tensor* sum : {&s->fit_sum, &s->held_sum})  // a refit-check step's dense sums
      if (s->projected && sum->defined()) {
        ts.push_back(*sum);
        owners.push_back(s->owner);
      }
    if (s->param.grad().defined()) {
      if (!s->param.grad().is_contiguous()) s->param.mutable_grad() = s->param.grad().contiguous();
      const torch::Tensor& g = s->param.grad();
      if (s->owner < 0) {  // split: each rank's range onto that rank (a reduce-scatter)
        for (int64_t r = 0; r < comm->world_size(); ++r) {
          auto rg = range_of(g.numel(), comm->world_size(), r);
          ts.push_back(g.view(-1).narrow(0, rg.first, rg.second));
          owners.push_back(r);
        }
      } else {
        ts.push_back(g);
        owners.push_back(s->owner);
      }
    }
  }
}

void OptimizerCore::Impl::dist_norms(std::vector<double>& norms, const std::vector<CoreSlot*>& live) {
  // a split slot's norm: the root of the sum of its ranges' squared norms
  for (size_t k = 0; k < live.size(); ++k)
    if (live[k]->owner < 0) norms[k] *= norms[k];
  dist_sum(norms, "norms");
  for (size_t k = 0; k < live.size(); ++k)
    if (live[k]->owner < 0) norms[k] = std::sqrt(norms[k]);
}

void OptimizerCore::Impl::dist_sum(std::vector<double>& v, const char* what) {
  if (v.empty()) return;
  torch::Tensor t = torch::from_blob(v.data(), {static_cast<int64_t>(v.size())}, torch::kDouble).clone();
  comm->all_reduce_sum(t, what);
  std::copy(t.data_ptr<double>(), t.data_ptr<double>() + t.numel(), v.begin());
}

// After the owners' refits: every rank takes the owner's projector values and refit record; the
// step's records are kept in the same (forward) order on every rank.
void OptimizerCore::Impl::dist_sync_refits(const std::vector<CoreSlot*>& refitted, size_t first_record) {
  std::vector<RefitRecord> mine(refits.begin() + static_cast<std::ptrdiff_t>(first_record), refits.end());
  refits.resize(first_record);
  constexpr int64_t kFields = 14;  // the record (RefitResult and the rest) and the slot's refit state
  std::vector<torch::Tensor> ts, recs;
  std::vector<int64_t> owners;
  for (CoreSlot* s : refitted) {
    torch::Tensor r = torch::zeros({kFields}, torch::kDouble);
    if (owns(*s)) {
      auto it = std::find_if(mine.begin(), mine.end(), [&](const RefitRecord& x) { return x.param == s->name; });
      LSPO_CHECK(it != mine.end(), opt.name, ": internal: no refit record for '", s->name, "'");
      const RefitResult& q = it->result;
      const double v[kFields] = {q.heldout_before, q.heldout_after, q.fit_before,   q.fit_after,
                                 q.fitted ? 1.0 : 0.0, q.kept ? 1.0 : 0.0, q.reinit ? 1.0 : 0.0,
                                 static_cast<double>(q.iters), q.seconds, q.reference_error,
                                 static_cast<double>(it->check), it->random_heldout, s->refit_ref,
                                 static_cast<double>(s->checks)};
      std::copy(v, v + kFields, r.data_ptr<double>());
    }
    std::vector<torch::Tensor> parts{s->P.values, s->Q.values};
    for (const torch::Tensor& wt : {s->P.whiten, s->Q.whiten})  // whitened: the same on every rank
      if (wt.defined()) parts.push_back(wt);
    parts.push_back(r);
    for (const torch::Tensor& t : parts) {
      LSPO_CHECK(t.is_contiguous(), opt.name, ": internal: projector tensors of '", s->name, "' not contiguous");
      ts.push_back(t);
      owners.push_back(s->owner);
    }
    recs.push_back(r);
  }
  comm->broadcast(ts, owners, "projector sync after refit");
  for (size_t k = 0; k < refitted.size(); ++k) {
    const double* p = recs[k].data_ptr<double>();
    CoreSlot& s = *refitted[k];
    RefitRecord rec;
    rec.step = s.step + 1;
    rec.param = s.name;
    RefitResult& q = rec.result;
    q.heldout_before = p[0];
    q.heldout_after = p[1];
    q.fit_before = p[2];
    q.fit_after = p[3];
    q.fitted = p[4] != 0.0;
    q.kept = p[5] != 0.0;
    q.reinit = p[6] != 0.0;
    q.iters = static_cast<int64_t>(p[7]);
    q.seconds = p[8];
    q.reference_error = p[9];
    rec.check = static_cast<int64_t>(p[10]);
    rec.random_heldout = p[11];
    s.refit_ref = p[12];
    s.checks = static_cast<int64_t>(p[13]);
    refits.push_back(rec);
  }
}

// The owners' committed results (projected: the update u, dense: the new weights) to every rank;
// the other ranks apply them to their weights exactly as the owner did.
void OptimizerCore::Impl::dist_gather(const std::vector<CoreSlot*>& live) {
  std::vector<torch::Tensor> ts;
  std::vector<int64_t> owners;
  for (CoreSlot* s : live) {
    if (s->owner < 0) {  // split: every rank's range of the (updated) weights, in place (an all-gather)
      for (int64_t r = 0; r < comm->world_size(); ++r) {
        auto rg = range_of(s->param.numel(), comm->world_size(), r);
        ts.push_back(s->param.detach().view(-1).narrow(0, rg.first, rg.second));
        owners.push_back(r);
      }
      continue;
    }
    if (owns(*s)) {
      ts.push_back(engine->out_buffer(s->eslot));
    } else if (s->projected) {
      ts.push_back(torch::empty({s->P.d * s->Q.d}, torch::kFloat));
    } else {
      ts.push_back(torch::empty({s->param.numel()}, s->param.options().device(torch::kCPU)));
    }
    owners.push_back(s->owner);
  }
  comm->broadcast(ts, owners, "update gather");
  size_t k = 0;
  for (CoreSlot* s : live) {
    if (s->owner < 0) {
      k += static_cast<size_t>(comm->world_size());
      s->param_version = s->param._version();  // the other ranges came from their owners, not a user edit
      continue;
    }
    if (!owns(*s)) apply_result(*s, ts[k]);
    ++k;
  }
}

}  // namespace lspo
