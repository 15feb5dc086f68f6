// cuda/projector_kernels.cu -- gather kernels for the projector primitives (torch-free).
// Declarations and the determinism contract: src/projector_kernels.h. Design notes:
// docs/architecture.md, "CUDA projector kernels".
//
// Kernels (bodies shared with the host emulation, see emulate_*):
//   right_project (tiled)  out[k, d] = Y[k, n] P        tile of 8 tokens x a 1024-row chunk of Y's
//                          columns staged in shared memory (fp32, swizzled); one thread per output
//                          column walks that column's entries of the chunk (column index, segptr)
//   ColGather (row_kernel) out[d, k] = P^T Y             one output row per thread row; its terms
//                          come from the column index (rows of Y gathered, vectorised along k)
//   EllGather (row_kernel) out[n, k] = P D  and  W += alpha P T   (terms straight from the ELL)
//   apply_cols (tiled)     W[m, n] += alpha U Q^T       as the right projection, with Q's ELL rows as
//                          the columns of Q^T; 8 rows of U per tile in shared memory
// No atomics: each output element is one thread's fixed-order sum.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../src/projector_kernels.h"
#include "lspo/cuda.h"

// Kernel bodies are __host__ __device__ so that emulate_*() can run the very same code serially on
// the host (tests without a GPU); only the __global__ wrappers and launches are device-only.
#define LSPO_HD __host__ __device__ __forceinline__

namespace lspo::detail {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

// ------------------------------------------------------------------ loads and stores
LSPO_HD float to_f32(float x) { return x; }
LSPO_HD float to_f32(bf16 x) { return __bfloat162float(x); }

// V consecutive elements at p (p aligned to V * sizeof(T) when V > 1) as fp32.
template <typename T, int V>
struct VecIO;

template <typename T>
struct VecIO<T, 1> {
  LSPO_HD static void load(const T* p, float (&v)[1]) { v[0] = to_f32(p[0]); }
};
template <>
struct VecIO<float, 2> {
  LSPO_HD static void load(const float* p, float (&v)[2]) {
    const float2 x = *reinterpret_cast<const float2*>(p);
    v[0] = x.x; v[1] = x.y;
  }
};
template <>
struct VecIO<bf16, 2> {
  LSPO_HD static void load(const bf16* p, float (&v)[2]) {
    const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    v[0] = x.x; v[1] = x.y;
  }
};
template <>
struct VecIO<float, 4> {
  LSPO_HD static void load(const float* p, float (&v)[4]) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
  }
  LSPO_HD static void store(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};
template <>
struct VecIO<bf16, 4> {
  LSPO_HD static void load(const bf16* p, float (&v)[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    __nv_bfloat162 lo, hi;
    static_assert(sizeof(lo) == sizeof(raw.x), "bf16x2 is 32 bits");
    memcpy(&lo, &raw.x, sizeof(lo));
    memcpy(&hi, &raw.y, sizeof(hi));
    const float2 a = __bfloat1622float2(lo), b = __bfloat1622float2(hi);
    v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
  }
  LSPO_HD static void store(bf16* p, const float (&v)[4]) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]), hi = __floats2bfloat162_rn(v[2], v[3]);
    uint2 raw;
    memcpy(&raw.x, &lo, sizeof(lo));
    memcpy(&raw.y, &hi, sizeof(hi));
    *reinterpret_cast<uint2*>(p) = raw;
  }
};
LSPO_HD void store1(float* p, float v) { *p = v; }
LSPO_HD void store1(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T, int V>
LSPO_HD void store_vec(T* p, const float (&v)[V]) {
  if constexpr (V == 1) {
    store1(p, v[0]);
  } else {
    VecIO<T, V>::store(p, v);
  }
}

// ------------------------------------------------------------------ right projection: Y P
constexpr int kRpTokens = 8;                       // tokens (rows of Y) per block, one register each
constexpr int kRpChunk = int(kRightProjectChunk);  // columns of Y (rows of P) per shared-memory pass

// Shared tile: for chunk column jj, the 8 token values form two float4 halves; half h sits at
// float4 slot 2*jj + (h ^ ((jj >> 2) & 1)). The swizzle spreads random jj over all 32 banks
// (without it the first halves would only ever hit 16 of them).
LSPO_HD int rp_slot(int jj, int h) { return 2 * jj + (h ^ ((jj >> 2) & 1)); }

// Stages rows t0 .. t0+nt-1, columns [c0, c0 + nc) of the row-major `src` (row stride ld) into the
// tile as fp32; rows >= nt and columns >= nc become 0. V columns per load: V > 1 needs ld, c0 and
// nc divisible by V and src aligned to V elements (the launcher checks), so a vector is either
// wholly inside [0, nc) or wholly outside.
template <typename T, int V>
LSPO_HD void stage_tile(float4* tile, const T* __restrict__ src, int64_t ld, int64_t t0, int nt, int64_t c0, int nc,
                        int tid) {
  for (int g = tid; g < kRpChunk / V; g += kThreads) {
    const int jj0 = g * V;
    float v[V][kRpTokens];
#pragma unroll
    for (int i = 0; i < kRpTokens; ++i) {
      float x[V];
      if (i < nt && jj0 < nc) {
        VecIO<T, V>::load(src + (t0 + i) * ld + c0 + jj0, x);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) x[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < V; ++e) v[e][i] = x[e];
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      tile[rp_slot(jj0 + e, 0)] = make_float4(v[e][0], v[e][1], v[e][2], v[e][3]);
      tile[rp_slot(jj0 + e, 1)] = make_float4(v[e][4], v[e][5], v[e][6], v[e][7]);
    }
  }
}

// Block (bx, by) of 256 threads: output columns c = bx * 256 + tid; token tiles t0 = by * 8,
// stepping by gridDim.y * 8. Per tile and chunk s: every thread stages columns jj = tid, tid + 256,
// ... of the chunk (phase 1, then a barrier), then each active thread accumulates its column's
// entries of that chunk (phase 2).
template <typename TIn, int V>
struct RightProject {
  RightProjectParams p;
  LSPO_HD int64_t rows() const { return p.k; }    // tokens: tiled 8 at a time
  LSPO_HD int64_t cols() const { return p.P.d; }  // output columns: one per thread
  LSPO_HD int nchunks() const { return p.cols.nchunks; }

  LSPO_HD void stage(float4* tile, int64_t t0, int nt, int s, int tid) const {
    const int64_t n = p.P.n, j0 = int64_t(s) * kRpChunk;
    const int nj = int(std::min<int64_t>(kRpChunk, n - j0));
    stage_tile<TIn, V>(tile, static_cast<const TIn*>(p.y), n, t0, nt, j0, nj, tid);
  }
  LSPO_HD void accumulate(const float4* tile, int64_t c, int s, float (&acc)[kRpTokens]) const {
    const int nch = p.cols.nchunks;
    const int32_t* seg = p.cols.segptr + c * (nch + 1);
    const int64_t j0 = int64_t(s) * kRpChunk;
    const int q1 = seg[s + 1];
    for (int q = seg[s]; q < q1; ++q) {
      const int jj = int(p.cols.rows[q] - j0);  // in [0, chunk) by construction of segptr
      const float w = p.P.val[p.cols.pos[q]];
      const float4 a = tile[rp_slot(jj, 0)], b = tile[rp_slot(jj, 1)];
      acc[0] = fmaf(w, a.x, acc[0]);
      acc[1] = fmaf(w, a.y, acc[1]);
      acc[2] = fmaf(w, a.z, acc[2]);
      acc[3] = fmaf(w, a.w, acc[3]);
      acc[4] = fmaf(w, b.x, acc[4]);
      acc[5] = fmaf(w, b.y, acc[5]);
      acc[6] = fmaf(w, b.z, acc[6]);
      acc[7] = fmaf(w, b.w, acc[7]);
    }
  }
  LSPO_HD void store(int64_t c, int64_t t0, int nt, const float (&acc)[kRpTokens]) const {
#pragma unroll
    for (int i = 0; i < kRpTokens; ++i) {
      if (i < nt) p.out[(t0 + i) * p.P.d + c] = acc[i];
    }
  }
};

// W [m, n] += alpha * U [m, d] Q^T for an ELL Q over n (column `col` of Q^T = row `col` of Q):
// the same tiling as RightProject with 8 rows of W per tile, U's row tile staged in shared memory
// chunk by chunk (d in 1024-column chunks), one thread per column of W, which walks its r ELL
// entries per chunk and keeps those inside it. The result is added to W in W's dtype.
template <typename TW, int V>
struct ApplyCols {
  ApplyColsParams p;
  LSPO_HD int64_t rows() const { return p.m; }
  LSPO_HD int64_t cols() const { return p.Q.n; }
  LSPO_HD int nchunks() const { return int((p.Q.d + kRpChunk - 1) / kRpChunk); }

  LSPO_HD void stage(float4* tile, int64_t j0, int nt, int s, int tid) const {
    const int64_t d = p.Q.d, c0 = int64_t(s) * kRpChunk;
    const int nc = int(std::min<int64_t>(kRpChunk, d - c0));
    stage_tile<float, V>(tile, p.u, d, j0, nt, c0, nc, tid);
  }
  LSPO_HD void accumulate(const float4* tile, int64_t col, int s, float (&acc)[kRpTokens]) const {
    const int32_t* __restrict__ idx = p.Q.idx + col * p.Q.r;
    const float* __restrict__ val = p.Q.val + col * p.Q.r;
    const int c0 = s * kRpChunk;
    for (int t = 0; t < p.Q.r; ++t) {
      const unsigned cc = unsigned(idx[t] - c0);
      if (cc >= unsigned(kRpChunk)) continue;  // entry lives in another chunk
      const float w = val[t];
      const float4 a = tile[rp_slot(int(cc), 0)], b = tile[rp_slot(int(cc), 1)];
      acc[0] = fmaf(w, a.x, acc[0]);
      acc[1] = fmaf(w, a.y, acc[1]);
      acc[2] = fmaf(w, a.z, acc[2]);
      acc[3] = fmaf(w, a.w, acc[3]);
      acc[4] = fmaf(w, b.x, acc[4]);
      acc[5] = fmaf(w, b.y, acc[5]);
      acc[6] = fmaf(w, b.z, acc[6]);
      acc[7] = fmaf(w, b.w, acc[7]);
    }
  }
  LSPO_HD void store(int64_t col, int64_t j0, int nt, const float (&acc)[kRpTokens]) const {
    TW* w = static_cast<TW*>(p.w);
#pragma unroll
    for (int i = 0; i < kRpTokens; ++i) {
      if (i < nt) {
        TW* o = w + (j0 + i) * p.Q.n + col;
        store1(o, fmaf(p.alpha, acc[i], to_f32(*o)));
      }
    }
  }
};

// Block (bx, by) of 256 threads: columns c = bx * 256 + tid; row tiles t0 = by * 8, stepping by
// gridDim.y * 8; per tile and chunk: stage (all threads), barrier, accumulate (active threads).
template <class Body>
__global__ void __launch_bounds__(kThreads) tiled_kernel(Body body) {
  __shared__ float4 tile[2 * kRpChunk];  // 32 KiB
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = c < body.cols();
  const int64_t rows = body.rows();
  const int nch = body.nchunks();
  for (int64_t t0 = int64_t(blockIdx.y) * kRpTokens; t0 < rows; t0 += int64_t(gridDim.y) * kRpTokens) {
    const int nt = int(std::min<int64_t>(kRpTokens, rows - t0));
    float acc[kRpTokens];
#pragma unroll
    for (int i = 0; i < kRpTokens; ++i) acc[i] = 0.f;
    for (int s = 0; s < nch; ++s) {
      __syncthreads();  // everyone is done reading the previous chunk / tile
      body.stage(tile, t0, nt, s, int(threadIdx.x));
      __syncthreads();
      if (active) body.accumulate(tile, c, s, acc);
    }
    if (active) body.store(c, t0, nt, acc);
  }
}

// ------------------------------------------------------------------ row gathers (k along threadIdx.x)
// Block (tx, ty): ty picks the output row, tx * V the first of V consecutive columns.
struct ThreadIdx {
  int64_t bx, by, tx, ty;  // block and thread index
  int64_t bdx, bdy, gdy;   // block dims and grid y
};

// out[row, :] = sum over the column-index entries q of column `row`: val[pos[q]] * y[rows[q], :]
template <typename TIn, int V>
struct ColGather {
  LeftProjectParams p;
  LSPO_HD void operator()(const ThreadIdx& t) const {
    const int64_t row = t.bx * t.bdy + t.ty;
    if (row >= p.P.d) return;
    const TIn* __restrict__ y = static_cast<const TIn*>(p.y);
    const int64_t k = p.k, kv = (k + V - 1) / V;
    const int q0 = p.cols.colptr[row], q1 = p.cols.colptr[row + 1];
    for (int64_t v = t.by * t.bdx + t.tx; v < kv; v += t.gdy * t.bdx) {
      const int64_t col = v * V;
      float acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = 0.f;
      for (int q = q0; q < q1; ++q) {
        const float w = p.P.val[p.cols.pos[q]];
        float x[V];
        VecIO<TIn, V>::load(y + int64_t(p.cols.rows[q]) * k + col, x);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = fmaf(w, x[e], acc[e]);
      }
      store_vec<float, V>(p.out + row * k + col, acc);
    }
  }
};

// out[row, :] (=|+= alpha *) sum_t val[row, t] * src[idx[row, t], :]
//   kAccumulate = false: out fp32 = the sum (expand)
//   kAccumulate = true : out (TOut) = out + alpha * sum, rounded once to TOut (apply)
template <typename TIn, typename TOut, int V, bool kAccumulate>
struct EllGather {
  EllView P;
  const TIn* src;
  int64_t k;
  TOut* out;
  float alpha;
  LSPO_HD void operator()(const ThreadIdx& t) const {
    const int64_t row = t.bx * t.bdy + t.ty;
    if (row >= P.n) return;
    const int64_t kv = (k + V - 1) / V;
    const int32_t* __restrict__ idx = P.idx + row * P.r;
    const float* __restrict__ val = P.val + row * P.r;
    for (int64_t v = t.by * t.bdx + t.tx; v < kv; v += t.gdy * t.bdx) {
      const int64_t col = v * V;
      float acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = 0.f;
      for (int q = 0; q < P.r; ++q) {
        const float w = val[q];
        float x[V];
        VecIO<TIn, V>::load(src + int64_t(idx[q]) * k + col, x);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = fmaf(w, x[e], acc[e]);
      }
      TOut* o = out + row * k + col;
      if constexpr (kAccumulate) {
        float cur[V];
        VecIO<TOut, V>::load(o, cur);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = fmaf(alpha, acc[e], cur[e]);
      }
      store_vec<TOut, V>(o, acc);
    }
  }
};

template <class Body>
__global__ void __launch_bounds__(kThreads) row_kernel(Body body) {
  body(ThreadIdx{int64_t(blockIdx.x), int64_t(blockIdx.y), int64_t(threadIdx.x), int64_t(threadIdx.y),
                 int64_t(blockDim.x), int64_t(blockDim.y), int64_t(gridDim.y)});
}

// ------------------------------------------------------------------ small element-wise helpers
__global__ void permute_values_kernel(const float* __restrict__ src, const int32_t* __restrict__ perm, int64_t count,
                                      float* __restrict__ dst) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    dst[i] = src[perm[i]];
  }
}

template <typename T>
__global__ void add_scaled_kernel(T* __restrict__ w, const float* __restrict__ src, int64_t count, float alpha) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    store1(w + i, fmaf(alpha, src[i], to_f32(w[i])));
  }
}

unsigned flat_blocks(int64_t count) {
  return unsigned(std::clamp<int64_t>((count + kThreads - 1) / kThreads, 1, 65535));
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0; }

void check_dtype(DType t, const char* what) {
  LSPO_CHECK(t == DType::kFloat32 || t == DType::kBFloat16, what, " must be float32 or bfloat16 (got ",
             dtype_name(t), ")");
}

// ------------------------------------------------------------------ where a kernel runs
// GpuExec launches on a stream; HostExec runs the same bodies serially over the same grid (tests).
struct GpuExec {
  cudaStream_t stream;
  int64_t max_grid_y;
};
struct HostExec {
  int64_t max_grid_y;
};

struct RowLaunch {
  int64_t gx = 1, gy = 1, tx = 32, ty = 8;
};
RowLaunch row_launch(int64_t rows, int64_t k, int vec, int64_t max_grid_y) {
  const int64_t kv = (k + vec - 1) / vec;  // vectors per row
  RowLaunch l;
  l.tx = 32;
  while (l.tx < kThreads && l.tx < kv) l.tx *= 2;
  l.ty = kThreads / l.tx;
  l.gx = (rows + l.ty - 1) / l.ty;
  l.gy = std::max<int64_t>(1, std::min<int64_t>((kv + l.tx - 1) / l.tx, max_grid_y));
  LSPO_CHECK(l.gx <= int64_t(0x7fffffff), "projector kernel: ", rows, " rows exceed the CUDA grid");
  return l;
}

template <class Body>
void run_rows(const GpuExec& e, const RowLaunch& l, const Body& body) {
  row_kernel<Body><<<dim3(unsigned(l.gx), unsigned(l.gy), 1), dim3(unsigned(l.tx), unsigned(l.ty), 1), 0, e.stream>>>(
      body);
  LSPO_CUDA_CHECK_LAUNCH();
}
template <class Body>
void run_rows(const HostExec&, const RowLaunch& l, const Body& body) {
  for (int64_t by = 0; by < l.gy; ++by)
    for (int64_t bx = 0; bx < l.gx; ++bx)
      for (int64_t ty = 0; ty < l.ty; ++ty)
        for (int64_t tx = 0; tx < l.tx; ++tx) body(ThreadIdx{bx, by, tx, ty, l.tx, l.ty, l.gy});
}

template <class Body>
void run_tiled(const GpuExec& e, int64_t gx, int64_t gy, const Body& body) {
  tiled_kernel<Body><<<dim3(unsigned(gx), unsigned(gy), 1), kThreads, 0, e.stream>>>(body);
  LSPO_CUDA_CHECK_LAUNCH();
}
// The kernel's two phases per chunk, separated as the barriers separate them.
template <class Body>
void run_tiled(const HostExec&, int64_t gx, int64_t gy, const Body& body) {
  std::vector<float4> tile(2 * kRpChunk);
  std::vector<float> accs(size_t(kThreads) * kRpTokens);
  auto acc_of = [&](int tid) -> float(&)[kRpTokens] {
    return *reinterpret_cast<float(*)[kRpTokens]>(accs.data() + size_t(tid) * kRpTokens);
  };
  const int64_t rows = body.rows(), cols = body.cols();
  for (int64_t by = 0; by < gy; ++by) {
    for (int64_t bx = 0; bx < gx; ++bx) {
      for (int64_t t0 = by * kRpTokens; t0 < rows; t0 += gy * kRpTokens) {
        const int nt = int(std::min<int64_t>(kRpTokens, rows - t0));
        std::fill(accs.begin(), accs.end(), 0.f);
        for (int s = 0; s < body.nchunks(); ++s) {
          for (int tid = 0; tid < kThreads; ++tid) body.stage(tile.data(), t0, nt, s, tid);
          for (int tid = 0; tid < kThreads; ++tid) {
            const int64_t c = bx * kThreads + tid;
            if (c < cols) body.accumulate(tile.data(), c, s, acc_of(tid));
          }
        }
        for (int tid = 0; tid < kThreads; ++tid) {
          const int64_t c = bx * kThreads + tid;
          if (c < cols) body.store(c, t0, nt, acc_of(tid));
        }
      }
    }
  }
}

// Grid of the tiled kernels: x over output columns, y over 8-row tiles (capped; grid-stride).
template <class Body, class Exec>
void launch_tiled(const Body& body, const Exec& e, const char* what) {
  const int64_t gx = (body.cols() + kThreads - 1) / kThreads;
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>((body.rows() + kRpTokens - 1) / kRpTokens, e.max_grid_y));
  LSPO_CHECK(gx <= int64_t(0x7fffffff), what, ": ", body.cols(), " columns exceed the CUDA grid");
  run_tiled(e, gx, gy, body);
}

// Widest staging load (4, 2 or 1 elements) that rows of stride ld starting at src allow.
int stage_width(const void* src, int64_t ld, size_t elem) {
  for (int v : {4, 2}) {
    if (ld % v == 0 && aligned(src, size_t(v) * elem)) return v;
  }
  return 1;
}

template <typename TIn, class Exec>
void right_typed(const RightProjectParams& p, const Exec& e) {
  const int v = stage_width(p.y, p.P.n, sizeof(TIn));
  if (v == 4) {
    launch_tiled(RightProject<TIn, 4>{p}, e, "right_project");
  } else if (v == 2) {
    launch_tiled(RightProject<TIn, 2>{p}, e, "right_project");
  } else {
    launch_tiled(RightProject<TIn, 1>{p}, e, "right_project");
  }
}

template <class Exec>
void right_project_impl(const RightProjectParams& p, const Exec& e) {
  check_dtype(p.y_dtype, "right_project input");
  if (p.k == 0 || p.P.d == 0) return;
  LSPO_CHECK(p.cols.nchunks == (p.P.n + kRpChunk - 1) / kRpChunk, "right_project: column index built for ",
             p.cols.nchunks, " chunks, the kernel needs ", (p.P.n + kRpChunk - 1) / kRpChunk);
  if (p.y_dtype == DType::kFloat32) {
    right_typed<float>(p, e);
  } else {
    right_typed<bf16>(p, e);
  }
}

template <class Exec>
void apply_cols_impl(const ApplyColsParams& p, const Exec& e) {
  check_dtype(p.w_dtype, "apply_cols weight");
  if (p.m == 0 || p.Q.n == 0) return;
  const int v = stage_width(p.u, p.Q.d, sizeof(float));
  if (p.w_dtype == DType::kFloat32) {
    if (v == 4) launch_tiled(ApplyCols<float, 4>{p}, e, "apply_cols");
    else if (v == 2) launch_tiled(ApplyCols<float, 2>{p}, e, "apply_cols");
    else launch_tiled(ApplyCols<float, 1>{p}, e, "apply_cols");
  } else {
    if (v == 4) launch_tiled(ApplyCols<bf16, 4>{p}, e, "apply_cols");
    else if (v == 2) launch_tiled(ApplyCols<bf16, 2>{p}, e, "apply_cols");
    else launch_tiled(ApplyCols<bf16, 1>{p}, e, "apply_cols");
  }
}

template <typename TIn, class Exec>
void left_typed(const LeftProjectParams& p, const Exec& e) {
  // 4-wide when every row start is 4-element aligned; otherwise scalar.
  const bool vec4 = p.k % 4 == 0 && aligned(p.y, 4 * sizeof(TIn)) && aligned(p.out, 4 * sizeof(float));
  const RowLaunch l = row_launch(p.P.d, p.k, vec4 ? 4 : 1, e.max_grid_y);
  if (vec4) {
    run_rows(e, l, ColGather<TIn, 4>{p});
  } else {
    run_rows(e, l, ColGather<TIn, 1>{p});
  }
}

template <class Exec>
void left_project_impl(const LeftProjectParams& p, const Exec& e) {
  check_dtype(p.y_dtype, "left_project input");
  if (p.k == 0 || p.P.d == 0) return;
  if (p.y_dtype == DType::kFloat32) {
    left_typed<float>(p, e);
  } else {
    left_typed<bf16>(p, e);
  }
}

template <typename TIn, typename TOut, bool kAcc, class Exec>
void ell_typed(const EllView& P, const void* src, int64_t k, void* out, float alpha, const Exec& e) {
  const bool vec4 = k % 4 == 0 && aligned(src, 4 * sizeof(TIn)) && aligned(out, 4 * sizeof(TOut));
  const RowLaunch l = row_launch(P.n, k, vec4 ? 4 : 1, e.max_grid_y);
  const TIn* s = static_cast<const TIn*>(src);
  TOut* o = static_cast<TOut*>(out);
  if (vec4) {
    run_rows(e, l, EllGather<TIn, TOut, 4, kAcc>{P, s, k, o, alpha});
  } else {
    run_rows(e, l, EllGather<TIn, TOut, 1, kAcc>{P, s, k, o, alpha});
  }
}

template <class Exec>
void expand_impl(const ExpandParams& p, const Exec& e) {
  check_dtype(p.d_dtype, "expand input");
  if (p.k == 0 || p.P.n == 0) return;
  if (p.d_dtype == DType::kFloat32) {
    ell_typed<float, float, false>(p.P, p.dmat, p.k, p.out, 1.f, e);
  } else {
    ell_typed<bf16, float, false>(p.P, p.dmat, p.k, p.out, 1.f, e);
  }
}

template <class Exec>
void apply_rows_impl(const ApplyRowsParams& p, const Exec& e) {
  check_dtype(p.w_dtype, "apply_rows weight");
  if (p.k == 0 || p.P.n == 0) return;
  if (p.w_dtype == DType::kFloat32) {
    ell_typed<float, float, true>(p.P, p.t, p.k, p.w, p.alpha, e);
  } else {
    ell_typed<float, bf16, true>(p.P, p.t, p.k, p.w, p.alpha, e);
  }
}

}  // namespace

// ------------------------------------------------------------------ launchers
void launch_right_project(const RightProjectParams& p, cudaStream_t stream) {
  right_project_impl(p, GpuExec{stream, kMaxGridY});
}
void launch_left_project(const LeftProjectParams& p, cudaStream_t stream) {
  left_project_impl(p, GpuExec{stream, kMaxGridY});
}
void launch_expand(const ExpandParams& p, cudaStream_t stream) { expand_impl(p, GpuExec{stream, kMaxGridY}); }
void launch_apply_rows(const ApplyRowsParams& p, cudaStream_t stream) {
  apply_rows_impl(p, GpuExec{stream, kMaxGridY});
}

void launch_apply_cols(const ApplyColsParams& p, cudaStream_t stream) {
  apply_cols_impl(p, GpuExec{stream, kMaxGridY});
}

void emulate_apply_cols(const ApplyColsParams& p, int64_t max_grid_y) {
  apply_cols_impl(p, HostExec{std::min<int64_t>(max_grid_y, kMaxGridY)});
}
void emulate_right_project(const RightProjectParams& p, int64_t max_grid_y) {
  right_project_impl(p, HostExec{std::min<int64_t>(max_grid_y, kMaxGridY)});
}
void emulate_left_project(const LeftProjectParams& p, int64_t max_grid_y) {
  left_project_impl(p, HostExec{std::min<int64_t>(max_grid_y, kMaxGridY)});
}
void emulate_expand(const ExpandParams& p, int64_t max_grid_y) {
  expand_impl(p, HostExec{std::min<int64_t>(max_grid_y, kMaxGridY)});
}
void emulate_apply_rows(const ApplyRowsParams& p, int64_t max_grid_y) {
  apply_rows_impl(p, HostExec{std::min<int64_t>(max_grid_y, kMaxGridY)});
}

void launch_permute_values(const float* src, const int32_t* perm, int64_t count, float* dst, cudaStream_t stream) {
  if (count == 0) return;
  permute_values_kernel<<<flat_blocks(count), kThreads, 0, stream>>>(src, perm, count, dst);
  LSPO_CUDA_CHECK_LAUNCH();
}

void launch_add_scaled(void* w, DType w_dtype, const float* src, int64_t count, float alpha, cudaStream_t stream) {
  check_dtype(w_dtype, "add_scaled target");
  if (count == 0) return;
  if (w_dtype == DType::kFloat32) {
    add_scaled_kernel<float><<<flat_blocks(count), kThreads, 0, stream>>>(static_cast<float*>(w), src, count, alpha);
  } else {
    add_scaled_kernel<bf16><<<flat_blocks(count), kThreads, 0, stream>>>(static_cast<bf16*>(w), src, count, alpha);
  }
  LSPO_CUDA_CHECK_LAUNCH();
}

}  // namespace lspo::detail
