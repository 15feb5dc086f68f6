// Under ThreadSanitizer (./scripts/test.sh --tsan) every test runs with ATen single-threaded.
// ATen's CPU kernels parallelise with OpenMP, and libgomp is not built with TSan: TSan cannot see
// its barriers and reports races between an OpenMP region's threads that cannot happen (seen in
// ATen's copy kernel under test_projector.cpp). lspo's own threads -- lspo::ThreadPool and the
// engine's worker -- are not OpenMP threads and stay multi-threaded, so TSan still checks them.
// LSPO_TSAN_ATEN_THREADS=1 keeps ATen's threads (to see what TSan reports inside libgomp).
// Nothing here in a normal build.
#include <gtest/gtest.h>

#if defined(__SANITIZE_THREAD__)
#define LSPO_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define LSPO_TSAN 1
#endif
#endif

#ifdef LSPO_TSAN
#include <ATen/Parallel.h>

#include <cstdlib>

namespace {
class OneAtenThreadUnderTsan : public ::testing::Environment {
 public:
  void SetUp() override {
    const char* keep = std::getenv("LSPO_TSAN_ATEN_THREADS");
    if (!(keep && keep[0] == '1')) at::set_num_threads(1);
  }
};
::testing::Environment* const tsan_env = ::testing::AddGlobalTestEnvironment(new OneAtenThreadUnderTsan);
}  // namespace
#endif
