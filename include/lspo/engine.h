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
//
// Disk tier (LoHan-style; lspo/state_store.h). With `state_dir` set, slots are placed in order of
// add_slot: a slot whose fp32 state (both halves of the double buffer: 2 x 12 B per element, 2 x 8
// B moments-only) still fits `host_memory_limit_bytes` keeps it in host memory, every later one
// keeps it in generation files under state_dir ("disk slots"). A disk slot's job streams the
// committed generation in chunks (io_chunk_elems elements) through the same fused Adam kernel --
// read-ahead on one I/O thread, write-behind of the new generation on another, io_depth chunk
// buffers -- so its results are bitwise those of a host-memory slot. commit() adopts the new
// generation in memory; persist() makes every slot's committed state durable as ONE step
// (generation files fsynced, then MANIFEST atomically replaced; host-memory slots are written out
// too, so the directory is always a complete checkpoint). After a crash the directory holds the
// state of the last persist(), wholly; `resume` continues from it. An I/O error (full disk, ...)
// fails the job or the persist() with an lspo::Error naming the file and reason; the committed
// and the durable state stay intact. grad_buffer()/out_buffer() stay in host memory for every slot.
// API for disk slots: master()/exp_avg()/exp_avg_sq() throw (there is no host tensor to alias);
// load_state() returns a copy and store_state() writes a new generation, for every slot kind.
#pragma once
#include <torch/torch.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lspo/cpu_adam.h"
#include "lspo/state_store.h"

namespace lspo {

struct EngineOptions {
  bool overlap = true;                           // false: every submit runs inline (serial reference)
  bool record_timeline = false;                  // keep per-slot stage timestamps (Chrome trace)
  int64_t pinned_limit_bytes = int64_t(4) << 30; // budget for pinned host buffers
  bool try_pin = true;                           // pin host buffers when a CUDA device exists
  // Disk tier (see above). Empty state_dir: every slot in host memory (the limit must then hold).
  std::string state_dir;
  int64_t host_memory_limit_bytes = -1;          // host bytes for fp32 state; -1: unlimited
  bool resume = false;                           // continue from state_dir's MANIFEST
  int64_t io_chunk_elems = int64_t(1) << 18;     // elements per I/O chunk, a multiple of 1024
  int64_t io_depth = 4;                          // chunk buffers in flight (read-ahead + write-behind)
  bool direct_io = true;                         // O_DIRECT where the file system supports it
};

enum class StateKind { kMaster = 0, kExpAvg = 1, kExpAvgSq = 2 };

struct EngineStats {
  int64_t pinned_bytes = 0;        // host bytes currently pinned
  int64_t pageable_bytes = 0;      // host bytes that had to stay pageable (no GPU, budget, failure)
  int64_t pin_fallbacks = 0;       // buffers that wanted pinning but fell back to pageable
  int64_t jobs_run = 0;            // Adam jobs executed (including discarded speculations)
  int64_t commits = 0;
  int64_t host_state_bytes = 0;    // fp32 optimizer state held in host memory (both halves)
  int64_t disk_state_bytes = 0;    // fp32 optimizer state of disk slots (one generation)
  int64_t disk_slots = 0;
  int64_t io_buffer_bytes = 0;     // chunk buffers of the disk tier
  int64_t io_bytes_read = 0, io_bytes_written = 0;
  int64_t persists = 0;
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
  // Every slot kind (disk slots: the only way in): a copy of one part of the committed state
  // (undefined for the master of a moments-only slot), and a write of one part of it (the slot is
  // waited for; an uncommitted speculation is dropped). Disk slots write a new generation.
  torch::Tensor load_state(int64_t slot, StateKind kind);
  void store_state(int64_t slot, StateKind kind, const torch::Tensor& value);
  bool on_disk(int64_t slot) const;
  int64_t committed_step(int64_t slot) const;  // the step of the committed state (0: none yet)
  // Makes the committed state of every slot durable in state_dir as one atomic step (see above);
  // waits for every queued job first. Without a state_dir: nothing to do.
  void persist();

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
  static AdamBuffers kernel_buffers(const Slot& s, float* master, float* m, float* v, int64_t offset, int64_t n);
  static AdamBuffers speculative_buffers(const Slot& s);
  // disk tier (engine_disk.cpp)
  using ChunkFn = std::function<void(int64_t offset, int64_t count, float* chunk)>;
  void stream_slot(Slot& s, int64_t src_gen, int64_t dst_gen, const ChunkFn& fn);
  void place_slot(Slot& s, const torch::Tensor& master);
  void run_disk_job(Slot& s, const Job& job);
  void init_io();

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
  // disk tier
  std::unique_ptr<StateDir> dir_;
  std::mutex io_mu_;  // one stream at a time over the chunk buffers and I/O threads
  std::vector<AlignedBuffer> ring_;
  std::unique_ptr<IoThread> reader_, writer_;
};

}  // namespace lspo
