// lspo/refit.h -- one refit check of a projector pair (LSP-Offload's projector learning, lspo's rule).
//
// Protocol (what an optimizer does at a refit-check step, see docs/convergence.md):
//  * the step's micro-batch gradients of a projected layer are summed densely in two halves -- the
//    even micro-batches into the fit sum, the odd ones into the held-out sum (with one micro-batch,
//    both are that micro-batch: the held-out check is then in-sample) -- so the fit target is the
//    low-noise accumulated gradient, and gradient accumulation stays exact (S = compress of the sum
//    with the projectors the check leaves). Memory: two dense fp32 m x n buffers per projected layer,
//    on check steps only;
//  * refit(P, Q, {fit sum}, {held-out sum}, opt, &M, &V) decides, fits, keeps or drops, carries the
//    Adam moments when it keeps; the optimizer then compresses fit sum + held-out sum.
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "lspo/projector.h"

namespace lspo {

enum class ReinitPolicy {
  kNever,      // warm start only
  kOnFailure,  // warm start; fresh random values (same positions) only when that does not improve held-out e
  kAlways,     // both; keep the one with the lower held-out e
};

// "never" | "on_failure" | "always" (lspo::Error naming `who` otherwise).
ReinitPolicy parse_reinit(const std::string& name, const std::string& who);
// "sparse" | "svd" (lspo::Error naming `who` otherwise).
ProjectorBasis parse_basis(const std::string& name, const std::string& who);

struct RefitOptions {
  // the fit (lspo::fit on the fit samples, Adam on values / RMS(values))
  int64_t iters = 40;  // measured: 100 cost 4x the time for the same fine-tuning loss
  double lr = 0.1;
  double l2 = 0.01;         // FitOptions::l2 (whitened: proximal term toward the start values)
  int64_t eval_every = 10;  // held-out scoring period inside the fit (early stopping)
  int64_t patience = 2;     // stop a fit after this many scorings without a new held-out best (0: never)
  // the rule: fit only when held-out e > threshold and (no reference yet, or held-out e has drifted
  // above (1 + drift) * reference_error, the held-out e the last check left)
  double threshold = 0.0;
  double drift = 0.1;
  double reference_error = std::numeric_limits<double>::quiet_NaN();
  // keep a fit only when its held-out e < (1 - min_gain) * held-out e of the current projectors
  double min_gain = 0.0;
  ReinitPolicy reinit = ReinitPolicy::kOnFailure;
  uint64_t seed = 0;  // of the fresh values of a re-init (use a different seed per check and layer)
  ProjectorInit init = ProjectorInit::kGaussian;
  // kSvd: the candidate is not fitted but set from the fit samples' leading singular directions
  // (top_singular_basis, for every side that is not an identity); iters, lr, l2, eval_every,
  // patience, reinit and seed are then unused. The rule and the held-out judgement are the same.
  ProjectorBasis basis = ProjectorBasis::kSparse;
};

struct RefitResult {
  double heldout_before = 0;  // mean e of the projectors on the held-out samples before the check
  double heldout_after = 0;   // ... of the projectors the check leaves (= before when nothing was kept)
  double fit_before = 0, fit_after = 0;  // e on the fit samples, of the kept fit (0 when none ran)
  bool fitted = false;        // the rule asked for a fit
  bool kept = false;          // P, Q (and M, V) changed
  bool reinit = false;        // the kept fit started from fresh random values
  int64_t iters = 0;          // Adam iterations run in all (warm + re-init; 0 with the SVD basis)
  double seconds = 0;         // wall time of the whole check
  double reference_error = 0; // pass as RefitOptions::reference_error at the next check
};

// One refit check: see the protocol above. P, Q must both be whitened or both not. When the check
// keeps new projectors, their values (and whiten) are written into P, Q in place and, if M and V are
// given ([dP, dQ] fp32, the Adam moments in P, Q's subspace, on any device), carried into the new
// subspace with carry_state. Samples: dense G or activation pairs, on the projectors' device.
RefitResult refit(SparseProjector& P, SparseProjector& Q, const std::vector<GradSample>& fit_samples,
                  const std::vector<GradSample>& heldout, const RefitOptions& opt = {},
                  torch::Tensor* M = nullptr, torch::Tensor* V = nullptr);

}  // namespace lspo
