// Row-sparse (lazy) Adam: every ISA path against the row-by-row reference (bit-exact), the lazy
// semantics against dense Adam on the touched rows, untouched rows bitwise unchanged, the row
// gather, and named errors for bad arguments.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "lspo/common.h"
#include "lspo/cpu_features.h"
#include "lspo/half.h"
#include "lspo/sparse_adam.h"
#include "lspo/thread_pool.h"

namespace {

using lspo::AdamConfig;
using lspo::DType;
using lspo::Isa;
using lspo::SparseAdamBuffers;
using lspo::SparseRows;

// The host state of a sparse adapter: rows x row_len fp32 master and moments, per-row steps, and an
// optional working copy.
struct State {
  int64_t rows, len;
  DType odt;
  std::vector<float> p, m, v;
  std::vector<int64_t> steps;
  std::vector<unsigned char> out;
  State(int64_t rows_, int64_t len_, DType odt_, uint32_t seed) : rows(rows_), len(len_), odt(odt_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    p.resize(rows * len);
    m.resize(rows * len);
    v.resize(rows * len);
    for (auto& x : p) x = nd(rng);
    for (auto& x : m) x = 0.1f * nd(rng);
    for (auto& x : v) x = 0.01f * std::fabs(nd(rng));
    steps.assign(rows, 0);
    out.assign(rows * len * lspo::dtype_size(odt), 0xcd);
  }
  SparseAdamBuffers buffers(bool with_out) {
    return SparseAdamBuffers{p.data(), m.data(), v.data(), steps.data(), with_out ? out.data() : nullptr, odt, rows,
                             len};
  }
  bool operator==(const State& o) const {
    auto same = [](const auto& a, const auto& b) {
      return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0);
    };
    return same(p, o.p) && same(m, o.m) && same(v, o.v) && steps == o.steps && same(out, o.out);
  }
};

// A compact gradient for `idx` in dtype t.
std::vector<unsigned char> make_grad(size_t n, int64_t len, DType t, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<unsigned char> g(n * len * lspo::dtype_size(t));
  for (size_t i = 0; i < n * len; ++i) {
    float x = nd(rng);
    if (t == DType::kFloat32)
      reinterpret_cast<float*>(g.data())[i] = x;
    else
      reinterpret_cast<uint16_t*>(g.data())[i] = lspo::float_to_bf16(x);
  }
  return g;
}

// Row sets of successive steps: rows touched unevenly (some every step, some never).
std::vector<std::vector<int64_t>> schedule(int64_t rows) {
  std::vector<std::vector<int64_t>> s(4);
  for (int64_t r = 0; r < rows; ++r) {
    if (r % 5 == 4) continue;  // never touched
    s[0].push_back(r);
    if (r % 2 == 1) s[1].push_back(r);
    if (r % 3 == 0) s[2].push_back(r);
    if (r % 2 == 1 || r % 3 == 0) s[3].push_back(r);
  }
  return s;
}

using PathParam = std::tuple<Isa, int64_t, DType, int>;  // isa, row_len, grad dtype, out (0 none, 1 bf16, 2 f32)

class SparseAdamPath : public ::testing::TestWithParam<PathParam> {};

TEST_P(SparseAdamPath, MatchesReferenceBitExactAndLeavesUntouchedRows) {
  const auto [isa, len, gdt, out_kind] = GetParam();
  if (static_cast<int>(isa) > static_cast<int>(lspo::detected_isa())) GTEST_SKIP() << "CPU lacks the ISA";
  const DType odt = out_kind == 2 ? DType::kFloat32 : DType::kBFloat16;
  const bool with_out = out_kind != 0;
  const int64_t rows = 11;
  AdamConfig cfg;
  cfg.lr = 1e-2;
  cfg.weight_decay = 0.05;
  State ref(rows, len, odt, 7), fast(rows, len, odt, 7);
  const State start = ref;
  lspo::ThreadPool pool(3);
  auto sched = schedule(rows);
  for (size_t k = 0; k < sched.size(); ++k) {
    const auto& idx = sched[k];
    auto g = make_grad(idx.size(), len, gdt, 100 + static_cast<uint32_t>(k));
    SparseRows r{idx.data(), g.data(), gdt, static_cast<int64_t>(idx.size())};
    lspo::sparse_adam_step_reference(cfg, ref.buffers(with_out), r);
    lspo::sparse_adam_step_isa(isa, cfg, fast.buffers(with_out), r, &pool);
    ASSERT_TRUE(ref == fast) << "differs from the reference after step " << k + 1;
  }
  for (int64_t row = 0; row < rows; ++row) {
    if (row % 5 != 4) {
      EXPECT_GT(fast.steps[row], 0);
      continue;
    }
    EXPECT_EQ(fast.steps[row], 0);
    const size_t o = row * len, ob = o * lspo::dtype_size(odt);
    EXPECT_EQ(0, std::memcmp(&fast.p[o], &start.p[o], len * 4)) << "untouched row " << row << " changed";
    EXPECT_EQ(0, std::memcmp(&fast.m[o], &start.m[o], len * 4));
    EXPECT_EQ(0, std::memcmp(&fast.v[o], &start.v[o], len * 4));
    EXPECT_EQ(0, std::memcmp(&fast.out[ob], &start.out[ob], len * lspo::dtype_size(odt)));
  }
}

std::vector<PathParam> path_params() {
  std::vector<PathParam> v;
  for (Isa isa : {Isa::kScalar, Isa::kAVX2, Isa::kAVX512})
    for (int64_t len : {1, 7, 64, 4097})
      for (DType g : {DType::kFloat32, DType::kBFloat16})
        for (int out : {0, 1, 2}) v.emplace_back(isa, len, g, out);
  return v;
}

std::string path_name(const ::testing::TestParamInfo<PathParam>& info) {
  const auto [isa, len, gdt, out] = info.param;
  static const char* outs[] = {"noout", "outbf16", "outf32"};
  return std::string(lspo::isa_name(isa)) + "_len" + std::to_string(len) + "_grad" +
         (gdt == DType::kFloat32 ? "f32" : "bf16") + "_" + outs[out];
}

INSTANTIATE_TEST_SUITE_P(AllPaths, SparseAdamPath, ::testing::ValuesIn(path_params()), path_name);

// Lazy Adam = dense Adam on the touched rows: every step, the touched rows are grouped by their
// step count, copied into a compact matrix and stepped with the dense lspo::adam_step (active ISA)
// at that count; the sparse state must match it bit for bit, and rows never touched keep theirs.
TEST(SparseAdam, EqualsDenseAdamRestrictedToTouchedRows) {
  const int64_t rows = 23, len = 37;
  AdamConfig cfg;
  cfg.lr = 3e-3;
  cfg.weight_decay = 0.01;
  State sparse(rows, len, DType::kBFloat16, 3), dense(rows, len, DType::kBFloat16, 3);
  auto sched = schedule(rows);
  for (size_t k = 0; k < sched.size(); ++k) {
    const auto& idx = sched[k];
    auto g = make_grad(idx.size(), len, DType::kFloat32, 200 + static_cast<uint32_t>(k));
    lspo::sparse_adam_step(cfg, sparse.buffers(true), SparseRows{idx.data(), g.data(), DType::kFloat32,
                                                                 static_cast<int64_t>(idx.size())});
    // The dense twin: one compact dense step per distinct step count.
    std::vector<int64_t> counts;
    for (int64_t r : idx) counts.push_back(++dense.steps[r]);
    std::vector<int64_t> distinct = counts;
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    for (int64_t c : distinct) {
      std::vector<size_t> js;
      for (size_t j = 0; j < idx.size(); ++j)
        if (counts[j] == c) js.push_back(j);
      const int64_t n = static_cast<int64_t>(js.size()) * len;
      std::vector<float> p(n), m(n), v(n), gg(n);
      std::vector<uint16_t> o(n);
      for (size_t q = 0; q < js.size(); ++q) {
        const int64_t r = idx[js[q]];
        std::memcpy(&p[q * len], &dense.p[r * len], len * 4);
        std::memcpy(&m[q * len], &dense.m[r * len], len * 4);
        std::memcpy(&v[q * len], &dense.v[r * len], len * 4);
        std::memcpy(&gg[q * len], g.data() + js[q] * len * 4, len * 4);
      }
      lspo::adam_step(cfg, c, lspo::AdamBuffers{p.data(), m.data(), v.data(), gg.data(), DType::kFloat32, o.data(),
                                                DType::kBFloat16, n});
      for (size_t q = 0; q < js.size(); ++q) {
        const int64_t r = idx[js[q]];
        std::memcpy(&dense.p[r * len], &p[q * len], len * 4);
        std::memcpy(&dense.m[r * len], &m[q * len], len * 4);
        std::memcpy(&dense.v[r * len], &v[q * len], len * 4);
        std::memcpy(&dense.out[r * len * 2], &o[q * len], len * 2);
      }
    }
    ASSERT_TRUE(sparse == dense) << "lazy Adam differs from dense Adam on the touched rows at step " << k + 1;
  }
  // Per-row step counts: row 1 was touched in steps 1, 2, 4; row 3 in all four; row 4 never.
  EXPECT_EQ(sparse.steps[1], 3);
  EXPECT_EQ(sparse.steps[3], 4);
  EXPECT_EQ(sparse.steps[4], 0);
}

TEST(SparseAdam, EmptyStepTouchesNothing) {
  State s(5, 3, DType::kBFloat16, 1);
  const State start = s;
  lspo::sparse_adam_step(AdamConfig{}, s.buffers(true), SparseRows{nullptr, nullptr, DType::kFloat32, 0});
  EXPECT_TRUE(s == start);
}

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no lspo::Error (expected one mentioning '" << needle << "')";
  } catch (const lspo::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(SparseAdam, BadArgumentsThrowNamedErrors) {
  State s(6, 4, DType::kBFloat16, 2);
  const State start = s;
  auto g = make_grad(3, 4, DType::kFloat32, 5);
  auto run = [&](std::vector<int64_t> idx) {
    return [&s, &g, idx] {
      lspo::sparse_adam_step(AdamConfig{}, s.buffers(true),
                             SparseRows{idx.data(), g.data(), DType::kFloat32, static_cast<int64_t>(idx.size())});
    };
  };
  expect_error(run({0, 2, 2}), "strictly increasing");
  expect_error(run({3, 1, 4}), "strictly increasing");
  expect_error(run({0, 1, 6}), "out of range");
  expect_error(run({-1, 1, 2}), "out of range");
  EXPECT_TRUE(s == start) << "a rejected step changed the state";
  expect_error([&] {
    SparseAdamBuffers b = s.buffers(true);
    b.row_steps = nullptr;
    std::vector<int64_t> idx{1};
    lspo::sparse_adam_step(AdamConfig{}, b, SparseRows{idx.data(), g.data(), DType::kFloat32, 1});
  }, "row_steps");
  expect_error([&] {
    SparseAdamBuffers b = s.buffers(true);
    b.row_len = 0;
    lspo::sparse_adam_step(AdamConfig{}, b, SparseRows{});
  }, "row_len");
  expect_error([&] {
    AdamConfig c;
    c.beta1 = 1.0;
    lspo::sparse_adam_step(c, s.buffers(true), SparseRows{});
  }, "beta1");
  if (lspo::detected_isa() != Isa::kAVX512)
    expect_error([&] { lspo::sparse_adam_step_isa(Isa::kAVX512, AdamConfig{}, s.buffers(true), SparseRows{}); },
                 "cannot run");
}

TEST(GatherRows, CopiesSelectedRowsAndChecksIndices) {
  for (int64_t row_bytes : {1, 6, 8194}) {
    SCOPED_TRACE("row_bytes=" + std::to_string(row_bytes));
    const int64_t rows = 9;
    std::vector<unsigned char> src(rows * row_bytes);
    for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<unsigned char>(i * 31 + 7);
    std::vector<int64_t> idx{8, 0, 3, 3, 5};
    std::vector<unsigned char> dst(idx.size() * row_bytes, 0), want(dst.size());
    for (size_t j = 0; j < idx.size(); ++j)
      for (int64_t b = 0; b < row_bytes; ++b) want[j * row_bytes + b] = src[idx[j] * row_bytes + b];
    lspo::ThreadPool pool(2);
    lspo::gather_rows(src.data(), rows, row_bytes, idx.data(), static_cast<int64_t>(idx.size()), dst.data(), &pool);
    EXPECT_EQ(dst, want);
  }
  std::vector<unsigned char> src(4 * 8), dst(8);
  std::vector<int64_t> bad{4};
  expect_error([&] { lspo::gather_rows(src.data(), 4, 8, bad.data(), 1, dst.data()); }, "out of range");
  std::vector<int64_t> ok{0};
  expect_error([&] { lspo::gather_rows(src.data(), 4, 8, ok.data(), 1, src.data() + 8); }, "overlaps");
}

}  // namespace
