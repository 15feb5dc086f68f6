#include "lspo/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "lspo/common.h"

namespace lspo {
namespace {
std::atomic<int> g_override{-1};

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAVX2;
#endif
  return Isa::kScalar;
}

Isa parse_env() {
  const char* v = std::getenv("LSPO_ISA");
  if (!v || !*v) return detected_isa();
  if (!std::strcmp(v, "scalar")) return Isa::kScalar;
  if (!std::strcmp(v, "avx2")) return Isa::kAVX2;
  if (!std::strcmp(v, "avx512")) return Isa::kAVX512;
  LSPO_CHECK(false, "LSPO_ISA must be one of scalar, avx2, avx512 (got '", v, "')");
  return Isa::kScalar;
}
}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAVX2: return "avx2";
    case Isa::kAVX512: return "avx512";
  }
  return "unknown";
}

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__)
  static const bool has = [] {
    __builtin_cpu_init();
    return detected_isa() == Isa::kAVX512 && __builtin_cpu_supports("avx512bf16");
  }();
  return has;
#else
  return false;
#endif
}

Isa active_isa() {
  int o = g_override.load(std::memory_order_relaxed);
  if (o >= 0) return static_cast<Isa>(o);
  static const Isa env = [] {
    Isa e = parse_env();
    LSPO_CHECK(static_cast<int>(e) <= static_cast<int>(detected_isa()), "LSPO_ISA asks for ",
               isa_name(e), " but this CPU supports at most ", isa_name(detected_isa()));
    return e;
  }();
  return env;
}

void set_isa_override(Isa isa) {
  LSPO_CHECK(static_cast<int>(isa) <= static_cast<int>(detected_isa()), "cannot force ", isa_name(isa),
             ": this CPU supports at most ", isa_name(detected_isa()));
  g_override.store(static_cast<int>(isa));
}

void clear_isa_override() { g_override.store(-1); }

}  // namespace lspo
