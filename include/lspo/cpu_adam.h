// lspo/cpu_adam.h -- fused Adam / AdamW over host buffers (torch-free core).
//
// One pass over memory per step: reads grad (fp32, bf16 or fp16), param, exp_avg, exp_avg_sq
// (fp32), writes param, exp_avg, exp_avg_sq and, optionally, a bf16/fp16/fp32 copy of the updated
// param into `param_out` (what the offload engine sends back to the GPU), rounded to nearest even.
//
// Math (torch.optim.Adam/AdamW semantics). Hyper-parameters are doubles; the per-step scalars are
// derived from them in double (as torch does from Python floats) and rounded once to fp32; every
// per-element operation is one fp32 operation, in this order (no fused multiply-add, so every ISA
// path gives bit-identical results to adam_step_reference):
//   g  = grad * grad_scale ; if maximize: g = -g
//   adamw_mode:  p = p * f32(1 - lr * wd)           (decoupled weight decay)
//   else:        g = g + f32(wd) * p                (L2 penalty, Adam)
//   m  = m + f32(1 - b1) * (g - m)                  (torch's lerp; for b1 > 0.5: g - (g - m) * f32(b1))
//   v  = v * f32(b2) + (f32(1 - b2) * g) * g
//   d  = sqrt(v) * (1 / f32(sqrt(bc2))) + f32(eps)  bc_i = 1 - b_i^step in double (1 if !bias_correction)
//   u  = (f32(-lr / bc1) * m) / d ;  p = p + u
//
// Moments-only mode (param == nullptr): no parameter exists on the host (the compressed LSP case);
// the update u is written to param_out instead (weight decay must then be 0: the caller's business).
#pragma once
#include <cstdint>

#include "lspo/common.h"
#include "lspo/cpu_features.h"

namespace lspo {

class ThreadPool;

struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool adamw_mode = true;       // decoupled weight decay (AdamW); false: L2 (Adam)
  bool bias_correction = true;
  bool maximize = false;
  double grad_scale = 1.0;      // gradients are multiplied by this first (AMP unscale, clipping)
};

struct AdamBuffers {
  float* param = nullptr;        // fp32 master params, updated in place (nullptr: moments-only mode)
  float* exp_avg = nullptr;      // fp32, in place
  float* exp_avg_sq = nullptr;   // fp32, in place
  const void* grad = nullptr;    // grad_dtype
  DType grad_dtype = DType::kFloat32;
  void* param_out = nullptr;     // optional: updated params (or the update) in out_dtype
  DType out_dtype = DType::kBFloat16;
  int64_t n = 0;
};

// The fused step on the active ISA (see cpu_features.h), split over `pool` (default: the global
// pool). `step` is the 1-based step count after this update. Pointers need no alignment; buffers
// must not overlap (except that nothing else aliases them during the call).
void adam_step(const AdamConfig& cfg, int64_t step, const AdamBuffers& buf, ThreadPool* pool = nullptr);
// The same on a chosen ISA path (tests force each one in turn). Throws if the CPU lacks `isa`.
void adam_step_isa(Isa isa, const AdamConfig& cfg, int64_t step, const AdamBuffers& buf,
                   ThreadPool* pool = nullptr);
// Plain scalar reference implementation: one loop, no SIMD, no threads, no tricks.
void adam_step_reference(const AdamConfig& cfg, int64_t step, const AdamBuffers& buf);

// True when every element of a buffer is finite (used to skip a step on inf/NaN gradients).
bool all_finite(const void* data, DType dtype, int64_t n, ThreadPool* pool = nullptr);
bool all_finite_isa(Isa isa, const void* data, DType dtype, int64_t n, ThreadPool* pool = nullptr);
// Plain scalar reference of all_finite.
bool all_finite_reference(const void* data, DType dtype, int64_t n);

// Validates sizes, pointers and hyper-parameters; throws lspo::Error with a named message.
void check_adam_args(const AdamConfig& cfg, int64_t step, const AdamBuffers& buf);

}  // namespace lspo
