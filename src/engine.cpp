// The offload engine (lspo/engine.h): slots, the worker thread, speculation, pinned budget, timeline.
#include "lspo/engine.h"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <sstream>

#ifdef LSPO_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace lspo {

struct OffloadEngine::Slot {
  std::string name;
  int64_t numel = 0;
  int64_t order = 0;
  torch::ScalarType grad_dtype, out_dtype;
  // [0] committed, [1] speculative (swapped by commit)
  torch::Tensor master[2], m[2], v[2];
  torch::Tensor grad, out;
  int pending = 0;          // queued or running jobs
  bool result = false;      // finished speculation not yet committed
  std::exception_ptr error;
};

namespace {
DType to_dtype(torch::ScalarType t, const char* what) {
  switch (t) {
    case torch::kFloat: return DType::kFloat32;
    case torch::kBFloat16: return DType::kBFloat16;
    case torch::kHalf: return DType::kFloat16;
    default: LSPO_CHECK(false, "OffloadEngine: ", what, " dtype must be float32, bfloat16 or float16, got ", t);
  }
  return DType::kFloat32;
}

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
  s->order = order;
  s->grad_dtype = grad_dtype;
  s->out_dtype = out_dtype;
  auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(torch::kCPU);
  if (master.defined()) {
    LSPO_CHECK(numel < 0 || numel == master.numel(), "OffloadEngine::add_slot('", name, "'): numel ", numel,
               " but master has ", master.numel(), " elements");
    numel = master.numel();
    LSPO_CHECK(master.is_floating_point(), "OffloadEngine::add_slot('", name, "'): master must be floating point");
    s->master[0] = master.detach().to(torch::kCPU, torch::kFloat).contiguous().clone().view({-1});
    s->master[1] = torch::empty({numel}, f32);
  } else {
    LSPO_CHECK(numel >= 0, "OffloadEngine::add_slot('", name, "'): moments-only slot needs numel >= 0");
  }
  s->numel = numel;
  for (int i = 0; i < 2; ++i) {
    s->m[i] = torch::zeros({numel}, f32);
    s->v[i] = torch::zeros({numel}, f32);
  }
  s->grad = host_buffer(numel, grad_dtype, true);
  s->out = host_buffer(numel, out_dtype, true);
  std::lock_guard<std::mutex> g(mu_);
  slots_.push_back(std::move(s));
  return num_slots() - 1;
}

torch::Tensor OffloadEngine::grad_buffer(int64_t slot) const { check_slot(slot, "grad_buffer"); return slots_[slot]->grad; }
torch::Tensor OffloadEngine::out_buffer(int64_t slot) const { check_slot(slot, "out_buffer"); return slots_[slot]->out; }
torch::Tensor OffloadEngine::master(int64_t slot) const { check_slot(slot, "master"); return slots_[slot]->master[0]; }
torch::Tensor OffloadEngine::exp_avg(int64_t slot) const { check_slot(slot, "exp_avg"); return slots_[slot]->m[0]; }
torch::Tensor OffloadEngine::exp_avg_sq(int64_t slot) const { check_slot(slot, "exp_avg_sq"); return slots_[slot]->v[0]; }

static bool heap_less(const OffloadEngine* /*unused*/, int64_t oa, uint64_t sa, int64_t ob, uint64_t sb) {
  // std heap is a max-heap: "less" means lower priority
  return oa != ob ? oa > ob : sa > sb;
}

void OffloadEngine::submit(int64_t slot, const AdamConfig& cfg, int64_t step, uintptr_t ready_event) {
  check_slot(slot, "submit");
  Slot& s = *slots_[slot];
  AdamBuffers b;
  b.param = s.master[1].defined() ? s.master[1].data_ptr<float>() : nullptr;
  b.exp_avg = s.m[1].data_ptr<float>();
  b.exp_avg_sq = s.v[1].data_ptr<float>();
  b.grad = s.grad.data_ptr();
  b.grad_dtype = to_dtype(s.grad_dtype, "gradient");
  b.param_out = s.out.data_ptr();
  b.out_dtype = to_dtype(s.out_dtype, "output");
  b.n = s.numel;
  LSPO_CHECK(s.master[1].defined() || cfg.weight_decay == 0.0, "OffloadEngine::submit('", s.name,
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
    if (s.master[0].defined()) s.master[1].copy_(s.master[0]);
    s.m[1].copy_(s.m[0]);
    s.v[1].copy_(s.v[0]);
    AdamBuffers b;
    b.param = s.master[1].defined() ? s.master[1].data_ptr<float>() : nullptr;
    b.exp_avg = s.m[1].data_ptr<float>();
    b.exp_avg_sq = s.v[1].data_ptr<float>();
    b.grad = s.grad.data_ptr();
    b.grad_dtype = to_dtype(s.grad_dtype, "gradient");
    b.param_out = s.out.data_ptr();
    b.out_dtype = to_dtype(s.out_dtype, "output");
    b.n = s.numel;
    if (b.n > 0) adam_step(job.cfg, job.step, b);
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
  std::lock_guard<std::mutex> g(mu_);
  LSPO_CHECK(s.result, "OffloadEngine::commit('", s.name, "'): no finished step to commit");
  std::swap(s.master[0], s.master[1]);
  std::swap(s.m[0], s.m[1]);
  std::swap(s.v[0], s.v[1]);
  s.result = false;
  stats_.commits += 1;
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
