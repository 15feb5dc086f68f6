// The offload engine (lspo/engine.h): slots, the worker thread, speculation, pinned budget, timeline.
#include "lspo/engine.h"
#include "engine_internal.h"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <sstream>

#ifdef LSPO_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace lspo {

namespace {
bool cuda_device_present() {
#ifdef LSPO_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
#else
  return false;
#endif
}
}  // namespace

OffloadEngine::OffloadEngine(EngineOptions opt) : opt_(opt), t_origin_(std::chrono::steady_clock::now()) {
  LSPO_CHECK(opt_.pinned_limit_bytes >= 0, "OffloadEngine: pinned_limit_bytes must be >= 0");
  LSPO_CHECK(opt_.io_chunk_elems >= 1024 && opt_.io_chunk_elems % 1024 == 0,
             "OffloadEngine: io_chunk_elems must be a positive multiple of 1024, got ", opt_.io_chunk_elems);
  LSPO_CHECK(opt_.io_depth >= 2, "OffloadEngine: io_depth must be >= 2, got ", opt_.io_depth);
  LSPO_CHECK(!opt_.resume || !opt_.state_dir.empty(), "OffloadEngine: resume needs a state_dir");
  if (!opt_.state_dir.empty())
    dir_ = std::make_unique<StateDir>(opt_.state_dir, opt_.resume, opt_.io_chunk_elems);
  if (opt_.overlap) worker_ = std::thread([this] { worker_loop(); });
}

OffloadEngine::~OffloadEngine() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void OffloadEngine::check_slot(int64_t slot, const char* fn) const {
  LSPO_CHECK(slot >= 0 && slot < num_slots(), "OffloadEngine::", fn, ": no slot ", slot, " (engine has ",
             num_slots(), ")");
}

torch::Tensor OffloadEngine::host_buffer(int64_t numel, torch::ScalarType dtype, bool want_pinned) {
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  auto opts = torch::TensorOptions().dtype(dtype).device(torch::kCPU);
  if (want_pinned && opt_.try_pin && cuda_device_present()) {
    bool fits;
    {
      std::lock_guard<std::mutex> g(mu_);
      fits = stats_.pinned_bytes + bytes <= opt_.pinned_limit_bytes;
    }
    if (fits) {
      try {
        torch::Tensor t = torch::empty({numel}, opts.pinned_memory(true));
        std::lock_guard<std::mutex> g(mu_);
        stats_.pinned_bytes += bytes;
        return t;
      } catch (const std::exception&) {
        // the driver refused to pin: fall through to pageable memory
      }
    }
    std::lock_guard<std::mutex> g(mu_);
    if (stats_.pin_fallbacks++ == 0)
      std::fprintf(stderr, "[lspo] warning: OffloadEngine could not pin %lld bytes (budget %lld, pinned %lld); "
                           "using pageable host memory (copies will not overlap)\n",
                   static_cast<long long>(bytes), static_cast<long long>(opt_.pinned_limit_bytes),
                   static_cast<long long>(stats_.pinned_bytes));
  }
  std::lock_guard<std::mutex> g(mu_);
  stats_.pageable_bytes += bytes;
  return torch::empty({numel}, opts);
}

int64_t OffloadEngine::add_slot(const std::string& name, const torch::Tensor& master, int64_t numel,
                                torch::ScalarType grad_dtype, torch::ScalarType out_dtype, int64_t order) {
  to_dtype(grad_dtype, "gradient");
  to_dtype(out_dtype, "output");
  auto s = std::make_unique<Slot>();
  s->name = name;
  s->index = num_slots();
  s->order = order;
  s->grad_dtype = grad_dtype;
  s->out_dtype = out_dtype;
  if (master.defined()) {
    LSPO_CHECK(numel < 0 || numel == master.numel(), "OffloadEngine::add_slot('", name, "'): numel ", numel,
               " but master has ", master.numel(), " elements");
    numel = master.numel();
    LSPO_CHECK(master.is_floating_point(), "OffloadEngine::add_slot('", name, "'): master must be floating point");
  } else {
    LSPO_CHECK(numel >= 0, "OffloadEngine::add_slot('", name, "'): moments-only slot needs numel >= 0");
  }
  s->numel = numel;
  s->nstate = master.defined() ? 3 : 2;
  place_slot(*s, master);  // host memory or files (engine_disk.cpp); resumes from state_dir
  s->grad = host_buffer(numel, grad_dtype, true);
  s->out = host_buffer(numel, out_dtype, true);
  std::lock_guard<std::mutex> g(mu_);
  slots_.push_back(std::move(s));
  return num_slots() - 1;
}

torch::Tensor OffloadEngine::grad_buffer(int64_t slot) const { check_slot(slot, "grad_buffer"); return slots_[slot]->grad; }
torch::Tensor OffloadEngine::out_buffer(int64_t slot) const { check_slot(slot, "out_buffer"); return slots_[slot]->out; }
static void check_host(bool disk, const std::string& name, const char* fn) {
  LSPO_CHECK(!disk, "OffloadEngine::", fn, "('", name, "'): this slot keeps its state in files under state_dir; "
             "use load_state()/store_state()");
}
torch::Tensor OffloadEngine::master(int64_t slot) const {
  check_slot(slot, "master");
  check_host(slots_[slot]->disk, slots_[slot]->name, "master");
  return slots_[slot]->master[0];
}
torch::Tensor OffloadEngine::exp_avg(int64_t slot) const {
  check_slot(slot, "exp_avg");
  check_host(slots_[slot]->disk, slots_[slot]->name, "exp_avg");
  return slots_[slot]->m[0];
}
torch::Tensor OffloadEngine::exp_avg_sq(int64_t slot) const {
  check_slot(slot, "exp_avg_sq");
  check_host(slots_[slot]->disk, slots_[slot]->name, "exp_avg_sq");
  return slots_[slot]->v[0];
}
bool OffloadEngine::on_disk(int64_t slot) const { check_slot(slot, "on_disk"); return slots_[slot]->disk; }
int64_t OffloadEngine::committed_step(int64_t slot) const {
  check_slot(slot, "committed_step");
  std::lock_guard<std::mutex> g(mu_);
  return slots_[slot]->step[0];
}

static bool heap_less(const OffloadEngine* /*unused*/, int64_t oa, uint64_t sa, int64_t ob, uint64_t sb) {
  // std heap is a max-heap: "less" means lower priority
  return oa != ob ? oa > ob : sa > sb;
}

void OffloadEngine::submit(int64_t slot, const AdamConfig& cfg, int64_t step, uintptr_t ready_event) {
  check_slot(slot, "submit");
  Slot& s = *slots_[slot];
  AdamBuffers b = speculative_buffers(s);
  LSPO_CHECK(s.nstate == 3 || cfg.weight_decay == 0.0, "OffloadEngine::submit('", s.name,
             "'): a moments-only slot cannot apply weight decay (the caller applies it to the weights)");
  LSPO_CHECK(step >= 1, "OffloadEngine::submit('", s.name, "'): step must be >= 1, got ", step);
  if (s.numel > 0) check_adam_args(cfg, step, b);
  wait(slot);
  Job job{slot, s.order, 0, cfg, step, ready_event};
  if (!opt_.overlap) {
    {
      std::lock_guard<std::mutex> g(mu_);
      s.pending = 1;
      s.result = false;
    }
    run_job(job);
    wait(slot);  // rethrows an error
    return;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    job.seq = seq_++;
    s.pending += 1;
    s.result = false;
    queue_.push_back(job);
    std::push_heap(queue_.begin(), queue_.end(), [this](const Job& a, const Job& b2) {
      return heap_less(this, a.order, a.seq, b2.order, b2.seq);
    });
  }
  cv_work_.notify_one();
}

void OffloadEngine::run_job(const Job& job) {
  Slot* sp = nullptr;
  {  // the worker thread: add_slot may grow slots_ meanwhile (a data race TSan found)
    std::lock_guard<std::mutex> g(mu_);
    sp = slots_[job.slot].get();
  }
  Slot& s = *sp;
  std::exception_ptr err;
  double t0 = now_us();
  try {
#ifdef LSPO_WITH_CUDA
    if (job.ready_event) {
      cudaError_t r = cudaEventSynchronize(reinterpret_cast<cudaEvent_t>(job.ready_event));
      LSPO_CHECK(r == cudaSuccess, "OffloadEngine: waiting for the gradient copy of '", s.name,
                 "' failed: ", cudaGetErrorString(r));
    }
#else
    LSPO_CHECK(job.ready_event == 0, "OffloadEngine: a CUDA event was passed to a build without CUDA");
#endif
    double t1 = now_us();
    if (opt_.record_timeline && job.ready_event) add_event("wait_d2h", s.name, 1, t0, t1);
    s.step[1] = job.step;
    if (s.disk) {
      run_disk_job(s, job);
    } else {
      if (s.master[0].defined()) s.master[1].copy_(s.master[0]);
      s.m[1].copy_(s.m[0]);
      s.v[1].copy_(s.v[0]);
      AdamBuffers b = speculative_buffers(s);
      if (b.n > 0) adam_step(job.cfg, job.step, b);
    }
    if (opt_.record_timeline) add_event("adam", s.name, opt_.overlap ? 1 : 0, t1, now_us());
  } catch (...) {
    err = std::current_exception();
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    s.pending -= 1;
    s.result = !err;
    if (err) s.error = err;
    stats_.jobs_run += 1;
  }
  cv_done_.notify_all();
}

void OffloadEngine::worker_loop() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_work_.wait(lk, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      std::pop_heap(queue_.begin(), queue_.end(), [this](const Job& a, const Job& b) {
        return heap_less(this, a.order, a.seq, b.order, b.seq);
      });
      job = queue_.back();
      queue_.pop_back();
    }
    run_job(job);
  }
}

void OffloadEngine::wait(int64_t slot) {
  check_slot(slot, "wait");
  Slot& s = *slots_[slot];
  std::unique_lock<std::mutex> lk(mu_);
  cv_done_.wait(lk, [&] { return s.pending == 0; });
  if (s.error) {
    std::exception_ptr e = s.error;
    s.error = nullptr;
    std::rethrow_exception(e);
  }
}

void OffloadEngine::wait_all() {
  for (int64_t i = 0; i < num_slots(); ++i) wait(i);
}

bool OffloadEngine::has_result(int64_t slot) const {
  check_slot(slot, "has_result");
  std::lock_guard<std::mutex> g(mu_);
  return slots_[slot]->pending == 0 && slots_[slot]->result;
}

void OffloadEngine::commit(int64_t slot) {
  wait(slot);
  Slot& s = *slots_[slot];
  int64_t stale = -1;  // a disk slot's previous committed generation, unless MANIFEST names it
  {
    std::lock_guard<std::mutex> g(mu_);
    LSPO_CHECK(s.result, "OffloadEngine::commit('", s.name, "'): no finished step to commit");
    std::swap(s.master[0], s.master[1]);
    std::swap(s.m[0], s.m[1]);
    std::swap(s.v[0], s.v[1]);
    std::swap(s.step[0], s.step[1]);
    if (s.disk) {
      if (s.gen_committed != s.gen_durable) stale = s.gen_committed;
      s.gen_committed = s.gen_spec;
      s.gen_spec = -1;
      s.synced = false;
      s.sync_ticket[0] = s.sync_ticket[1];
      s.sync_ticket[1] = 0;
    }
    s.dirty = true;
    s.result = false;
    stats_.commits += 1;
  }
  if (stale >= 0) dir_->remove_gen(s.index, stale);
}

EngineStats OffloadEngine::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  return stats_;
}

double OffloadEngine::now_us() const {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t_origin_).count();
}

void OffloadEngine::add_event(const std::string& name, const std::string& cat, int64_t tid, double t0_us,
                              double t1_us) {
  if (!opt_.record_timeline) return;
  std::lock_guard<std::mutex> g(mu_);
  events_.push_back({name, cat, tid, t0_us, t1_us});
}

std::vector<TimelineEvent> OffloadEngine::timeline() const {
  std::lock_guard<std::mutex> g(mu_);
  return events_;
}

void OffloadEngine::clear_timeline() {
  std::lock_guard<std::mutex> g(mu_);
  events_.clear();
}

static std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    o += c;
  }
  return o;
}

std::string OffloadEngine::timeline_json() const {
  auto ev = timeline();
  std::ostringstream os;
  os.precision(3);
  os << std::fixed << "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[";
  const char* tname[] = {"caller (Python/compute)", "lspo worker (CPU Adam)", "D2H copy", "H2D copy"};
  for (int t = 0; t < 4; ++t)
    os << (t ? "," : "") << "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":" << t
       << ",\"args\":{\"name\":\"" << tname[t] << "\"}}";
  for (const auto& e : ev)
    os << ",{\"name\":\"" << json_escape(e.name) << "\",\"cat\":\"" << json_escape(e.cat)
       << "\",\"ph\":\"X\",\"pid\":1,\"tid\":" << e.tid << ",\"ts\":" << e.t0_us << ",\"dur\":"
       << std::max(0.0, e.t1_us - e.t0_us) << ",\"args\":{\"layer\":\"" << json_escape(e.cat) << "\"}}";
  os << "]}";
  return os.str();
}

}  // namespace lspo
