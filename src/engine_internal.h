// Internals of the offload engine shared by engine.cpp and engine_disk.cpp (not installed).
#pragma once
#include <exception>
#include <string>

#include "lspo/engine.h"

namespace lspo {

struct OffloadEngine::Slot {
  std::string name;
  int64_t index = 0;
  int64_t numel = 0;
  int64_t order = 0;
  torch::ScalarType grad_dtype, out_dtype;
  // [0] committed, [1] speculative (swapped by commit)
  torch::Tensor master[2], m[2], v[2];
  torch::Tensor grad, out;
  int64_t step[2] = {0, 0};  // the step each half holds
  int nstate = 2;            // fp32 arrays per element: 3 with a master, 2 moments-only
  // disk tier: generation numbers of the committed, speculative and durable (MANIFEST) files
  bool disk = false;
  int64_t gen_committed = -1, gen_spec = -1, gen_durable = -1, next_gen = 0;
  bool synced = true;  // disk: the committed file is fsynced
  uint64_t sync_ticket[2] = {0, 0};  // disk: writer_ tickets of the committed / speculative file's fsync
  uint64_t last_sync = 0;            // the fsync ticket of the last stream_slot() that wrote a file
  bool dirty = true;   // host slot: committed state changed since the last persist()
  int pending = 0;          // queued or running jobs
  bool result = false;      // finished speculation not yet committed
  std::exception_ptr error;
};

inline DType to_dtype(torch::ScalarType t, const char* what) {
  switch (t) {
    case torch::kFloat: return DType::kFloat32;
    case torch::kBFloat16: return DType::kBFloat16;
    case torch::kHalf: return DType::kFloat16;
    default: LSPO_CHECK(false, "OffloadEngine: ", what, " dtype must be float32, bfloat16 or float16, got ", t);
  }
  return DType::kFloat32;
}

// The kernel's view of `n` elements of a slot starting at element `offset`: the fp32 arrays given
// (already offset), the gradient and output buffers offset here.
inline AdamBuffers OffloadEngine::kernel_buffers(const Slot& s, float* master, float* m, float* v, int64_t offset,
                                  int64_t n) {
  AdamBuffers b;
  b.param = master;
  b.exp_avg = m;
  b.exp_avg_sq = v;
  b.grad = static_cast<const char*>(s.grad.data_ptr()) + offset * static_cast<int64_t>(s.grad.element_size());
  b.grad_dtype = to_dtype(s.grad_dtype, "gradient");
  b.param_out = static_cast<char*>(s.out.data_ptr()) + offset * static_cast<int64_t>(s.out.element_size());
  b.out_dtype = to_dtype(s.out_dtype, "output");
  b.n = n;
  return b;
}

inline float* f32_or_null(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// A host slot's speculative half, whole (a disk slot has none: n = 0, for argument checks only).
inline AdamBuffers OffloadEngine::speculative_buffers(const Slot& s) {
  return kernel_buffers(s, f32_or_null(s.master[1]), f32_or_null(s.m[1]), f32_or_null(s.v[1]), 0, s.disk ? 0 : s.numel);
}

}  // namespace lspo
