// lspo/engine.h -- the offload engine: per-layer host slots, one CPU worker thread running the
// fused Adam, speculative (double-buffered) steps, a pinned buffer budget and a timeline.
//
// One slot per offloaded tensor. A slot owns, on the host:
//   * committed fp32 state: exp_avg, exp_avg_sq and (Identity / full offload) the fp32 master;
//     moments-only slots (LearnedSparse: the d x d compressed space) have no master;
//   * a second copy of that state (the speculative half of a double buffer);
//   * grad_buffer(): where the caller puts the (compressed) gradient -- pinned when a CUDA device
//     exists and the pinned budget allows, pageable otherwise (counted, see stats());
//   * out_buffer(): the result -- the new weights in the parameter's dtype (Identity) or the
//     update u = -lr * m_hat / (sqrt(v_hat) + eps) (moments-only).
//
// submit(slot, cfg, step) queues "copy committed -> speculative, adam_step on the speculative
// half writing out_buffer" for the worker thread (or runs it inline with overlap=false: the serial
// reference schedule). Nothing committed changes until commit(slot), which swaps the halves; a
// speculation that turns out wrong (the global clip coefficient is not 1, the gradient was
// accumulated further, a non-finite gradient, a changed learning rate) is simply resubmitted or
// dropped, so every committed state is exactly the one a serial schedule computes (bitwise: the
// same kernel on the same inputs).
//
// Queue policy: the worker always takes the pending job with the smallest `order` (the slot's
// position in the forward pass), ties broken by submission time. During backward jobs arrive deep
// layer first, so an idle worker runs them first-come-first-served; once jobs pile up, the layers
// the next forward needs first are served first. This replaces the LSP paper's hand-tuned mix of
// FCFS (deep layers) and LCFS (shallow layers) with one rule that never starves layer 0.
#pragma once
#include <torch/torch.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lspo/cpu_adam.h"

namespace lspo {

struct EngineOptions {
  bool overlap = true;                           // false: every submit runs inline (serial reference)
  bool record_timeline = false;                  // keep per-slot stage timestamps (Chrome trace)
  int64_t pinned_limit_bytes = int64_t(4) << 30; // budget for pinned host buffers
  bool try_pin = true;                           // pin host buffers when a CUDA device exists
};

struct EngineStats {
  int64_t pinned_bytes = 0;        // host bytes currently pinned
  int64_t pageable_bytes = 0;      // host bytes that had to stay pageable (no GPU, budget, failure)
  int64_t pin_fallbacks = 0;       // buffers that wanted pinning but fell back to pageable
  int64_t jobs_run = 0;            // Adam jobs executed (including discarded speculations)
  int64_t commits = 0;
};

struct TimelineEvent {
  std::string name;   // stage: "adam", "d2h", "backward", ...
  std::string cat;    // slot name or "engine"
  int64_t tid = 0;    // 0: caller thread, 1: worker, 2/3: copy streams
  double t0_us = 0, t1_us = 0;  // microseconds since the engine was created
};

class OffloadEngine {
 public:
  explicit OffloadEngine(EngineOptions opt = {});
  ~OffloadEngine();
  OffloadEngine(const OffloadEngine&) = delete;
  OffloadEngine& operator=(const OffloadEngine&) = delete;

  // Identity slot: `master` is copied to an fp32 host master; the gradient arrives in grad_dtype,
  // the new weights leave in out_dtype. Moments-only slot: pass an undefined `master` and numel.
  int64_t add_slot(const std::string& name, const torch::Tensor& master, int64_t numel,
                   torch::ScalarType grad_dtype, torch::ScalarType out_dtype, int64_t order);
  int64_t num_slots() const { return static_cast<int64_t>(slots_.size()); }

  torch::Tensor grad_buffer(int64_t slot) const;  // flat, numel elements, grad_dtype
  torch::Tensor out_buffer(int64_t slot) const;   // flat, numel elements, out_dtype
  // Committed state (flat fp32 host tensors; master undefined for moments-only slots). Writing to
  // them (load_state_dict, carrying state into a new subspace) is allowed while the slot is idle.
  torch::Tensor master(int64_t slot) const;
  torch::Tensor exp_avg(int64_t slot) const;
  torch::Tensor exp_avg_sq(int64_t slot) const;

  // Queue one speculative step of `slot` on the gradient now in grad_buffer(slot). A slot already
  // queued or running is waited for first. `ready_event` (a cudaEvent_t as an integer, 0: none) is
  // synchronised by the worker before it reads the gradient (the D2H copy's completion).
  void submit(int64_t slot, const AdamConfig& cfg, int64_t step, uintptr_t ready_event = 0);
  void wait(int64_t slot);  // until the slot's last submitted job finished (rethrows its error)
  void wait_all();
  void commit(int64_t slot);  // adopt the finished speculation as the committed state
  bool has_result(int64_t slot) const;  // a finished, uncommitted speculation exists

  EngineStats stats() const;
  const EngineOptions& options() const { return opt_; }

  // Timeline: stage timestamps (when record_timeline) and events added by the caller.
  double now_us() const;
  void add_event(const std::string& name, const std::string& cat, int64_t tid, double t0_us, double t1_us);
  std::vector<TimelineEvent> timeline() const;
  std::string timeline_json() const;  // Chrome trace format ("traceEvents")
  void clear_timeline();
  void set_record_timeline(bool on) { opt_.record_timeline = on; }

 private:
  struct Slot;
  struct Job {
    int64_t slot;
    int64_t order;
    uint64_t seq;
    AdamConfig cfg;
    int64_t step;
    uintptr_t ready_event;
  };
  torch::Tensor host_buffer(int64_t numel, torch::ScalarType dtype, bool want_pinned);
  void run_job(const Job& job);
  void worker_loop();
  void check_slot(int64_t slot, const char* fn) const;

  EngineOptions opt_;
  std::vector<std::unique_ptr<Slot>> slots_;
  mutable std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  std::vector<Job> queue_;  // a heap on (order, seq)
  uint64_t seq_ = 0;
  bool stop_ = false;
  EngineStats stats_;
  std::vector<TimelineEvent> events_;
  std::chrono::steady_clock::time_point t_origin_;
  std::thread worker_;
};

}  // namespace lspo
