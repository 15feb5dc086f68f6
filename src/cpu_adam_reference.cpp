// The plain scalar reference of the fused Adam step and of all_finite, the per-step scalars, and
// the argument checks shared by all paths.
#include <cmath>

#include "cpu_adam_kernels.h"
#include "lspo/cpu_adam.h"
#include "lspo/half.h"

namespace lspo {

void check_adam_args(const AdamConfig& cfg, int64_t step, const AdamBuffers& b) {
  LSPO_CHECK(b.n >= 0, "adam: negative element count ", b.n);
  LSPO_CHECK(step >= 1, "adam: step must be >= 1 (the count after this update), got ", step);
  LSPO_CHECK(cfg.lr >= 0.0 && std::isfinite(cfg.lr), "adam: invalid learning rate ", cfg.lr);
  LSPO_CHECK(cfg.eps >= 0.0 && std::isfinite(cfg.eps), "adam: invalid eps ", cfg.eps);
  LSPO_CHECK(cfg.beta1 >= 0.0 && cfg.beta1 < 1.0, "adam: invalid beta1 ", cfg.beta1, " (need 0 <= beta1 < 1)");
  LSPO_CHECK(cfg.beta2 >= 0.0 && cfg.beta2 < 1.0, "adam: invalid beta2 ", cfg.beta2, " (need 0 <= beta2 < 1)");
  LSPO_CHECK(cfg.weight_decay >= 0.0 && std::isfinite(cfg.weight_decay), "adam: invalid weight_decay ",
             cfg.weight_decay);
  LSPO_CHECK(std::isfinite(cfg.grad_scale), "adam: grad_scale must be finite, got ", cfg.grad_scale);
  auto valid = [](DType t) { return t == DType::kFloat32 || t == DType::kBFloat16 || t == DType::kFloat16; };
  LSPO_CHECK(valid(b.grad_dtype), "adam: unknown grad dtype ", static_cast<int>(b.grad_dtype));
  LSPO_CHECK(valid(b.out_dtype), "adam: unknown param_out dtype ", static_cast<int>(b.out_dtype));
  if (b.n == 0) return;
  LSPO_CHECK(b.exp_avg && b.exp_avg_sq && b.grad, "adam: exp_avg, exp_avg_sq and grad must be set");
  if (!b.param) {
    LSPO_CHECK(b.param_out, "adam: moments-only mode (param == nullptr) needs param_out for the update");
    LSPO_CHECK(cfg.weight_decay == 0.0, "adam: moments-only mode cannot apply weight decay");
  }
}

namespace detail {
AdamScalars adam_scalars(const AdamConfig& cfg, int64_t step) {
  AdamScalars s;
  s.grad_scale = static_cast<float>(cfg.grad_scale);
  s.maximize = cfg.maximize;
  s.signed_scale = cfg.maximize ? -s.grad_scale : s.grad_scale;
  s.decoupled_wd = cfg.adamw_mode && cfg.weight_decay != 0.0;
  s.decay = s.decoupled_wd ? static_cast<float>(1.0 - cfg.lr * cfg.weight_decay) : 1.0f;
  s.l2_wd = !cfg.adamw_mode && cfg.weight_decay != 0.0;
  s.l2 = s.l2_wd ? static_cast<float>(cfg.weight_decay) : 0.0f;
  s.w1 = static_cast<float>(1.0 - cfg.beta1);
  s.lerp_low = s.w1 < 0.5f;
  s.w1c = 1.0f - s.w1;
  s.b2 = static_cast<float>(cfg.beta2);
  s.w2 = static_cast<float>(1.0 - cfg.beta2);
  const double t = static_cast<double>(step);
  const double bc1 = cfg.bias_correction ? 1.0 - std::pow(cfg.beta1, t) : 1.0;
  const double bc2 = cfg.bias_correction ? 1.0 - std::pow(cfg.beta2, t) : 1.0;
  s.inv_bc2_sqrt = 1.0f / static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(cfg.eps);
  s.neg_step_size = static_cast<float>(-(cfg.lr / bc1));
  return s;
}
}  // namespace detail

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
  const detail::AdamScalars s = detail::adam_scalars(cfg, step);
  for (int64_t i = 0; i < b.n; ++i) {
    float g = load(b.grad, b.grad_dtype, i) * s.grad_scale;
    if (s.maximize) g = -g;
    float p = b.param ? b.param[i] : 0.0f;
    if (b.param && s.decoupled_wd) p = p * s.decay;
    if (b.param && s.l2_wd) g = g + s.l2 * p;
    float m = b.exp_avg[i];
    m = s.lerp_low ? m + s.w1 * (g - m) : g - (g - m) * s.w1c;
    float v = b.exp_avg_sq[i] * s.b2 + (s.w2 * g) * g;
    b.exp_avg[i] = m;
    b.exp_avg_sq[i] = v;
    float denom = std::sqrt(v) * s.inv_bc2_sqrt + s.eps;
    float update = (s.neg_step_size * m) / denom;
    if (b.param) {
      p = p + update;
      b.param[i] = p;
      if (b.param_out) store(b.param_out, b.out_dtype, i, p);
    } else {
      store(b.param_out, b.out_dtype, i, update);
    }
  }
}

bool all_finite_reference(const void* data, DType dtype, int64_t n) {
  LSPO_CHECK(n >= 0, "all_finite: negative element count ", n);
  LSPO_CHECK(n == 0 || data, "all_finite: null data pointer");
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(load(data, dtype, i))) return false;
  return true;
}

}  // namespace lspo
