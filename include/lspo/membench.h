// lspo/membench.h -- the machine's own memory bandwidth, measured with a STREAM-triad loop
// (a[i] = b[i] + s * c[i] over fp32) split over lspo's thread pool. Benchmarks report their speed
// as a fraction of this (the roofline of memory-bound kernels such as the fused CPU Adam).
#pragma once
#include <cstdint>

namespace lspo {

class ThreadPool;

// One triad pass over n elements on `pool` (default: the global pool).
void stream_triad(float* a, const float* b, const float* c, float s, int64_t n, ThreadPool* pool = nullptr);

// The same with streaming (non-temporal) stores where the CPU has them (x86-64): `a` is written
// without being read into the cache first, so the pass moves exactly the 12 bytes/element counted.
void stream_triad_nt(float* a, const float* b, const float* c, float s, int64_t n, ThreadPool* pool = nullptr);

// In-place update a[i] = a[i] + s * c[i]: the access pattern of in-place optimizer kernels (every
// written line was read first, so no read for ownership): 12 bytes/element, like the triad.
void stream_update(float* a, const float* c, float s, int64_t n, ThreadPool* pool = nullptr);

struct TriadResult {
  int64_t n = 0;              // elements per array
  int reps = 0;               // timed passes
  double best_seconds = 0.0;  // fastest pass
  double bytes_per_pass = 0.0;  // STREAM convention: 12 bytes per element (read b, c; write a);
                                // with ordinary stores the hardware also reads `a` (4 more bytes)
  double best_bytes_per_s = 0.0;
};

// Allocates three arrays of n floats (first-touched by the pool threads), runs one warm-up pass
// and `reps` timed passes, returns the best. Throws lspo::Error on bad arguments.
// in_place: time stream_update instead of the triad.
TriadResult measure_triad(int64_t n, int reps, ThreadPool* pool = nullptr, bool streaming_stores = false,
                          bool in_place = false);

}  // namespace lspo
