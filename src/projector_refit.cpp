// src/projector_refit.cpp -- one refit check of a projector pair (include/lspo/refit.h).
#include "lspo/refit.h"

#include <chrono>
#include <cmath>

#include "projector_fit.h"

namespace lspo {
namespace {

struct Candidate {
  SparseProjector P, Q;
  detail::HeldoutFit fit;
};

Candidate fit_candidate(const SparseProjector& P, const SparseProjector& Q, bool fresh,
                        const std::vector<GradSample>& fit_samples, const std::vector<GradSample>& heldout,
                        const RefitOptions& opt) {
  Candidate c{P.clone(), Q.clone(), {}};
  if (fresh) {  // (a side kept whole stays the identity)
    if (!c.P.is_identity()) c.P.reinit_values_(opt.seed * 2 + 1, opt.init);
    if (!c.Q.is_identity()) c.Q.reinit_values_(opt.seed * 2 + 2, opt.init);
  }
  FitOptions fo;
  fo.lr = opt.lr;
  fo.max_iters = opt.iters;
  fo.l2 = opt.l2;
  c.fit = detail::fit_heldout(c.P, c.Q, fit_samples, heldout, fo, opt.eval_every, opt.patience);
  return c;
}

// The SVD basis (ProjectorBasis::kSvd): each side that is not an identity set from the fit samples'
// leading singular directions; scored like a fit (errors on the fit and held-out samples).
Candidate svd_candidate(const SparseProjector& P, const SparseProjector& Q, const std::vector<GradSample>& fit_samples,
                        const std::vector<GradSample>& heldout, double heldout_before) {
  Candidate c{P.clone(), Q.clone(), {}};
  if (!c.P.is_identity()) c.P.assign_dense_(top_singular_basis(fit_samples, true, c.P.d));
  if (!c.Q.is_identity()) c.Q.assign_dense_(top_singular_basis(fit_samples, false, c.Q.d));
  c.fit.fit.error_before = detail::closed_form_error(P, Q, fit_samples);
  c.fit.fit.error_after = detail::closed_form_error(c.P, c.Q, fit_samples);
  c.fit.heldout_before = heldout_before;
  c.fit.heldout_after = detail::closed_form_error(c.P, c.Q, heldout);
  return c;
}

void copy_into(SparseProjector& dst, const SparseProjector& src) {
  dst.values.copy_(src.values);
  if (src.whitened()) {
    if (dst.whitened()) {
      dst.whiten.copy_(src.whiten);
    } else {
      dst.whiten = src.whiten;
    }
  }
}

}  // namespace

ReinitPolicy parse_reinit(const std::string& name, const std::string& who) {
  if (name == "never") return ReinitPolicy::kNever;
  if (name == "on_failure") return ReinitPolicy::kOnFailure;
  if (name == "always") return ReinitPolicy::kAlways;
  LSPO_CHECK(false, who, ": unknown refit reinit policy '", name, "': use never, on_failure or always");
  return ReinitPolicy::kOnFailure;
}

ProjectorBasis parse_basis(const std::string& name, const std::string& who) {
  if (name == "sparse") return ProjectorBasis::kSparse;
  if (name == "svd") return ProjectorBasis::kSvd;
  LSPO_CHECK(false, who, ": unknown projector basis '", name, "': use sparse or svd");
  return ProjectorBasis::kSparse;
}

RefitResult refit(SparseProjector& P, SparseProjector& Q, const std::vector<GradSample>& fit_samples,
                  const std::vector<GradSample>& heldout, const RefitOptions& opt, torch::Tensor* M,
                  torch::Tensor* V) {
  const auto t0 = std::chrono::steady_clock::now();
  LSPO_CHECK(!fit_samples.empty(), "refit: no fit samples");
  LSPO_CHECK(opt.iters >= 1 && opt.lr > 0 && opt.l2 >= 0 && opt.eval_every >= 1 && opt.patience >= 0 && opt.drift >= 0 &&
                 opt.threshold >= 0 && opt.min_gain >= 0 && opt.min_gain < 1,
             "refit: need iters >= 1, lr > 0, l2 >= 0, eval_every >= 1, patience >= 0, drift >= 0, threshold >= 0, "
             "0 <= min_gain < 1");
  LSPO_CHECK((M == nullptr) == (V == nullptr), "refit: pass both moments M and V or neither");
  const std::vector<GradSample>& held = heldout.empty() ? fit_samples : heldout;
  torch::NoGradGuard ng;
  RefitResult res;
  res.heldout_before = detail::closed_form_error(P, Q, held);
  res.heldout_after = res.heldout_before;
  const double ref = opt.reference_error;
  res.fitted = res.heldout_before > opt.threshold &&
               (std::isnan(ref) || res.heldout_before > (1.0 + opt.drift) * ref);
  res.reference_error = std::isnan(ref) ? res.heldout_before : ref;
  if (res.fitted) {
    const double bar = (1.0 - opt.min_gain) * res.heldout_before;
    const bool svd = opt.basis == ProjectorBasis::kSvd;
    Candidate best = svd ? svd_candidate(P, Q, fit_samples, held, res.heldout_before)
                         : fit_candidate(P, Q, false, fit_samples, held, opt);
    res.iters = best.fit.fit.iters;
    const bool warm_ok = best.fit.heldout_after < bar;
    if (!svd && (opt.reinit == ReinitPolicy::kAlways || (opt.reinit == ReinitPolicy::kOnFailure && !warm_ok))) {
      Candidate fresh = fit_candidate(P, Q, true, fit_samples, held, opt);
      res.iters += fresh.fit.fit.iters;
      if (fresh.fit.heldout_after < best.fit.heldout_after) {
        best = std::move(fresh);
        res.reinit = true;
      }
    }
    res.fit_before = best.fit.fit.error_before;
    res.fit_after = best.fit.fit.error_after;
    if (best.fit.heldout_after < bar) {
      res.kept = true;
      res.heldout_after = best.fit.heldout_after;
      if (M != nullptr) {  // the moments may live elsewhere (host) than the projectors
        const torch::Device dev = M->device();
        carry_state(P.to(dev), Q.to(dev), best.P.to(dev), best.Q.to(dev), *M, *V);
      }
      copy_into(P, best.P);
      copy_into(Q, best.Q);
      res.reference_error = res.heldout_after;
    } else {
      res.reinit = false;
      res.reference_error = res.heldout_before;
    }
  }
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

}  // namespace lspo
