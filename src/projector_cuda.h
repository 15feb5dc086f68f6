// src/projector_cuda.h -- internal: the CUDA primitives under the projector operations.
//
// src/projector.cpp composes every public operation of include/lspo/projector.h from these four
// primitives (and their CPU twins). They are implemented in src/projector_cuda.cpp (Torch edge:
// checks, allocation, current-stream lookup) over torch-free kernels in cuda/*.cu that take raw
// pointers, sizes and an explicit cudaStream_t. Without LSPO_WITH_CUDA they throw lspo::Error.
//
// Notation: P is an n x d ELL matrix (indices int32 [n, r], values fp32 [n, r]).
// Inputs may be fp32 or bf16 and must be contiguous; outputs are fp32 unless stated; everything
// runs on at::cuda::getCurrentCUDAStream() of the inputs' device.
#pragma once
#include <torch/torch.h>

#include "lspo/projector.h"

namespace lspo::detail {

bool projector_cuda_compiled();  // true when built with LSPO_WITH_CUDA

// Y [k, n] -> Y P  [k, d]            (the sparse factor on the right: X P, dY Q)
torch::Tensor cuda_right_project(const torch::Tensor& Y, const SparseProjector& P, ProjectorBackend b);
// Y [n, k] -> P^T Y  [d, k]
torch::Tensor cuda_left_project(const SparseProjector& P, const torch::Tensor& Y, ProjectorBackend b);
// D [d, k] -> P D  [n, k]
torch::Tensor cuda_expand(const SparseProjector& P, const torch::Tensor& D, ProjectorBackend b);
// W [n, k] (fp32 or bf16, in place): W += alpha * P T, T [d, k] fp32; no fp32 [n, k] temporary.
// (apply_(W, P, Q, Delta, alpha) = cuda_apply_rows_(W, P, Delta Q^T, alpha) with Delta Q^T [dP, n].)
void cuda_apply_rows_(torch::Tensor& W, const SparseProjector& P, const torch::Tensor& T, double alpha,
                      ProjectorBackend b);

// W [m, n] (fp32 or bf16, in place): W += alpha * U Q^T, U [m, dQ] fp32, Q the projector of n; no
// fp32 [m, n] temporary. Second way to apply an update:
//   apply_(W, P, Q, Delta, alpha) = cuda_apply_cols_(W, cuda_expand(P, Delta), Q, alpha)
// It reads W once with U's rows staged in shared memory, where cuda_apply_rows_ gathers r rows of
// T per row of W; which is faster is for benchmarks/gpu/projector_gpu.py to say (unmeasured).
void cuda_apply_cols_(torch::Tensor& W, const torch::Tensor& U, const SparseProjector& Q, double alpha,
                      ProjectorBackend b);

// Builds (or finds) P's column index now: the one synchronising step of the first CUDA call on a
// projector. Call it outside CUDA-graph capture and timed loops; later calls are asynchronous.
void cuda_prepare_projector(const SparseProjector& P);

// The backend a primitive runs for this shape: `requested` unless it is kAuto, which resolves
// through the table in src/projector_cuda.cpp (kGather until benchmarks/projector.py calibrates it
// on a GPU). Exposed so that benchmarks and tests can report the choice.
enum class CudaPrimitive { kRightProject, kLeftProject, kExpand, kApplyRows, kApplyCols };
ProjectorBackend cuda_resolve_backend(CudaPrimitive op, int64_t n, int64_t d, int64_t r, int64_t k,
                                      ProjectorBackend requested);

// The CUDA primitives build a column index of P (its columns as sorted lists) on first use and
// cache it per indices tensor (device memory ~ 8 * n * r + 4 * d * (n / 1024 + 2) bytes; the first
// call per projector copies the indices to the host and synchronises). Entries die with their
// projector's indices tensor (dropped at the next build). Number of entries, for tests:
size_t projector_cuda_cache_entries();

}  // namespace lspo::detail
