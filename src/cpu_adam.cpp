// Dispatch of the fused Adam step. (SIMD paths: cpu_adam_avx2.cpp, cpu_adam_avx512.cpp.)
#include "lspo/cpu_adam.h"

#include "lspo/thread_pool.h"

namespace lspo {

void adam_step_isa(Isa isa, const AdamConfig& cfg, int64_t step, const AdamBuffers& buf, ThreadPool* pool) {
  check_adam_args(cfg, step, buf);
  // TODO(cpu-adam): SIMD + threaded paths. Until then every ISA runs the reference.
  (void)isa;
  (void)pool;
  adam_step_reference(cfg, step, buf);
}

void adam_step(const AdamConfig& cfg, int64_t step, const AdamBuffers& buf, ThreadPool* pool) {
  adam_step_isa(active_isa(), cfg, step, buf, pool);
}

bool all_finite(const void* data, DType dtype, int64_t n, ThreadPool* pool) {
  (void)pool;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    if (dtype == DType::kFloat32) {
      bits = static_cast<const uint32_t*>(data)[i];
      if ((bits & 0x7f800000u) == 0x7f800000u) return false;
    } else {
      uint16_t h = static_cast<const uint16_t*>(data)[i];
      if (dtype == DType::kBFloat16 ? (h & 0x7f80u) == 0x7f80u : (h & 0x7c00u) == 0x7c00u) return false;
    }
  }
  return true;
}

}  // namespace lspo
