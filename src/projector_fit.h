// src/projector_fit.h -- internal: the fit loop with held-out selection, shared by fit() and refit().
#pragma once
#include <vector>

#include "lspo/projector.h"

namespace lspo::detail {

struct HeldoutFit {
  FitResult fit;              // errors on the fit samples
  double heldout_before = 0;  // mean e on the held-out samples at the start and for the kept values
  double heldout_after = 0;   // (without held-out samples: the fit samples' errors)
};

// fit() with held-out samples: every eval_every iterations (and at the last) the iterate is scored
// on `heldout` and the lowest-scoring one is kept (early stopping); without held-out samples the
// iterate with the lowest training e is kept. patience > 0: stop after that many held-out
// evaluations in a row without a new best. Recomputes `whiten` of whitened projectors.
HeldoutFit fit_heldout(SparseProjector& P, SparseProjector& Q, const std::vector<GradSample>& samples,
                       const std::vector<GradSample>& heldout, const FitOptions& opt, int64_t eval_every,
                       int64_t patience = 0);

// Mean e over samples in closed form (O(r size(G) + d^3) a sample, no m x n temporary); equals
// relative_error up to rounding.
double closed_form_error(const SparseProjector& P, const SparseProjector& Q, const std::vector<GradSample>& samples);

}  // namespace lspo::detail
