// Fused CPU Adam: every ISA path (forced in turn, threaded) against the scalar reference.
//
// All paths perform the same fp32 operations in the same order without FMA contraction (see
// cpu_adam_kernels.h), so the comparison is bit-exact: memcmp of every output buffer. The
// reference itself is checked against an independent double-precision Adam.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "lspo/common.h"
#include "lspo/cpu_adam.h"
#include "lspo/cpu_features.h"
#include "lspo/half.h"
#include "lspo/thread_pool.h"

namespace {

using lspo::AdamBuffers;
using lspo::AdamConfig;
using lspo::DType;
using lspo::Isa;

std::vector<Isa> available_isas() {
  std::vector<Isa> v{Isa::kScalar};
  if (static_cast<int>(lspo::detected_isa()) >= static_cast<int>(Isa::kAVX2)) v.push_back(Isa::kAVX2);
  if (lspo::detected_isa() == Isa::kAVX512) v.push_back(Isa::kAVX512);
  return v;
}

uint16_t to_half(float x, DType t) { return t == DType::kBFloat16 ? lspo::float_to_bf16(x) : lspo::float_to_fp16(x); }

// One problem instance: the state and gradient of n elements, stored at an element offset from
// an aligned allocation (offsets make the pointers unaligned).
struct Problem {
  int64_t n;
  DType gdt;
  std::vector<float> p, m, v;
  std::vector<unsigned char> g;
  Problem(int64_t n_, DType gdt_, uint32_t seed, int offset) : n(n_), gdt(gdt_), off(offset) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    p.resize(n + off);
    m.resize(n + off);
    v.resize(n + off);
    g.resize((n + off) * lspo::dtype_size(gdt));
    for (int64_t i = 0; i < n; ++i) {
      float pv = nd(rng);
      // A few special parameter values: zero, negative zero, a denormal, beyond fp16 range, and
      // values at bf16 rounding ties.
      switch (i % 97) {
        case 3: pv = 0.0f; break;
        case 5: pv = -0.0f; break;
        case 7: pv = 1e-39f; break;
        case 11: pv = 7e4f; break;
        case 13: pv = lspo::bf16_to_float(0x3f81) + std::ldexp(1.0f, -8); break;  // exact tie
        default: break;
      }
      P()[i] = pv;
      M()[i] = 0.1f * nd(rng);
      V()[i] = 0.01f * std::fabs(nd(rng));
      float gv = nd(rng) * (i % 5 == 0 ? 1e-3f : 1.0f);
      if (gdt == DType::kFloat32)
        reinterpret_cast<float*>(g.data())[off + i] = gv;
      else
        reinterpret_cast<uint16_t*>(g.data())[off + i] = to_half(gv, gdt);
    }
  }
  float* P() { return p.data() + off; }
  float* M() { return m.data() + off; }
  float* V() { return v.data() + off; }
  const void* G() const { return g.data() + off * lspo::dtype_size(gdt); }
  int off;
};

// An output buffer whose first element sits `offset` elements after a 64-byte boundary (offset 0:
// the kernels take their streaming-store path; otherwise ordinary stores), with 64 guard bytes
// after the n elements that must stay 0xab.
struct Outputs {
  std::vector<unsigned char> bytes;
  size_t start, len;
  Outputs(int64_t n, DType t, int offset) : bytes(n * lspo::dtype_size(t) + 64 * 3, 0xab) {
    uintptr_t base = reinterpret_cast<uintptr_t>(bytes.data());
    start = ((base + 63) / 64 * 64 - base) + offset * lspo::dtype_size(t);
    len = n * lspo::dtype_size(t);
  }
  void* ptr() { return bytes.data() + start; }
  bool guard_intact() const {
    for (size_t i = start + len; i < start + len + 64; ++i)
      if (bytes[i] != 0xab) return false;
    return true;
  }
};

bool same_bytes(const void* a, const void* b, size_t n) { return n == 0 || std::memcmp(a, b, n) == 0; }

// Runs `steps` steps on one ISA path and on the reference from the same start; expects
// bit-identical state and output after every step.
void expect_path_matches_reference(Isa isa, const AdamConfig& cfg, int64_t n, DType gdt, bool with_param,
                                   bool with_out, DType odt, lspo::ThreadPool* pool, int steps = 2, int out_offset = 0) {
  SCOPED_TRACE(std::string("isa=") + lspo::isa_name(isa) + " n=" + std::to_string(n) + " grad=" +
               lspo::dtype_name(gdt) + " param=" + std::to_string(with_param) + " out=" +
               (with_out ? lspo::dtype_name(odt) : "none") + " out_offset=" + std::to_string(out_offset));
  Problem a(n, gdt, 1234 + static_cast<uint32_t>(n), 1), b(n, gdt, 1234 + static_cast<uint32_t>(n), 3);
  Outputs oa(n, odt, 1), ob(n, odt, out_offset);
  for (int step = 1; step <= steps; ++step) {
    AdamBuffers ba{with_param ? a.P() : nullptr, a.M(), a.V(), a.G(), gdt, with_out ? oa.ptr() : nullptr, odt, n};
    AdamBuffers bb{with_param ? b.P() : nullptr, b.M(), b.V(), b.G(), gdt, with_out ? ob.ptr() : nullptr, odt, n};
    lspo::adam_step_reference(cfg, step, ba);
    lspo::adam_step_isa(isa, cfg, step, bb, pool);
    ASSERT_TRUE(same_bytes(a.P(), b.P(), n * 4)) << "param differs at step " << step;
    ASSERT_TRUE(same_bytes(a.M(), b.M(), n * 4)) << "exp_avg differs at step " << step;
    ASSERT_TRUE(same_bytes(a.V(), b.V(), n * 4)) << "exp_avg_sq differs at step " << step;
    if (with_out) ASSERT_TRUE(same_bytes(oa.ptr(), ob.ptr(), n * lspo::dtype_size(odt))) << "param_out differs";
  }
  EXPECT_TRUE(ob.guard_intact()) << "written past the end of param_out";
}

const int64_t kSizes[] = {0, 1, 15, 17, 63, 4097, 100003};

TEST(CpuAdam, EveryIsaMatchesReferenceAllDtypesAndSizes) {
  lspo::ThreadPool pool(3);  // an odd thread count: uneven chunks
  AdamConfig cfg;
  cfg.lr = 1e-2;
  cfg.weight_decay = 0.01;
  for (Isa isa : available_isas())
    for (int64_t n : kSizes)
      for (DType gdt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
        expect_path_matches_reference(isa, cfg, n, gdt, true, false, DType::kFloat32, &pool);
        for (DType odt : {DType::kBFloat16, DType::kFloat16, DType::kFloat32})
          for (int out_offset : {0, 1})  // aligned (streaming stores) and unaligned param_out
            expect_path_matches_reference(isa, cfg, n, gdt, true, true, odt, &pool, 2, out_offset);
      }
}

TEST(CpuAdam, EveryIsaMatchesReferenceAcrossConfigs) {
  lspo::ThreadPool pool(2);
  std::vector<AdamConfig> cfgs(6);
  cfgs[0].adamw_mode = false, cfgs[0].weight_decay = 0.1;          // Adam with L2
  cfgs[1].maximize = true, cfgs[1].weight_decay = 0.05;            // maximize
  cfgs[2].grad_scale = 1.0 / 1024.0, cfgs[2].lr = 3e-4;            // AMP unscale
  cfgs[3].bias_correction = false, cfgs[3].eps = 1e-6;             // no bias correction
  cfgs[4].beta1 = 0.3, cfgs[4].beta2 = 0.5;                        // the other lerp branch
  cfgs[5].beta1 = 0.0, cfgs[5].grad_scale = -3.0, cfgs[5].weight_decay = 0.2;
  for (const AdamConfig& cfg : cfgs)
    for (Isa isa : available_isas())
      for (int64_t n : {int64_t{17}, int64_t{4097}, int64_t{70001}})
        expect_path_matches_reference(isa, cfg, n, DType::kBFloat16, true, true, DType::kBFloat16, &pool, 3);
}

TEST(CpuAdam, MomentsOnlyModeMatchesReference) {
  lspo::ThreadPool pool(2);
  AdamConfig cfg;
  cfg.lr = 0.05;
  for (Isa isa : available_isas())
    for (int64_t n : kSizes)
      for (DType odt : {DType::kFloat32, DType::kBFloat16})
        for (int out_offset : {0, 3})
          expect_path_matches_reference(isa, cfg, n, DType::kFloat32, false, true, odt, &pool, 2, out_offset);
}

TEST(CpuAdam, LargeStepCountsAndGlobalPool) {
  AdamConfig cfg;
  for (Isa isa : available_isas()) {
    Problem a(40000, DType::kFloat16, 7, 0), b(40000, DType::kFloat16, 7, 0);
    for (int64_t step : {int64_t{1}, int64_t{10}, int64_t{1000}, int64_t{1000000}}) {
      lspo::adam_step_reference(cfg, step, AdamBuffers{a.P(), a.M(), a.V(), a.G(), DType::kFloat16, nullptr, DType::kBFloat16, 40000});
      lspo::adam_step_isa(isa, cfg, step, AdamBuffers{b.P(), b.M(), b.V(), b.G(), DType::kFloat16, nullptr, DType::kBFloat16, 40000});
      ASSERT_TRUE(same_bytes(a.P(), b.P(), 40000 * 4)) << lspo::isa_name(isa) << " step " << step;
      ASSERT_TRUE(same_bytes(a.V(), b.V(), 40000 * 4)) << lspo::isa_name(isa) << " step " << step;
    }
  }
}

TEST(CpuAdam, ActiveIsaDispatch) {
  // adam_step follows active_isa(): force each path through the override and compare.
  AdamConfig cfg;
  for (Isa isa : available_isas()) {
    lspo::set_isa_override(isa);
    EXPECT_EQ(lspo::active_isa(), isa);
    Problem a(1000, DType::kBFloat16, 9, 0), b(1000, DType::kBFloat16, 9, 0);
    lspo::adam_step(cfg, 1, AdamBuffers{a.P(), a.M(), a.V(), a.G(), DType::kBFloat16, nullptr, DType::kBFloat16, 1000});
    lspo::adam_step_reference(cfg, 1, AdamBuffers{b.P(), b.M(), b.V(), b.G(), DType::kBFloat16, nullptr, DType::kBFloat16, 1000});
    EXPECT_TRUE(same_bytes(a.P(), b.P(), 1000 * 4));
  }
  lspo::clear_isa_override();
}

// The reference against textbook Adam/AdamW in double: it implements Adam, up to fp32 rounding.
TEST(CpuAdam, ReferenceIsAdam) {
  for (bool adamw : {true, false}) {
    AdamConfig cfg;
    cfg.lr = 1e-2;
    cfg.weight_decay = 0.1;
    cfg.adamw_mode = adamw;
    const int n = 257;
    Problem pr(n, DType::kFloat32, 42, 0);
    std::vector<double> p(pr.P(), pr.P() + n), m(pr.M(), pr.M() + n), v(pr.V(), pr.V() + n);
    const float* g = static_cast<const float*>(pr.G());
    for (int step = 1; step <= 20; ++step) {
      lspo::adam_step_reference(cfg, step, AdamBuffers{pr.P(), pr.M(), pr.V(), g, DType::kFloat32, nullptr, DType::kBFloat16, n});
      for (int i = 0; i < n; ++i) {
        double gi = g[i];
        if (adamw) p[i] *= 1.0 - cfg.lr * cfg.weight_decay;
        else gi += cfg.weight_decay * p[i];
        m[i] = cfg.beta1 * m[i] + (1 - cfg.beta1) * gi;
        v[i] = cfg.beta2 * v[i] + (1 - cfg.beta2) * gi * gi;
        double mh = m[i] / (1 - std::pow(cfg.beta1, step)), denom = std::sqrt(v[i]) / std::sqrt(1 - std::pow(cfg.beta2, step)) + cfg.eps;
        (void)mh;
        p[i] -= cfg.lr / (1 - std::pow(cfg.beta1, step)) * m[i] / denom;
      }
    }
    // Each step's fp32 ops add a few ulp of relative error to p, m, v; after 20 steps and with
    // |p| ~ 1, |update| <= lr, the deviation stays far below 1e-5 (absolute) and 1e-4 (relative, moments).
    for (int i = 0; i < n; ++i) {
      ASSERT_NEAR(pr.P()[i], p[i], 1e-5 + 1e-5 * std::fabs(p[i])) << "param " << i << " adamw=" << adamw;
      ASSERT_NEAR(pr.M()[i], m[i], 1e-6 + 1e-4 * std::fabs(m[i])) << "exp_avg " << i;
      ASSERT_NEAR(pr.V()[i], v[i], 1e-9 + 1e-4 * std::fabs(v[i])) << "exp_avg_sq " << i;
    }
  }
}

TEST(CpuAdam, ParamOutIsRoundedParam) {
  // param_out holds round-to-nearest-even of the updated fp32 param (bf16 and fp16).
  AdamConfig cfg;
  for (Isa isa : available_isas())
    for (DType odt : {DType::kBFloat16, DType::kFloat16}) {
      Problem pr(999, DType::kFloat32, 5, 0);
      std::vector<uint16_t> out(999);
      lspo::adam_step_isa(isa, cfg, 1, AdamBuffers{pr.P(), pr.M(), pr.V(), pr.G(), DType::kFloat32, out.data(), odt, 999});
      for (int i = 0; i < 999; ++i) ASSERT_EQ(out[i], to_half(pr.P()[i], odt)) << i;
      // Round-trip of a known tie: 1 + 2^-8 lies halfway between bf16 1.0 and 1.0078125 -> even (1.0).
      EXPECT_EQ(lspo::float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
    }
}

TEST(CpuAdam, AllFiniteEveryIsa) {
  lspo::ThreadPool pool(2);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (Isa isa : available_isas())
    for (DType t : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
      for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{15}, int64_t{17}, int64_t{4097}, int64_t{300001}}) {
        SCOPED_TRACE(std::string(lspo::isa_name(isa)) + " " + lspo::dtype_name(t) + " n=" + std::to_string(n));
        std::vector<unsigned char> buf((n + 1) * 4);
        auto set = [&](int64_t i, float x) {
          if (t == DType::kFloat32)
            reinterpret_cast<float*>(buf.data() + 4)[i] = x;  // +4 bytes: unaligned for 64-byte vectors
          else
            reinterpret_cast<uint16_t*>(buf.data() + 2)[i] = to_half(x, t);
        };
        const void* data = buf.data() + (t == DType::kFloat32 ? 4 : 2);
        // Largest finite values of each type, and negatives: all finite.
        const float big = t == DType::kFloat32 ? std::numeric_limits<float>::max()
                          : t == DType::kFloat16 ? 65504.0f : lspo::bf16_to_float(0x7f7f);
        for (int64_t i = 0; i < n; ++i) set(i, i % 3 == 0 ? -big : (i % 3 == 1 ? big : -0.5f));
        EXPECT_TRUE(lspo::all_finite_isa(isa, data, t, n, &pool));
        EXPECT_TRUE(lspo::all_finite_reference(data, t, n));
        if (n == 0) continue;
        for (int64_t pos : {int64_t{0}, n / 2, n - 1})
          for (float bad : {inf, -inf, nan}) {
            set(pos, bad);
            EXPECT_FALSE(lspo::all_finite_isa(isa, data, t, n, &pool)) << "pos " << pos << " value " << bad;
            EXPECT_FALSE(lspo::all_finite_reference(data, t, n));
            set(pos, 1.0f);
          }
      }
}

TEST(CpuAdam, NonFiniteGradientsAreDetectedBeforeTheStep) {
  // The skip policy: callers test all_finite(grad) and skip the step; state then stays untouched.
  // (The kernel itself does not skip: a NaN gradient gives NaN state, which the reference shows.)
  Problem pr(100, DType::kBFloat16, 3, 0);
  reinterpret_cast<uint16_t*>(pr.g.data())[42] = 0x7fc0;  // NaN
  EXPECT_FALSE(lspo::all_finite(pr.G(), DType::kBFloat16, 100));
  AdamConfig cfg;
  lspo::adam_step(cfg, 1, AdamBuffers{pr.P(), pr.M(), pr.V(), pr.G(), DType::kBFloat16, nullptr, DType::kBFloat16, 100});
  EXPECT_TRUE(std::isnan(pr.P()[42]));
  EXPECT_FALSE(std::isnan(pr.P()[41]));
}

TEST(CpuAdam, BadArgumentsThrowNamedErrors) {
  std::vector<float> p(8), m(8), v(8), g(8);
  std::vector<uint16_t> out(8);
  AdamConfig ok;
  AdamBuffers b{p.data(), m.data(), v.data(), g.data(), DType::kFloat32, nullptr, DType::kBFloat16, 8};
  auto expect_error = [&](const AdamConfig& c, int64_t step, const AdamBuffers& bb, const char* needle) {
    for (Isa isa : available_isas()) {
      try {
        lspo::adam_step_isa(isa, c, step, bb);
        ADD_FAILURE() << "no error for " << needle;
      } catch (const lspo::Error& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      }
    }
    EXPECT_THROW(lspo::adam_step_reference(c, step, bb), lspo::Error);
  };
  expect_error(ok, 0, b, "step must be >= 1");
  AdamConfig c = ok;
  c.lr = -1;
  expect_error(c, 1, b, "learning rate");
  c = ok, c.lr = std::nan("");
  expect_error(c, 1, b, "learning rate");
  c = ok, c.beta1 = 1.0;
  expect_error(c, 1, b, "beta1");
  c = ok, c.beta2 = -0.1;
  expect_error(c, 1, b, "beta2");
  c = ok, c.eps = -1;
  expect_error(c, 1, b, "eps");
  c = ok, c.weight_decay = -1;
  expect_error(c, 1, b, "weight_decay");
  c = ok, c.grad_scale = INFINITY;
  expect_error(c, 1, b, "grad_scale");
  AdamBuffers bb = b;
  bb.n = -1;
  expect_error(ok, 1, bb, "negative element count");
  bb = b, bb.exp_avg = nullptr;
  expect_error(ok, 1, bb, "exp_avg, exp_avg_sq and grad must be set");
  bb = b, bb.param = nullptr;
  expect_error(ok, 1, bb, "needs param_out");
  bb = b, bb.param = nullptr, bb.param_out = out.data();
  c = ok, c.weight_decay = 0.1;
  expect_error(c, 1, bb, "cannot apply weight decay");
  bb = b, bb.grad_dtype = static_cast<DType>(7);
  expect_error(ok, 1, bb, "unknown grad dtype");
  // Zero elements: valid with null pointers, nothing touched.
  lspo::adam_step(ok, 1, AdamBuffers{nullptr, nullptr, nullptr, nullptr, DType::kFloat32, nullptr, DType::kBFloat16, 0});
  EXPECT_THROW(lspo::all_finite(nullptr, DType::kFloat32, 5), lspo::Error);
  EXPECT_THROW(lspo::all_finite(g.data(), DType::kFloat32, -1), lspo::Error);
  if (lspo::detected_isa() != Isa::kAVX512) {
    EXPECT_THROW(lspo::adam_step_isa(Isa::kAVX512, ok, 1, b), lspo::Error);
  }
}

}  // namespace
