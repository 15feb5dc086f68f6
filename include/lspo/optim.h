// lspo/optim.h -- drop-in LibTorch optimizers over the offload engine (lspo/engine.h):
//
//   lspo::OffloadAdamW  full offload (the Identity compressor): fp32 master weights and fp32 Adam
//                       moments live in host memory; the fused CPU AdamW updates them on the
//                       engine's worker thread; the new weights are copied back into the parameter
//                       (fp32, bf16 or fp16; CPU or CUDA). Same math as torch::optim::AdamW.
//   lspo::LSPAdamW      LSP-Offload: a 2-D weight W [m, n] whose dims are both >= min_dim gets a pair
//                       of learned sparse projectors P [m, dP], Q [n, dQ]; its gradient is compressed
//                       to S = P^T G Q, Adam runs on S in the compressed space (host moments
//                       [dP, dQ]), the update u comes back and is applied, W += P u Q^T. Every other
//                       parameter is handled exactly as by OffloadAdamW.
//
// Both are torch::optim::Optimizer subclasses: `opt.zero_grad(); loss.backward(); opt.step();`,
// per-group options (param groups), LR schedulers (get_lr/set_lr), save/load through
// torch::serialize archives (torch::save(opt, path) / torch::load(opt, path)).
//
// The step is lspo::OptimizerCore's (optim_core.h), the same code the Python optimizers run: the
// global norm (dense gradients, and the compressed S of projected parameters), the non-finite skip,
// refits on the step's whole dense gradient, clipping folded into the kernel's grad_scale,
// speculation commit or recompute, and the write-back (weights copied in / W += P u Q^T).
// overlap = false runs every Adam job inline: the serial reference schedule, bitwise the same.
// Clipping (max_grad_norm > 0) uses the global L2 norm as torch::nn::utils::clip_grad_norm_ does:
// per-tensor fp32 norms, their L2 norm `total`, coefficient max_grad_norm / (total + 1e-6) when
// below 1. last_grad_norm() reports `total` (before clipping).
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "lspo/engine.h"
#include "lspo/optim_core.h"
#include "lspo/projector.h"
#include "lspo/torch_file.h"  // save_torch_file: the checkpoints' file format

namespace lspo {

// Options of OffloadAdamW. Per group: lr, betas, eps, weight_decay. Optimizer-wide (read from the
// defaults, ignored in other groups): max_grad_norm, overlap, record_timeline, pinned_limit_bytes.
struct OffloadAdamWOptions : public torch::optim::OptimizerCloneableOptions<OffloadAdamWOptions> {
  OffloadAdamWOptions(double lr = 1e-3);  // NOLINT: implicit, as torch's options
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 1e-2;
  TORCH_ARG(double, max_grad_norm) = 0.0;               // <= 0: no clipping
  TORCH_ARG(bool, overlap) = true;                       // false: serial reference schedule
  TORCH_ARG(bool, record_timeline) = false;              // engine timeline (timeline_json())
  TORCH_ARG(int64_t, pinned_limit_bytes) = int64_t(4) << 30;
  TORCH_ARG(std::string, state_dir) = "";                 // disk tier (engine.h): state beyond the limit
  TORCH_ARG(int64_t, host_memory_limit_bytes) = -1;       // fp32 state in host memory; -1: unlimited
  TORCH_ARG(bool, resume) = false;  // continue from state_dir's last committed step (weights included)

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
};

// Options of LSPAdamW (defaults as the Python lspo.LSPAdamW). Per group: lr, betas, eps,
// weight_decay, project, subspace, nnz, min_dim (these four are read when a parameter is first
// registered), refit_every, refit_threshold, refit_iters, refit_lr, refit_l2, refit_drift,
// refit_reinit. Optimizer-wide (defaults only): whiten, scale, scale_auto, refit_diagnostics, refit_stagger, one_sided,
// basis, max_grad_norm, overlap, record_timeline, pinned_limit_bytes, seed.
struct LSPAdamWOptions : public torch::optim::OptimizerCloneableOptions<LSPAdamWOptions> {
  LSPAdamWOptions(double lr = 1e-4);  // NOLINT
  TORCH_ARG(double, lr) = 1e-4;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 0.0;
  // unset: project 2-D parameters that require grad and have both dims >= min_dim; true: project
  // every parameter of the group (2-D, both dims >= nnz, else an error); false: project none
  TORCH_ARG(std::optional<bool>, project) = std::nullopt;
  TORCH_ARG(int64_t, subspace) = 512;        // d: S is [min(d, m), min(d, n)]
  TORCH_ARG(int64_t, nnz) = 8;               // r: nonzeros per projector row
  TORCH_ARG(int64_t, min_dim) = 0;           // both dims >= min_dim to be projected; 0: = subspace
  TORCH_ARG(int64_t, refit_every) = 10;      // refit check at steps 1, 1 + k, 1 + 2k, ... (0: never)
  // a check fits when the held-out error exceeds refit_threshold and has drifted above
  // (1 + refit_drift) x what the last check left (lspo/refit.h)
  TORCH_ARG(double, refit_threshold) = 0.0;
  TORCH_ARG(int64_t, refit_iters) = 10;      // Adam iterations of one fit (>= 1)
  TORCH_ARG(double, refit_lr) = 0.1;         // the fit's Adam lr, relative to the values' RMS
  TORCH_ARG(double, refit_l2) = 0.01;        // proximal term toward the start values
  TORCH_ARG(double, refit_drift) = 0.1;
  TORCH_ARG(std::string, refit_reinit) = "on_failure";  // never | on_failure | always
  TORCH_ARG(bool, whiten) = true;            // orthonormal bases U = P T (a true projection)
  TORCH_ARG(std::optional<double>, scale);   // W += scale * P u Q^T; unset: default_update_scale(basis)
  TORCH_ARG(bool, scale_auto) = false;       // scale = sqrt(m n / (dP dQ)) per layer instead
  TORCH_ARG(bool, refit_diagnostics) = false;  // records the held-out error of random projectors too
  TORCH_ARG(bool, refit_stagger) = false;     // layer k checks at 1 + k % refit_every, then every refit_every
  TORCH_ARG(bool, one_sided) = true;          // the larger side whole, the smaller projected (CoreOptions)
  TORCH_ARG(std::string, basis) = "svd";      // svd | sparse: dense top singular or learned sparse (CoreOptions)
  TORCH_ARG(double, max_grad_norm) = 0.0;
  TORCH_ARG(bool, overlap) = true;
  TORCH_ARG(bool, record_timeline) = false;
  TORCH_ARG(int64_t, pinned_limit_bytes) = int64_t(4) << 30;
  TORCH_ARG(int64_t, seed) = 0;              // projector i uses seeds seed + 2i (P), seed + 2i + 1 (Q)
  TORCH_ARG(std::string, state_dir) = "";
  TORCH_ARG(int64_t, host_memory_limit_bytes) = -1;
  TORCH_ARG(bool, resume) = false;  // as OffloadAdamWOptions::resume (projectors and refit state too)

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
};

// What state() holds for each parameter (refreshed after every step; the tensors are views of the
// engine's committed host state: read them, do not keep them across steps). A parameter whose
// state lives in files (state_dir) has only `step` here: read it with exp_avg()/master() below.
struct OffloadParamState : public torch::optim::OptimizerCloneableParamState<OffloadParamState> {
  TORCH_ARG(int64_t, step) = 0;
  TORCH_ARG(torch::Tensor, exp_avg);     // fp32 host: the parameter's shape, or [dP, dQ] if projected
  TORCH_ARG(torch::Tensor, exp_avg_sq);
  TORCH_ARG(torch::Tensor, master);      // fp32 host master (undefined for projected parameters)
};

// The shared machinery of OffloadAdamW and LSPAdamW: a face over lspo::OptimizerCore (optim_core.h),
// the same core the Python optimizers drive. Gradient hooks are registered from C++ (post-accumulate-
// grad hooks: each gradient reaches the core as soon as backward completes it, and the worker's Adam
// overlaps the rest of backward); gradients assigned without backward are taken in step().
class OffloadOptimizerBase : public torch::optim::Optimizer {
 public:
  ~OffloadOptimizerBase() override;
  torch::Tensor step(LossClosure closure = nullptr) override;
  // Also forgets compressed gradients accumulated since the last step (LSP).
  void zero_grad(bool set_to_none = true);
  // torch::save(opt, path) / torch::load(opt, path): the archive holds the checkpoint dict below.
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
  // The checkpoint as the Python face's state_dict() (a torch.save file: torch.load(path,
  // weights_only=True) + opt.load_state_dict() reads it in Python, and the reverse).
  void save_checkpoint(const std::string& path) const;
  void load_checkpoint(const std::string& path);
  c10::IValue checkpoint() const;
  void load_checkpoint(const c10::IValue& checkpoint);

  // AMP: gradients are scaled by `scale` (a loss scaler's); the kernel unscales while it reads, and
  // a non-finite gradient skips the step (the scaler then backs off). nullopt: unscaled gradients.
  void set_grad_scale(std::optional<double> scale) { grad_scale_ = scale; }

  bool last_step_skipped() const { return core_->last_step_skipped(); }
  int64_t skipped_steps() const { return core_->skipped_steps(); }
  double last_grad_norm() const { return core_->last_grad_norm(); }  // NaN when the last step was skipped
  int64_t refits() const;                                             // projector refits done so far

  // Per-parameter introspection (lspo::Error for a tensor the optimizer does not hold).
  int64_t step_count(const torch::Tensor& param) const;
  bool is_projected(const torch::Tensor& param) const;
  torch::Tensor exp_avg(const torch::Tensor& param) const;     // copies of the committed state
  torch::Tensor exp_avg_sq(const torch::Tensor& param) const;
  torch::Tensor master(const torch::Tensor& param) const;      // undefined for projected params
  SparseProjector row_projector(const torch::Tensor& param) const;  // P (projected only)
  SparseProjector col_projector(const torch::Tensor& param) const;  // Q

  EngineStats engine_stats() const { return core_->engine().stats(); }
  std::string timeline_json() const { return core_->engine().timeline_json(); }
  void clear_timeline() { core_->engine().clear_timeline(); }
  OptimizerCore& core() { return *core_; }

 protected:
  struct Hyper {
    double lr, beta1, beta2, eps, weight_decay;
    bool lsp = false;                    // LSPAdamW (else OffloadAdamW: nothing is projected)
    std::optional<bool> project;
    int64_t subspace = 0, nnz = 0, min_dim = 0, refit_every = 0, refit_iters = 0;
    double refit_threshold = 0, refit_lr = 0, refit_l2 = 0, refit_drift = 0;
    ReinitPolicy refit_reinit = ReinitPolicy::kOnFailure;
  };
  struct Global {
    double max_grad_norm = 0;
    bool overlap = true, record_timeline = false;
    int64_t pinned_limit_bytes = 0, seed = 0;
    std::string state_dir;
    int64_t host_memory_limit_bytes = -1;
    bool resume = false;
    bool whiten = true, scale_auto = false, refit_diagnostics = false, refit_stagger = false;
    std::optional<double> scale = std::nullopt;
    bool one_sided = false;
    std::string basis = "sparse";
  };
  OffloadOptimizerBase(const std::vector<torch::optim::OptimizerParamGroup>& groups,
                       std::unique_ptr<torch::optim::OptimizerOptions> defaults, const char* name, Global global);
  // The group's hyper-parameters, validated (lspo::Error naming the option otherwise).
  virtual Hyper hyper(const torch::optim::OptimizerOptions& options) const = 0;
  // Registers parameters not seen yet (constructor, and groups added later with add_param_group).
  void sync_slots();
  // resume = true: the core continues from state_dir (after sync_slots placed every slot)
  void resume_from_state_dir();

 private:
  int64_t slot_of(const torch::Tensor& param, const char* fn) const;
  void sync_groups();
  void refresh_state();

  std::string name_;
  std::shared_ptr<OptimizerCore> core_;
  std::vector<torch::Tensor> params_;                 // registration order == core slots
  std::unordered_map<const void*, int64_t> index_;    // TensorImpl* -> slot
  std::vector<size_t> group_of_;                      // slot -> param group
  std::optional<double> grad_scale_;
};

class OffloadAdamW : public OffloadOptimizerBase {
 public:
  explicit OffloadAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                        OffloadAdamWOptions defaults = {});
  explicit OffloadAdamW(std::vector<torch::Tensor> params, OffloadAdamWOptions defaults = {})
      : OffloadAdamW({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

 protected:
  Hyper hyper(const torch::optim::OptimizerOptions& options) const override;
};

class LSPAdamW : public OffloadOptimizerBase {
 public:
  explicit LSPAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                    LSPAdamWOptions defaults = {});
  explicit LSPAdamW(std::vector<torch::Tensor> params, LSPAdamWOptions defaults = {})
      : LSPAdamW({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

 protected:
  Hyper hyper(const torch::optim::OptimizerOptions& options) const override;
};

// Parameter groups for LSPAdamW from a module, by the Python lspo.LSPAdamW(module) rule: group 0
// holds the weights of torch::nn::Linear layers that are not tied to (the same tensor as) an
// Embedding weight and not named lm_head / embed_out / output_layer (output heads stay dense) --
// projected when both dims >= min_dim (options `o`); group 1
// holds every other parameter with project(false). Usage: LSPAdamW opt(lsp_param_groups(*model, o), o).
std::vector<torch::optim::OptimizerParamGroup> lsp_param_groups(const torch::nn::Module& model,
                                                                const LSPAdamWOptions& o = {});

}  // namespace lspo
