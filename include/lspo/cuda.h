// lspo/cuda.h -- CUDA plumbing: LSPO_CUDA_CHECK, LSPO_CUSPARSE_CHECK, and move-only RAII handles
// for streams, events and pinned host buffers. Only available in builds with LSPO_WITH_CUDA.
#pragma once
#ifdef LSPO_WITH_CUDA
#include <cuda_runtime.h>
#include <cusparse.h>

#include <cstddef>
#include <utility>

#include "lspo/common.h"

// Throws lspo::Error naming the file, line, expression and CUDA's error string.
#define LSPO_CUDA_CHECK(expr)                                                                      \
  do {                                                                                             \
    cudaError_t lspo_err_ = (expr);                                                                \
    if (lspo_err_ != cudaSuccess) {                                                                \
      (void)cudaGetLastError();                                                                    \
      ::lspo::detail::throw_error(__FILE__, __LINE__, #expr,                                       \
                                  ::lspo::detail::concat("CUDA error ", cudaGetErrorName(lspo_err_), \
                                                         ": ", cudaGetErrorString(lspo_err_)));    \
    }                                                                                              \
  } while (0)

// After a kernel launch: checks the launch itself (not its completion).
#define LSPO_CUDA_CHECK_LAUNCH() LSPO_CUDA_CHECK(cudaPeekAtLastError())

// Throws lspo::Error naming the file, line, expression and cuSPARSE's status name and message.
#define LSPO_CUSPARSE_CHECK(expr)                                                                  \
  do {                                                                                             \
    cusparseStatus_t lspo_st_ = (expr);                                                            \
    if (lspo_st_ != CUSPARSE_STATUS_SUCCESS) {                                                     \
      ::lspo::detail::throw_error(__FILE__, __LINE__, #expr,                                       \
                                  ::lspo::detail::concat("cuSPARSE error ", cusparseGetErrorName(lspo_st_), \
                                                         ": ", cusparseGetErrorString(lspo_st_))); \
    }                                                                                              \
  } while (0)

namespace lspo {
namespace cuda {

class Stream {
 public:
  Stream() = default;  // null handle
  static Stream create(int priority = 0) {
    Stream s;
    LSPO_CUDA_CHECK(cudaStreamCreateWithPriority(&s.s_, cudaStreamNonBlocking, priority));
    s.owned_ = true;
    return s;
  }
  // Non-owning view of a stream someone else manages (e.g. PyTorch's current stream).
  static Stream borrow(cudaStream_t s) {
    Stream r;
    r.s_ = s;
    return r;
  }
  ~Stream() { reset(); }
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)), owned_(std::exchange(o.owned_, false)) {}
  Stream& operator=(Stream&& o) noexcept {
    if (this != &o) {
      reset();
      s_ = std::exchange(o.s_, nullptr);
      owned_ = std::exchange(o.owned_, false);
    }
    return *this;
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  void synchronize() const { LSPO_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  void reset() noexcept {
    if (owned_ && s_) cudaStreamDestroy(s_);
    s_ = nullptr;
    owned_ = false;
  }
  cudaStream_t s_ = nullptr;
  bool owned_ = false;
};

class Event {
 public:
  Event() = default;
  static Event create(bool timing = false) {
    Event e;
    LSPO_CUDA_CHECK(cudaEventCreateWithFlags(&e.e_, timing ? cudaEventDefault : cudaEventDisableTiming));
    return e;
  }
  ~Event() {
    if (e_) cudaEventDestroy(e_);
  }
  Event(Event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  Event& operator=(Event&& o) noexcept {
    if (this != &o) {
      if (e_) cudaEventDestroy(e_);
      e_ = std::exchange(o.e_, nullptr);
    }
    return *this;
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }
  void record(cudaStream_t s) { LSPO_CUDA_CHECK(cudaEventRecord(e_, s)); }
  // GPU-side wait: work queued on `s` after this call starts after the event completes.
  void block(cudaStream_t s) const { LSPO_CUDA_CHECK(cudaStreamWaitEvent(s, e_, 0)); }
  void synchronize() const { LSPO_CUDA_CHECK(cudaEventSynchronize(e_)); }
  bool query() const {
    cudaError_t r = cudaEventQuery(e_);
    if (r == cudaErrorNotReady) return false;
    LSPO_CUDA_CHECK(r);
    return true;
  }

 private:
  cudaEvent_t e_ = nullptr;
};

// Page-locked host memory. try_allocate returns an empty buffer instead of throwing when the
// driver refuses to pin (callers fall back to pageable memory and say so).
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  static PinnedBuffer allocate(size_t bytes) {
    PinnedBuffer b = try_allocate(bytes);
    LSPO_CHECK(bytes == 0 || b.data(), "could not pin ", bytes, " bytes of host memory");
    return b;
  }
  static PinnedBuffer try_allocate(size_t bytes) {
    PinnedBuffer b;
    if (bytes == 0) return b;
    if (cudaHostAlloc(&b.p_, bytes, cudaHostAllocDefault) != cudaSuccess) {
      (void)cudaGetLastError();
      b.p_ = nullptr;
      return b;
    }
    b.bytes_ = bytes;
    return b;
  }
  ~PinnedBuffer() {
    if (p_) cudaFreeHost(p_);
  }
  PinnedBuffer(PinnedBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      if (p_) cudaFreeHost(p_);
      p_ = std::exchange(o.p_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* data() const { return p_; }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace cuda
}  // namespace lspo
#endif  // LSPO_WITH_CUDA
