// The plain scalar reference of the fused Adam step, and the argument checks shared by all paths.
#include <cmath>

#include "lspo/cpu_adam.h"
#include "lspo/half.h"

namespace lspo {

void check_adam_args(const AdamConfig& cfg, int64_t step, const AdamBuffers& b) {
  LSPO_CHECK(b.n >= 0, "adam: negative element count ", b.n);
  LSPO_CHECK(step >= 1, "adam: step must be >= 1 (the count after this update), got ", step);
  LSPO_CHECK(cfg.lr >= 0.0f && std::isfinite(cfg.lr), "adam: invalid learning rate ", cfg.lr);
  LSPO_CHECK(cfg.eps >= 0.0f, "adam: invalid eps ", cfg.eps);
  LSPO_CHECK(cfg.beta1 >= 0.0f && cfg.beta1 < 1.0f, "adam: invalid beta1 ", cfg.beta1);
  LSPO_CHECK(cfg.beta2 >= 0.0f && cfg.beta2 < 1.0f, "adam: invalid beta2 ", cfg.beta2);
  LSPO_CHECK(cfg.weight_decay >= 0.0f, "adam: invalid weight_decay ", cfg.weight_decay);
  if (b.n == 0) return;
  LSPO_CHECK(b.exp_avg && b.exp_avg_sq && b.grad, "adam: exp_avg, exp_avg_sq and grad must be set");
  if (!b.param) {
    LSPO_CHECK(b.param_out, "adam: moments-only mode (param == nullptr) needs param_out for the update");
    LSPO_CHECK(cfg.weight_decay == 0.0f, "adam: moments-only mode cannot apply weight decay");
  }
}

namespace {
inline float load(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.0f;
}
inline void store(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(p)[i] = v; break;
    case DType::kBFloat16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    case DType::kFloat16: static_cast<uint16_t*>(p)[i] = float_to_fp16(v); break;
  }
}
}  // namespace

void adam_step_reference(const AdamConfig& cfg, int64_t step, const AdamBuffers& b) {
  check_adam_args(cfg, step, b);
  const float bc1 = cfg.bias_correction ? 1.0f - std::pow(cfg.beta1, static_cast<float>(step)) : 1.0f;
  const float bc2 = cfg.bias_correction ? 1.0f - std::pow(cfg.beta2, static_cast<float>(step)) : 1.0f;
  const float step_size = cfg.lr / bc1;
  const float bc2_sqrt = std::sqrt(bc2);
  for (int64_t i = 0; i < b.n; ++i) {
    float g = load(b.grad, b.grad_dtype, i) * cfg.grad_scale;
    if (cfg.maximize) g = -g;
    float p = b.param ? b.param[i] : 0.0f;
    if (cfg.weight_decay != 0.0f) {
      if (cfg.adamw_mode)
        p = p * (1.0f - cfg.lr * cfg.weight_decay);
      else
        g = g + cfg.weight_decay * p;
    }
    float m = cfg.beta1 * b.exp_avg[i] + (1.0f - cfg.beta1) * g;
    float v = cfg.beta2 * b.exp_avg_sq[i] + (1.0f - cfg.beta2) * g * g;
    b.exp_avg[i] = m;
    b.exp_avg_sq[i] = v;
    float denom = std::sqrt(v) / bc2_sqrt + cfg.eps;
    float update = -step_size * m / denom;
    if (b.param) {
      p = p + update;
      b.param[i] = p;
      if (b.param_out) store(b.param_out, b.out_dtype, i, p);
    } else {
      store(b.param_out, b.out_dtype, i, update);
    }
  }
}

}  // namespace lspo
