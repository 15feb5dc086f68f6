// lspo/optim_core.h -- the optimizer core: ONE implementation of lspo's offloading optimizers,
// used by both faces (the Python torch.optim.Optimizer subclasses in python/lspo and the
// torch::optim::Optimizer subclasses of lspo/optim.h). The faces only translate options, register
// gradient hooks (one call into the core per gradient) and map state into their own containers.
//
// Slot kinds (one slot per parameter, in registration = forward order):
//   dense      full offload: fp32 master + moments on the host; the fused CPU AdamW updates them and
//              the new weights come back (the LoHan / ZeRO-Offload "active gradient offloading").
//   projected  LSP-Offload: a learned sparse pair (P [m, dP], Q [n, dQ]); the gradient is compressed
//              to S = P^T G Q on W's device, Adam runs on S in the compressed space (host moments
//              [dP, dQ]), the update u comes back and W += P u Q^T is applied on W's device.
// Nothing is allocated for a parameter until its first gradient (frozen parameters cost nothing).
//
// One gradient, one step (see docs/architecture.md):
//   backward   on_grad(slot) (post-accumulate-grad hook) or on_compressed(slot, S) (the wrap path):
//              dense: G -> host buffer (D2H on the core's copy stream + event on CUDA);
//              projected: S += P^T G Q on W's device, p.grad freed, S -> host buffer;
//              then a speculative Adam job on the engine's worker (overlapped with backward).
//              On a refit-check step a projected layer's micro-batch gradients are instead summed
//              densely in two halves (even micro-batches: the fit sum, odd: the held-out sum) and
//              p.grad is freed (memory: two m x n sums in the gradient's dtype per layer that is
//              checking: every projected layer, or about 1/refit_every of them with refit_stagger).
//   step()     the step boundary: global norm, the non-finite skip (AMP found_inf included), refit
//              checks (lspo::refit, lspo/refit.h: fit on the fit sum, judged on the held-out sum, kept
//              only if the held-out error improves; then fit + held-out sum is compressed, so
//              accumulation stays equivalent), clipping, then each
//              speculation is committed if its inputs were exactly right or recomputed otherwise,
//              and the result is applied (H2D on the second copy stream, the compute stream waits
//              on an event). The committed state is bitwise what the serial schedule computes.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lspo/engine.h"
#include "lspo/projector.h"
#include "lspo/refit.h"

namespace lspo {

// The update scale an unset `scale` means, per basis, so that LSPAdamW runs at the lr a user gives
// AdamW: 1.0 for kSparse; 3.0 for kSvd, whose best lr was about 3x AdamW's on both jobs measured
// (docs/convergence.md: the quick fine-tuning protocol, lr 0.01 vs 0.003, and the main job, where
// 3e-4 gave 3.5096 against 3.5361 at AdamW's 1e-4; both with one_sided).
double default_update_scale(ProjectorBasis basis);

// Optimizer-state bytes of a projected [m, n] weight in the square layout at (d, r): two fp32 moments
// dP x dQ, ELL projectors (4-byte index + 4-byte value per nonzero), the whitening factors (when
// whitened): 8 dP dQ + 8 r (m + n) + 4 (dP^2 + dQ^2), dP = min(d, m), dQ = min(d, n). The one-sided
// layout's budget, and the one peers are matched to (Python: lspo.lsp.square_state_bytes).
int64_t square_state_bytes(int64_t m, int64_t n, int64_t d, int64_t r, bool whitened = true);

// One-sided layout of a projected [m, n] weight with LSPAdamW's (d, r): the projected side's size k,
// the largest k in [r, min(m, n)] whose state bytes -- moments 8 max(m, n) k, the identity's ELL
// 8 max(m, n), the projector's ELL 8 r min(m, n), its whitening factor 4 k^2 (when whitened) -- fit in
// those of the square layout: 8 dP dQ + 8 r (m + n) + 4 (dP^2 + dQ^2) (whitened), dP = min(d, m),
// dQ = min(d, n). At least r. dense (basis="svd"): the projector is a dense orthonormal basis with
// shared positions (SparseProjector::dense_basis), 4 k min(m, n) + 4 k bytes and no whitening factor.
int64_t one_sided_rank(int64_t m, int64_t n, int64_t d, int64_t r, bool whitened, bool dense = false);

class Communicator;  // lspo/dist.h

struct CoreOptions {
  std::string name = "OffloadAdamW";             // used in error messages
  bool overlap = true;                           // false: the serial reference schedule
  bool record_timeline = false;
  int64_t pinned_limit_bytes = int64_t(4) << 30;
  double max_grad_norm = 0.0;                    // <= 0: no clipping
  uint64_t seed = 0;                             // projected slot k: seeds seed + 2k (P), seed + 2k + 1 (Q)
  // Projected slots: whitened projectors (an orthonormal basis U = P T, lspo/projector.h) and the
  // update size: W += scale * P u Q^T, scale = update_scale (nullopt: default_update_scale(basis)), or
  // sqrt(m n / (dP dQ)) per layer when scale_auto (a full AdamW step's Frobenius norm at the same lr).
  bool whiten = true;
  std::optional<double> update_scale;
  bool scale_auto = false;
  // Every refit check also measures whitened random projectors of the same d, r on the held-out sum
  // (RefitRecord::random_heldout; one extra error evaluation per check).
  bool refit_diagnostics = false;
  // Staggered refit checks: projected slot j checks at steps t with (t - 1 - j % k) % k == 0 (k =
  // refit_every), so about 1/k of the layers hold their dense check sums at once (device memory on
  // a GPU) and the checks' time is spread over the steps; false (default, measured better in
  // docs/convergence.md): every layer at t = 1, 1 + k, ...
  bool refit_stagger = false;
  // One-sided layout (issue 12, item 4; measured in docs/convergence.md): the larger dimension of each
  // projected weight is kept whole (SparseProjector::identity, no whitening factor), the smaller one
  // is projected to the largest k whose state (moments, projectors, whitening factor) fits in the
  // bytes of the square min(d, m) x min(d, n) layout (one_sided_rank). S is then m x k (or k x n).
  bool one_sided = false;
  // The basis of the projected sides (lspo/projector.h, lspo/refit.h): kSparse, learned (d, r)-sparse
  // values; kSvd, dense projectors (r = d) that every kept refit check sets to the leading singular
  // directions of the check's fit sum (no fit iterations). With one_sided, the dense side's bytes are
  // in one_sided_rank's budget; two-sided, the dense pair costs 4 (m dP + n dQ) bytes (shared
  // positions, no whitening factor: the bases are orthonormal) instead of 8 r (m + n) + 4 (dP^2 + dQ^2).
  ProjectorBasis basis = ProjectorBasis::kSparse;
  // The disk tier (engine.h): state that does not fit host_memory_limit_bytes lives in files under
  // state_dir; every step() ends with the engine's atomic persist(); resume continues from it.
  std::string state_dir;
  int64_t host_memory_limit_bytes = -1;
  bool resume = false;
};

// Per param group, handed to the core before every step (faces read them from their groups, so LR
// schedulers and option edits take effect).
struct GroupHyper {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  int64_t refit_every = 0;         // projected slots: refit check at steps 1, 1 + k, ... (0: never)
  // RefitOptions (lspo/refit.h) of the checks: threshold, iters, lr, l2, drift, reinit
  double refit_threshold = 0.0;
  int64_t refit_iters = 10;
  double refit_lr = 0.1;
  double refit_l2 = 0.01;
  double refit_drift = 0.1;
  ReinitPolicy refit_reinit = ReinitPolicy::kOnFailure;
};

struct StepInputs {
  std::optional<double> amp_scale;  // GradScaler's scale when the gradients are still scaled
  bool found_inf = false;           // GradScaler found an inf/NaN (after unscale_)
  bool unscaled_by_caller = false;  // GradScaler.unscale_(opt) ran before step()
};

struct StepResult {
  bool skipped = false;
  bool ran = false;                 // false: no parameter had a gradient
  double grad_norm = 0.0;           // global norm before clipping (NaN when skipped)
};

// One refit check of one projected slot (the fields of lspo::RefitResult, and where it happened).
struct RefitRecord {
  int64_t step = 0;
  std::string param;
  int64_t check = 0;               // the slot's check count (1 at its first check)
  RefitResult result;
  double random_heldout = std::numeric_limits<double>::quiet_NaN();  // CoreOptions::refit_diagnostics
};

// The state of one slot, as both faces' checkpoints hold it (keys as torch's Adam state):
//   step (committed steps), exp_avg, exp_avg_sq (fp32 host; the parameter's shape, or [dP, dQ]),
//   master_param (dense), proj_P_indices/values, proj_Q_indices/values, proj_P_whiten/proj_Q_whiten
//   (whitened projectors), proj_refit_ref (the held-out error the last refit check left; NaN: none).
struct SlotState {
  int64_t step = 0;
  torch::Tensor exp_avg, exp_avg_sq, master_param;
  torch::Tensor P_indices, P_values, Q_indices, Q_values, P_whiten, Q_whiten;
  double refit_ref = std::numeric_limits<double>::quiet_NaN();
  int64_t refit_checks = 0;  // checks run (they seed a re-init's fresh values)
};

// The checkpoint entry of one slot as both faces hold it: {"step": fp32 scalar tensor, "exp_avg",
// "exp_avg_sq", "master_param" | "proj_P_indices", "proj_P_values", "proj_Q_indices",
// "proj_Q_values", ["proj_P_whiten", "proj_Q_whiten"], "proj_refit_ref" (fp64 scalar tensor),
// "proj_refit_checks" (int64 scalar tensor)}. from_dict accepts "step" as a tensor or a number; `who` names the caller.
c10::impl::GenericDict slot_state_to_dict(const SlotState& st);
SlotState slot_state_from_dict(const c10::impl::GenericDict& d, const std::string& who);

namespace detail {
std::string shape_str(const torch::Tensor& t);  // "[2, 3]"
}  // namespace detail

class OptimizerCore {
 public:
  explicit OptimizerCore(CoreOptions opt);
  ~OptimizerCore();
  OptimizerCore(const OptimizerCore&) = delete;
  OptimizerCore& operator=(const OptimizerCore&) = delete;

  // Registration (no host memory yet). `subspace`/`nnz` only for projected slots. Returns the slot.
  int64_t add_param(const torch::Tensor& param, int64_t group, bool projected, int64_t subspace = 0,
                    int64_t nnz = 0);
  int64_t num_slots() const;
  void set_groups(std::vector<GroupHyper> groups);
  void set_max_grad_norm(double v);

  // Backward: the parameter's .grad is complete (post-accumulate-grad hook); or, for a projected
  // slot, one micro-batch's compressed gradient S [dP, dQ] fp32 on W's device (the wrap path).
  void on_grad(int64_t slot);
  void on_compressed(int64_t slot, const torch::Tensor& S);
  // A projected slot whose next step is a refit step wants its dense gradient (the wrap path then
  // lets autograd produce it).
  bool dense_this_step(int64_t slot) const;

  StepResult step(const StepInputs& in = {});
  // Allocates every slot whose parameter requires grad now, in registration order (the disk tier
  // places state in that order, and resume needs the same order every run). Without a state_dir
  // slots are allocated at their first gradient.
  void allocate_all();
  // After allocate_all() with resume: step counts from the state directory, the dense parameters'
  // weights from their masters, and the projected parameters' weights, projectors and refit state
  // from the directory's projector file of the committed step (optim_core_persist.cpp).
  void resume();
  int64_t slots_on_disk() const;
  bool on_disk(int64_t slot) const;  // the slot's state lives in files (disk tier)
  void zero_grad();  // forgets accumulated compressed gradients (the faces clear .grad themselves)

  // Introspection and state.
  bool is_projected(int64_t slot) const;
  // projected: the compressed gradient accumulated since the last step (a copy; undefined if none)
  torch::Tensor accumulated(int64_t slot) const;
  bool allocated(int64_t slot) const;
  int64_t step_count(int64_t slot) const;
  const std::string& slot_name(int64_t slot) const;
  std::pair<SparseProjector, SparseProjector> projectors(int64_t slot) const;  // projected only
  // Committed state; tensors are views of host state when `copy` is false (valid until the next step).
  std::optional<SlotState> state(int64_t slot, bool copy) const;
  // Validates `st` against the slot (lspo::Error naming what does not fit), then adopts it unless
  // `dry_run` (faces check every slot first, so a bad checkpoint changes nothing).
  void load_state(int64_t slot, const SlotState& st, bool dry_run = false);
  std::vector<RefitRecord> refits() const;
  int64_t skipped_steps() const;
  bool last_step_skipped() const;
  double last_grad_norm() const;
  int64_t grads_modified_after_hook() const;  // steps whose dense grads changed after backward

  OffloadEngine& engine();
  const OffloadEngine& engine() const;

  // Data parallel (lspo/dist.h): set before the first gradient, on every rank, after the same
  // add_param calls; every slot (and any added later) gets an owner rank. Not with a state_dir.
  // Dense parameters of >= split_min_numel elements (contiguous; 0: none) are split into one
  // contiguous range per rank (ZeRO style) instead of having one owner.
  void set_communicator(std::shared_ptr<Communicator> comm, int64_t split_min_numel = 0);
  bool distributed() const;
  int64_t owner(int64_t slot) const;  // 0 without a communicator
  bool owns(int64_t slot) const;      // true without a communicator
  std::pair<int64_t, int64_t> shard_range(int64_t slot) const;  // (lo, len) of a split slot; len -1: whole
  // The tensors (and their destination ranks) the slot would send to step()'s reduce now: a face may
  // launch that reduce early, from the gradient hook of the last micro-batch (dist.h).
  std::pair<std::vector<torch::Tensor>, std::vector<int64_t>> reduce_pieces(int64_t slot);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lspo
