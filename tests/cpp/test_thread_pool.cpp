#include <gtest/gtest.h>

#include <atomic>
#include <numeric>
#include <vector>

#include "lspo/common.h"
#include "lspo/thread_pool.h"

namespace {

TEST(ThreadPool, CoversEveryIndexExactlyOnce) {
  for (int threads : {1, 2, 3, 7}) {
    lspo::ThreadPool pool(threads);
    for (int64_t n : {0, 1, 15, 17, 4097, 100003}) {
      std::vector<std::atomic<int>> hits(n);
      pool.parallel_for(n, 1, 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
      });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
    }
  }
}

TEST(ThreadPool, ChunksAreAligned) {
  lspo::ThreadPool pool(4);
  std::atomic<int> misaligned{0};
  pool.parallel_for(10007, 1, 64, [&](int64_t b, int64_t) {
    if (b % 64) misaligned++;
  });
  EXPECT_EQ(misaligned.load(), 0);
}

TEST(ThreadPool, RethrowsWorkerExceptions) {
  lspo::ThreadPool pool(3);
  EXPECT_THROW(pool.parallel_for(3000, 1, 1,
                                 [&](int64_t b, int64_t) {
                                   if (b > 0) throw std::runtime_error("boom");
                                 }),
               std::runtime_error);
  // The pool is still usable afterwards.
  std::atomic<int64_t> sum{0};
  pool.parallel_for(1000, 1, 1, [&](int64_t b, int64_t e) { sum += e - b; });
  EXPECT_EQ(sum.load(), 1000);
}

TEST(ThreadPool, GlobalPoolResizes) {
  lspo::ThreadPool::set_num_threads(3);
  EXPECT_EQ(lspo::ThreadPool::get_num_threads(), 3);
  lspo::ThreadPool::set_num_threads(1);
  EXPECT_EQ(lspo::ThreadPool::get_num_threads(), 1);
  EXPECT_THROW(lspo::ThreadPool::set_num_threads(0), lspo::Error);
}

}  // namespace
