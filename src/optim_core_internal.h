// Internal: the slot record and private state of lspo::OptimizerCore (optim_core*.cpp only).
#pragma once
#include <c10/util/intrusive_ptr.h>

#include <limits>
#include <memory>
#include <optional>
#include <mutex>
#include <string>
#include <vector>

#include "lspo/dist.h"
#include "lspo/optim_core.h"
#ifdef LSPO_WITH_CUDA
#include "lspo/cuda.h"
#endif

namespace lspo {

// The inputs a speculative Adam job used; a job is committed only if they equal the step's.
struct SpecKey {
  int64_t step = 0;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0, grad_scale = 1;
  bool operator==(const SpecKey& o) const;
};

struct CoreSlot {
  torch::Tensor param;       // same TensorImpl as the face's parameter
  int64_t group = 0;
  int64_t index = 0;         // registration (forward) order; the engine queue's priority
  bool projected = false;
  int64_t owner = 0;         // data parallel: the rank that holds the state and runs Adam (dist.h);
                             // -1: a split dense slot, every rank owns the range [lo, lo + len) of it
  int64_t lo = 0, len = -1;  // this rank's range of the flattened parameter (len -1: all of it)
  std::string name;          // one name everywhere: engine slot, timeline, refit records
  int64_t eslot = -1;        // engine slot; -1 until the first gradient (nothing allocated before)
  int64_t step = 0;          // committed steps
  uint32_t param_version = 0;  // the parameter's version when the host master last matched it
  SparseProjector P, Q;      // projected: on the parameter's device
  torch::Tensor acc;         // projected: accumulated S [dP, dQ] fp32 (undefined between steps)
  int64_t acc_count = 0;
  // projected, refit-check step: the micro-batches' dense gradients summed in fp32, even ones into
  // fit_sum, odd ones into held_sum (undefined outside check steps)
  torch::Tensor fit_sum, held_sum;
  int64_t dense_count = 0;
  int64_t number = 0;        // projected: k, this slot's rank among the projected slots (seeds)
  int64_t checks = 0;        // refit checks run
  double refit_ref = std::numeric_limits<double>::quiet_NaN();  // held-out error the last check left
  double scale = 1.0;        // projected: W += scale * P u Q^T
  // speculation
  bool has_spec = false;     // a job was submitted for the coming step
  SpecKey spec;
  bool host_fresh = false;   // the host gradient buffer holds the slot's current gradient
  // dense: the gradient tensor copied to the host (weakly held) and its version then
  std::optional<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> grad_seen;
  uint32_t grad_version = 0;
  torch::Tensor inflight;    // CUDA: the gradient being copied (kept referenced, see copy_to_host)
#ifdef LSPO_WITH_CUDA
  cuda::Event d2h_done, h2d_done, compute_ready;
  bool d2h_pending = false, h2d_pending = false;
#endif
};

struct OptimizerCore::Impl {
  CoreOptions opt;
  std::unique_ptr<OffloadEngine> engine;
  std::vector<std::unique_ptr<CoreSlot>> slots;
  std::vector<GroupHyper> groups;
  std::vector<RefitRecord> refits;
  int64_t num_projected = 0;
  double spec_scale = 1.0;   // gradient scale speculations assume (the last step's AMP unscale)
  int64_t skipped = 0;
  bool last_skipped = false;
  double last_norm = 0;
  int64_t grads_modified = 0;
  mutable std::mutex mu;     // hooks (autograd threads) vs step() vs introspection
  std::shared_ptr<Communicator> comm;  // data parallel (dist.h); null: one process
  std::vector<int64_t> owner_load;     // per rank: state elements of the slots it owns
#ifdef LSPO_WITH_CUDA
  cuda::Stream d2h, h2d;     // the two copy streams (created on first CUDA use)
  int device = -1;
#endif

  CoreSlot& slot(int64_t i, const char* fn) const;
  const GroupHyper& hyper(const CoreSlot& s) const;
  bool refit_pending(const CoreSlot& s) const;
  bool has_grad(const CoreSlot& s) const;
  SpecKey key(const CoreSlot& s, int64_t step, double grad_scale) const;
  void ensure_allocated(CoreSlot& s);
  void sync_master(CoreSlot& s);
  void submit(CoreSlot& s, const SpecKey& k);
  void accumulate(CoreSlot& s, const torch::Tensor& S, bool owned);
  void add_dense(CoreSlot& s, const torch::Tensor& g);  // a check step's micro-batch -> fit/held sum
  void refit(CoreSlot& s);   // one refit check on the sums, then S = compress(fit + held)
  void drop(CoreSlot& s);
  // optim_core_persist.cpp: the projected slots' file in the state directory
  int64_t projected_tag() const;   // the largest step of the allocated projected slots (-1: none)
  int64_t write_projected();       // before the engine's persist(); returns the file's tag (-1: none)
  void prune_projected(int64_t keep);  // after it: every other proj file goes
  void resume_projected();
  // optim_core_copy.cpp: host <-> device
  void copy_to_host(CoreSlot& s, const torch::Tensor& src);  // src -> grad buffer (+ marks fresh)
  bool same_grad(const CoreSlot& s, const torch::Tensor& g) const;
  uintptr_t ready_event(CoreSlot& s);   // the D2H copy's event for the worker (0: none)
  void wait_upload(CoreSlot& s);        // the last H2D from out_buffer finished
  void before_acc_write(CoreSlot& s);   // the compute stream waits for the last D2H of acc
  void finish(CoreSlot& s);             // committed result -> the parameter
  void apply_result(CoreSlot& s, const torch::Tensor& out);  // out_buffer-shaped host result -> parameter
  // optim_core_dist.cpp: data parallel (dist.h)
  bool owns(const CoreSlot& s) const { return !comm || s.owner < 0 || s.owner == comm->rank(); }
  // this rank's part of a tensor of the parameter's shape (itself, unless the slot is split)
  static torch::Tensor part(const CoreSlot& s, const torch::Tensor& t) {
    return s.len < 0 ? t : t.view(-1).narrow(0, s.lo, s.len);
  }
  int64_t split_min_numel = 0;  // data parallel: dense slots this big are split over the ranks
  void assign_owner(CoreSlot& s);
  void dist_check_live(const std::vector<CoreSlot*>& live);
  void dist_reduce(const std::vector<CoreSlot*>& live);
  void reduce_pieces(CoreSlot& s, std::vector<torch::Tensor>& ts, std::vector<int64_t>& owners);
  void dist_sum(std::vector<double>& v, const char* what);
  void dist_norms(std::vector<double>& norms, const std::vector<CoreSlot*>& live);  // + trailing entries
  void dist_sync_refits(const std::vector<CoreSlot*>& refitted, size_t first_record);
  void dist_gather(const std::vector<CoreSlot*>& live);
};

// The projector part of a projected slot's state (positions, values, whitening factors -- a side kept
// whole has none --, refit reference and check count) into st; `copy`: clones, else aliases.
void put_projectors(const CoreSlot& s, SlotState& st, bool copy);
// A named error (naming `who`) unless st's whitening factors match s's projectors, side by side.
void check_whitening(const SlotState& st, const CoreSlot& s, const std::string& who);

}  // namespace lspo
