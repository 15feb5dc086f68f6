#include "lspo/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>

#include "lspo/common.h"

namespace lspo {
namespace {
// How long a thread polls for new work (worker) or for the workers' completion (caller) before
// blocking on the condition variable.
constexpr auto kSpin = std::chrono::microseconds(50);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Polls `done` until it returns true or kSpin has passed; true when `done` became true.
template <class Pred>
bool spin_until(const Pred& done) {
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 1;; ++i) {
    if (done()) return true;
    cpu_relax();
    if ((i & 63) == 0 && std::chrono::steady_clock::now() - t0 > kSpin) return done();
  }
}
}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  LSPO_CHECK(num_threads >= 1, "ThreadPool needs at least one thread (got ", num_threads, ")");
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    stopping_.store(true, std::memory_order_release);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    std::pair<int64_t, int64_t> range{0, 0};
    const std::function<void(int64_t, int64_t)>* job = nullptr;
    spin_until([&] {
      return published_.load(std::memory_order_acquire) != seen || stopping_.load(std::memory_order_acquire);
    });
    {
      std::unique_lock<std::mutex> lk(mu_);
      wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (index < static_cast<int>(chunks_.size())) {
        range = chunks_[index];
        job = job_;
      }
    }
    std::exception_ptr err;
    if (job && range.second > range.first) {
      try {
        (*job)(range.first, range.second);
      } catch (...) {
        err = std::current_exception();
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (err && !error_) error_ = err;
      remaining_.store(--pending_, std::memory_order_release);
      if (pending_ == 0) done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t min_chunk, int64_t align,
                              const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  align = std::max<int64_t>(align, 1);
  min_chunk = std::max<int64_t>(min_chunk, 1);
  int64_t parts = std::min<int64_t>(num_threads(), std::max<int64_t>(1, n / min_chunk));
  if (parts <= 1) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call(call_mu_);
  int64_t per = (n + parts - 1) / parts;
  per = (per + align - 1) / align * align;
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t b = 0; b < n; b += per) chunks.emplace_back(b, std::min(n, b + per));
  {
    std::lock_guard<std::mutex> lk(mu_);
    chunks_ = chunks;
    job_ = &fn;
    error_ = nullptr;
    pending_ = static_cast<int>(workers_.size());
    remaining_.store(pending_, std::memory_order_relaxed);
    ++generation_;
    published_.store(generation_, std::memory_order_release);
  }
  wake_.notify_all();
  std::exception_ptr mine;
  try {
    fn(chunks[0].first, chunks[0].second);
  } catch (...) {
    mine = std::current_exception();
  }
  spin_until([&] { return remaining_.load(std::memory_order_acquire) == 0; });
  std::unique_lock<std::mutex> lk(mu_);
  done_.wait(lk, [&] { return pending_ == 0; });
  job_ = nullptr;
  std::exception_ptr err = mine ? mine : error_;
  error_ = nullptr;
  lk.unlock();
  if (err) std::rethrow_exception(err);
}

namespace {
std::mutex g_pool_mu;
std::unique_ptr<ThreadPool> g_pool;
int g_requested = 0;

int default_threads() {
  if (const char* v = std::getenv("LSPO_NUM_THREADS")) {
    int n = std::atoi(v);
    LSPO_CHECK(n >= 1, "LSPO_NUM_THREADS must be a positive integer (got '", v, "')");
    return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}
}  // namespace

ThreadPool& ThreadPool::global() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (!g_pool) g_pool = std::make_unique<ThreadPool>(g_requested > 0 ? g_requested : default_threads());
  return *g_pool;
}

void ThreadPool::set_num_threads(int n) {
  LSPO_CHECK(n >= 1, "set_num_threads needs n >= 1 (got ", n, ")");
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_requested = n;
  if (g_pool && g_pool->num_threads() != n) g_pool.reset();
}

int ThreadPool::get_num_threads() { return global().num_threads(); }

}  // namespace lspo
