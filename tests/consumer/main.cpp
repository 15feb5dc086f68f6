// Links the installed lspo and runs one real fused Adam step, checking the result.
#include <lspo/cpu_adam.h>
#include <lspo/cpu_features.h>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const int64_t n = 1000;
  std::vector<float> p(n, 1.0f), m(n, 0.0f), v(n, 0.0f), g(n, 0.5f);
  lspo::AdamConfig cfg;
  cfg.lr = 0.1f;
  cfg.weight_decay = 0.0f;
  lspo::adam_step(cfg, /*step=*/1, lspo::AdamBuffers{p.data(), m.data(), v.data(), g.data(),
                                                      lspo::DType::kFloat32, nullptr, lspo::DType::kFloat32, n});
  // First Adam step with bias correction moves every parameter by lr * sign(g) (up to eps).
  for (int64_t i = 0; i < n; ++i) {
    if (std::fabs(p[i] - 0.9f) > 1e-5f) {
      std::printf("consumer: wrong value p[%lld] = %f\n", (long long)i, p[i]);
      return 1;
    }
  }
  std::printf("consumer: find_package(lspo) OK, isa=%s\n", lspo::isa_name(lspo::active_isa()));
  return 0;
}
