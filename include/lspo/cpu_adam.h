// lspo/cpu_adam.h -- fused Adam / AdamW over host buffers (torch-free core).
//
// One pass over memory per step: reads grad (fp32, bf16 or fp16), param, exp_avg, exp_avg_sq
// (fp32), writes param, exp_avg, exp_avg_sq and, optionally, a bf16/fp16 copy of the updated
// param into `param_out` (what the offload engine sends back to the GPU).
//
// Math (torch.optim.Adam/AdamW semantics), with g = grad * grad_scale (negated if maximize):
//   adamw_mode:  p <- p * (1 - lr * wd)            (decoupled weight decay)
//   else:        g <- g + wd * p                   (L2 penalty, Adam)
//   m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
//   p <- p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps),  bc_i = 1 - b_i^step (1 if !bias_correction)
//
// Moments-only mode (param == nullptr): no parameter exists on the host (the compressed LSP case);
// the update  u = -lr / bc1 * m / (sqrt(v)/sqrt(bc2) + eps)  is written to param_out instead
// (weight decay is then the caller's business and must be 0 here).
#pragma once
#include <cstdint>

#include "lspo/common.h"
#include "lspo/cpu_features.h"

namespace lspo {

class ThreadPool;

struct AdamConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  bool adamw_mode = true;       // decoupled weight decay (AdamW); false: L2 (Adam)
  bool bias_correction = true;
  bool maximize = false;
  float grad_scale = 1.0f;      // gradients are multiplied by this first (AMP unscale, clipping)
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
// pool). `step` is the 1-based step count after this update. Pointers need no alignment.
void adam_step(const AdamConfig& cfg, int64_t step, const AdamBuffers& buf, ThreadPool* pool = nullptr);
// The same on a chosen ISA path (tests force each one in turn).
void adam_step_isa(Isa isa, const AdamConfig& cfg, int64_t step, const AdamBuffers& buf,
                   ThreadPool* pool = nullptr);
// Plain scalar reference implementation: one loop, no SIMD, no threads, double-free of tricks.
void adam_step_reference(const AdamConfig& cfg, int64_t step, const AdamBuffers& buf);

// True when every element of a buffer is finite (used to skip a step on inf/NaN gradients).
bool all_finite(const void* data, DType dtype, int64_t n, ThreadPool* pool = nullptr);

// Validates sizes and pointers; throws lspo::Error with a named message.
void check_adam_args(const AdamConfig& cfg, int64_t step, const AdamBuffers& buf);

}  // namespace lspo
