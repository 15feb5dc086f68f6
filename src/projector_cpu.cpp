// src/projector_cpu.cpp -- CPU projector primitives (see src/projector_cpu.h).
// Why hand-written: P has r << d nonzeros per row, so Y P costs k*n*r multiply-adds where a GEMM with
// the materialised P costs k*n*d, and ATen's sparse CSR matmul on CPU does not take bf16 operands
// nor fuse the in-place bf16 update; benchmarks/projector.py --primitives measures the alternatives.
#include "projector_cpu.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "lspo/half.h"
#include "lspo/thread_pool.h"

namespace lspo::detail {
namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }

// Minimum rows per thread chunk so that a chunk holds at least ~64K multiply-adds.
int64_t min_chunk(int64_t work_per_row) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_row)); }

template <typename T>
void right_project_impl(const T* Y, int64_t k, const EllView& P, float* out) {
  const int64_t n = P.n, r = P.r, d = P.d;
  ThreadPool::global().parallel_for(k, min_chunk(n * r), 1, [&](int64_t b, int64_t e) {
    int64_t i = b;
    // Four rows of Y at a time share each (index, value) load.
    for (; i + 4 <= e; i += 4) {
      float* o0 = out + i * d;
      float* o1 = o0 + d;
      float* o2 = o1 + d;
      float* o3 = o2 + d;
      std::memset(o0, 0, sizeof(float) * 4 * d);
      const T* y0 = Y + i * n;
      const T* y1 = y0 + n;
      const T* y2 = y1 + n;
      const T* y3 = y2 + n;
      for (int64_t t = 0; t < n; ++t) {
        const float a0 = load(y0, t), a1 = load(y1, t), a2 = load(y2, t), a3 = load(y3, t);
        const int32_t* ix = P.indices + t * r;
        const float* v = P.values + t * r;
        for (int64_t s = 0; s < r; ++s) {
          const int64_t j = ix[s];
          const float w = v[s];
          o0[j] += a0 * w;
          o1[j] += a1 * w;
          o2[j] += a2 * w;
          o3[j] += a3 * w;
        }
      }
    }
    for (; i < e; ++i) {
      float* o = out + i * d;
      std::memset(o, 0, sizeof(float) * d);
      const T* y = Y + i * n;
      for (int64_t t = 0; t < n; ++t) {
        const float a = load(y, t);
        const int32_t* ix = P.indices + t * r;
        const float* v = P.values + t * r;
        for (int64_t s = 0; s < r; ++s) o[ix[s]] += a * v[s];
      }
    }
  });
}

template <typename T>
void left_project_impl(const EllView& P, const T* Y, int64_t k, float* out) {
  const int64_t n = P.n, r = P.r, d = P.d;
  // Each thread owns a block of output columns and walks all of P: no reduction, deterministic.
  ThreadPool::global().parallel_for(k, std::max<int64_t>(16, min_chunk(n * r)), 16, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    for (int64_t j = 0; j < d; ++j) std::memset(out + j * k + c0, 0, sizeof(float) * w);
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : w);
    for (int64_t t = 0; t < n; ++t) {
      const float* y;
      if constexpr (std::is_same_v<T, float>) {
        y = Y + t * k + c0;
      } else {
        for (int64_t c = 0; c < w; ++c) buf[c] = load(Y, t * k + c0 + c);
        y = buf.data();
      }
      const int32_t* ix = P.indices + t * r;
      const float* v = P.values + t * r;
      for (int64_t s = 0; s < r; ++s) {
        float* o = out + ix[s] * k + c0;
        const float a = v[s];
        for (int64_t c = 0; c < w; ++c) o[c] += a * y[c];
      }
    }
  });
}

// Row t of P T for columns [c0, c0 + w) into acc.
inline void gather_row(const EllView& P, const float* T, int64_t k, int64_t t, int64_t c0, int64_t w, float* acc) {
  std::memset(acc, 0, sizeof(float) * w);
  const int32_t* ix = P.indices + t * P.r;
  const float* v = P.values + t * P.r;
  for (int64_t s = 0; s < P.r; ++s) {
    const float* src = T + ix[s] * k + c0;
    const float a = v[s];
    for (int64_t c = 0; c < w; ++c) acc[c] += a * src[c];
  }
}

}  // namespace

void cpu_right_project(const void* Y, DType dt, int64_t k, const EllView& P, float* out) {
  if (k == 0) return;
  if (dt == DType::kFloat32) {
    right_project_impl(static_cast<const float*>(Y), k, P, out);
  } else {
    LSPO_CHECK(dt == DType::kBFloat16, "cpu_right_project: unsupported dtype ", dtype_name(dt));
    right_project_impl(static_cast<const uint16_t*>(Y), k, P, out);
  }
}

void cpu_left_project(const EllView& P, const void* Y, DType dt, int64_t k, float* out) {
  if (k == 0) return;
  if (dt == DType::kFloat32) {
    left_project_impl(P, static_cast<const float*>(Y), k, out);
  } else {
    LSPO_CHECK(dt == DType::kBFloat16, "cpu_left_project: unsupported dtype ", dtype_name(dt));
    left_project_impl(P, static_cast<const uint16_t*>(Y), k, out);
  }
}

void cpu_expand(const EllView& P, const float* D, int64_t k, float* out) {
  if (k == 0) return;
  ThreadPool::global().parallel_for(P.n, min_chunk(P.r * k), 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) gather_row(P, D, k, t, 0, k, out + t * k);
  });
}

void cpu_apply_rows(void* W, DType dt, const EllView& P, const float* T, int64_t k, float alpha) {
  if (k == 0) return;
  LSPO_CHECK(dt == DType::kFloat32 || dt == DType::kBFloat16, "cpu_apply_rows: unsupported dtype ", dtype_name(dt));
  constexpr int64_t kBlock = 1024;  // columns per fp32 staging buffer (4 KiB, stays in L1)
  ThreadPool::global().parallel_for(P.n, min_chunk(P.r * k), 1, [&](int64_t b, int64_t e) {
    float acc[kBlock];
    for (int64_t t = b; t < e; ++t) {
      for (int64_t c0 = 0; c0 < k; c0 += kBlock) {
        const int64_t w = std::min(kBlock, k - c0);
        gather_row(P, T, k, t, c0, w, acc);
        if (dt == DType::kFloat32) {
          float* row = static_cast<float*>(W) + t * k + c0;
          for (int64_t c = 0; c < w; ++c) row[c] += alpha * acc[c];
        } else {
          uint16_t* row = static_cast<uint16_t*>(W) + t * k + c0;
          for (int64_t c = 0; c < w; ++c) row[c] = float_to_bf16(bf16_to_float(row[c]) + alpha * acc[c]);
        }
      }
    }
  });
}

}  // namespace lspo::detail
