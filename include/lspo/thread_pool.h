// lspo/thread_pool.h -- a persistent pool of worker threads for the CPU kernels. Threads are
// created once and parked on a condition variable between calls (no fork per call, unlike an
// OpenMP parallel region in a loop). The calling thread takes a share of the work too.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lspo {

class ThreadPool {
 public:
  // num_threads counts the caller: 1 means "run everything on the calling thread".
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Splits [0, n) into at most num_threads() contiguous chunks whose boundaries are multiples of
  // `align` (except the last) and at least `min_chunk` long, calls fn(begin, end) on each, and
  // returns when all are done. The first exception thrown by any chunk is rethrown here.
  // Calls from several threads at once are serialised.
  void parallel_for(int64_t n, int64_t min_chunk, int64_t align,
                    const std::function<void(int64_t, int64_t)>& fn);

  // The process-wide pool the kernels use by default. Its size comes from set_num_threads(), or
  // else LSPO_NUM_THREADS, or else the number of hardware threads.
  static ThreadPool& global();
  static void set_num_threads(int n);
  static int get_num_threads();

 private:
  void worker_loop(int index);

  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // one parallel_for at a time
  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  std::vector<std::pair<int64_t, int64_t>> chunks_;
  std::exception_ptr error_;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
  // Lock-free mirrors of generation_ / pending_ / stop_ for a short spin before sleeping: a call
  // that follows the last one within the spin window (an optimizer step over many tensors) starts
  // and ends without futex wake-ups, which cost tens of microseconds on a VM.
  std::atomic<uint64_t> published_{0};
  std::atomic<int> remaining_{0};
  std::atomic<bool> stopping_{false};
};

}  // namespace lspo
