// lspo/cpu_features.h -- runtime CPU dispatch. Shipped builds never use -march=native: each ISA
// path lives in its own translation unit compiled with that ISA's flags, and is entered only when
// the running CPU reports it.
#pragma once
#include <string>

namespace lspo {

enum class Isa : int { kScalar = 0, kAVX2 = 1, kAVX512 = 2 };

const char* isa_name(Isa isa);
// What this CPU supports (AVX-512 means F+BW+DQ+VL; AVX2 means AVX2+FMA+F16C).
Isa detected_isa();
// The ISA kernels use: the detected one, capped by set_isa_override() or the LSPO_ISA environment
// variable ("scalar", "avx2", "avx512"). Asking for more than the CPU has throws.
Isa active_isa();
void set_isa_override(Isa isa);
void clear_isa_override();
bool cpu_has_avx512_bf16();

}  // namespace lspo
