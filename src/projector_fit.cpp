// src/projector_fit.cpp -- learning the projector values (fit), the error metric, the refit test and
// the optimizer-state carry-over (include/lspo/projector.h).
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "lspo/projector.h"
#include "projector_fit.h"

namespace lspo {
namespace {

// Differentiable P^T Y for Y [n, k] fp32 (autograd flows into the values and into Y). Forward on
// lspo's own left_project kernel (threaded CPU / CUDA); backward by r row gathers of dOut [d, k]:
//   dY[i, :] = sum_s val[i, s] dOut[idx[i, s], :]   (= P dOut),
//   dval[i, s] = <dOut[idx[i, s], :], Y[i, :]>.
// (torch's index_add, used before, ran at ~150 ms per [2048, 256] pass on CPU: fit took seconds per
// iteration on a 2048 x 512 layer.)
struct LeftProjectFn : public torch::autograd::Function<LeftProjectFn> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& val, const torch::Tensor& Y,
                               const torch::Tensor& idx32, const torch::Tensor& idx64, int64_t d) {
    ctx->save_for_backward({val, Y, idx64});
    return left_project(SparseProjector::view(idx32, val, d), Y);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &val = saved[0], &Y = saved[1], &idx64 = saved[2];
    const torch::Tensor gO = grads[0].contiguous();
    const bool want_val = ctx->needs_input_grad(0), want_y = ctx->needs_input_grad(1);
    torch::Tensor gval, gY;
    if (want_val) gval = torch::empty_like(val);
    if (want_y) gY = torch::empty_like(Y);
    const int64_t n = Y.size(0), k = Y.size(1), r = idx64.size(1);
    // rows of dOut gathered per (i, s): [rows, r, k], in chunks of at most 4M floats
    const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, r * k));
    for (int64_t b = 0; b < n; b += chunk) {
      const int64_t e = std::min(n, b + chunk);
      const torch::Tensor rows = gO.index_select(0, idx64.slice(0, b, e).reshape(-1)).view({e - b, r, k});
      if (want_val) gval.slice(0, b, e).copy_(torch::bmm(rows, Y.slice(0, b, e).unsqueeze(2)).squeeze(2));
      if (want_y) gY.slice(0, b, e).copy_(torch::bmm(val.slice(0, b, e).unsqueeze(1), rows).squeeze(1));
    }
    return {gval, gY, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};
torch::Tensor ad_left(const torch::Tensor& idx32, const torch::Tensor& idx64, const torch::Tensor& val, int64_t d,
                      const torch::Tensor& Y) {
  return LeftProjectFn::apply(val, Y, idx32, idx64, d);
}

// Flat positions of A = P_a^T P_b ([da, db]) contributed by each row's r_a x r_b outer product.
torch::Tensor gram_positions(const torch::Tensor& ia, const torch::Tensor& ib, int64_t db) {
  return (ia.to(torch::kLong).unsqueeze(2) * db + ib.to(torch::kLong).unsqueeze(1)).flatten();
}
torch::Tensor gram(const torch::Tensor& pos, const torch::Tensor& va, const torch::Tensor& vb, int64_t da, int64_t db) {
  torch::Tensor prod = (va.unsqueeze(2) * vb.unsqueeze(1)).flatten();
  return torch::zeros({da * db}, prod.options()).index_add(0, pos, prod).view({da, db});
}

struct Prepared {
  torch::Tensor Gt;       // G^T [n, m] fp32 (dense sample), or
  torch::Tensor Xt, dYt;  // X^T [m, tokens], dY^T [n, tokens] fp32 (activation sample)
  double g2 = 0;          // ||G||_F^2
};

void check_sample_shapes(const SparseProjector& P, const SparseProjector& Q, const GradSample& s, const char* fn) {
  if (s.G.defined()) {
    LSPO_CHECK(s.G.dim() == 2 && s.G.size(0) == P.n() && s.G.size(1) == Q.n(), fn, ": gradient sample has sizes ",
               s.G.sizes(), " but P, Q need [", P.n(), ", ", Q.n(), "]");
    LSPO_CHECK(s.G.device() == P.indices.device(), fn, ": gradient sample on ", s.G.device(), " but projectors on ",
               P.indices.device());
    LSPO_CHECK(s.G.is_floating_point(), fn, ": gradient sample must be a floating tensor");
  } else {
    LSPO_CHECK(s.X.defined() && s.dY.defined(), fn, ": sample has neither G nor (X, dY)");
    LSPO_CHECK(s.X.dim() == 2 && s.dY.dim() == 2 && s.X.size(0) == s.dY.size(0), fn, ": X ", s.X.sizes(), " and dY ",
               s.dY.sizes(), " must be [tokens, m] and [tokens, n]");
    LSPO_CHECK(s.X.size(1) == P.n() && s.dY.size(1) == Q.n(), fn, ": X ", s.X.sizes(), " / dY ", s.dY.sizes(),
               " do not match P (n = ", P.n(), ") and Q (n = ", Q.n(), ")");
    LSPO_CHECK(s.X.device() == P.indices.device() && s.dY.device() == P.indices.device(), fn,
               ": sample tensors must be on the projectors' device ", P.indices.device());
    LSPO_CHECK(s.X.is_floating_point() && s.dY.is_floating_point(), fn, ": X and dY must be floating tensors");
  }
}

Prepared prepare(const GradSample& s) {
  Prepared p;
  if (s.G.defined()) {
    torch::Tensor G = s.G.to(torch::kFloat32);
    p.Gt = G.t().contiguous();
    p.g2 = G.to(torch::kFloat64).square().sum().item<double>();
  } else {
    torch::Tensor X = s.X.to(torch::kFloat32), dY = s.dY.to(torch::kFloat32);
    p.Xt = X.t().contiguous();
    p.dYt = dY.t().contiguous();
    // ||X^T dY||^2 = <X X^T, dY dY^T>: cheaper than forming G when tokens * (m + n) < m * n.
    const int64_t t = X.size(0), m = X.size(1), n = dY.size(1);
    torch::Tensor Xd = X.to(torch::kFloat64), Gd = dY.to(torch::kFloat64);
    p.g2 = (t * (m + n) < m * n) ? (Xd.mm(Xd.t()) * Gd.mm(Gd.t())).sum().item<double>()
                                 : Xd.t().mm(Gd).square().sum().item<double>();
  }
  LSPO_CHECK(std::isfinite(p.g2), "fit: gradient sample contains NaN or Inf");
  return p;
}

// Cholesky factor of a Gram matrix (fp64, differentiable). A square or nearly square projector
// (d close to n) has a Gram matrix with condition numbers of 1e6 and more, so the Gram matrices are
// formed in fp64 (gram64); a ridge of 1e-10 x mean(diag) guards a column that all its values left,
// and when that still fails (an exactly singular Gram), the ridge grows 100x at a time up to 1e-4 x
// mean(diag) (the basis then drops the near-null directions) before a named error.
torch::Tensor chol(const torch::Tensor& A) {
  const int64_t d = A.size(0);
  const double mean_diag = std::max(A.diagonal().sum().item<double>() / static_cast<double>(d), 1e-30);
  const torch::Tensor I = torch::eye(d, A.options());
  for (double rel = 1e-10; rel <= 1.01e-4; rel *= 100) {
    auto [L, info] = torch::linalg_cholesky_ex(A + (rel * mean_diag) * I);
    if (info.item<int64_t>() == 0) return L;
  }
  LSPO_CHECK(false, "projector whitening: the Gram matrix P^T P (", d, " x ", d,
             ") is singular even with a ridge of 1e-4 x its mean diagonal (the projector's columns are linearly "
             "dependent: too few nonzeros for d, or values driven to zero)");
  return {};
}

// P_a^T P_b in fp64 (see chol).
torch::Tensor gram64(const torch::Tensor& pos, const torch::Tensor& va, const torch::Tensor& vb, int64_t da,
                     int64_t db) {
  return gram(pos, va.to(torch::kFloat64), vb.to(torch::kFloat64), da, db);
}

// P_a^T P_b of two projectors with shared positions (dense, lspo::SparseProjector::dense_basis): one
// GEMM of the values (differentiable) instead of the n r^2 Gram positions.
torch::Tensor dense_gram64(const torch::Tensor& va, const torch::Tensor& vb) {
  return va.to(torch::kFloat64).t().mm(vb.to(torch::kFloat64));
}

// The pieces of the closed-form error that depend only on the projectors: the Gram matrices
// (unwhitened) or their Cholesky factors (whitened).
// An identity side (SparseProjector::is_identity) has no Gram matrix or factor (undefined: I); a side
// with shared positions has no Gram positions (undefined pos: dense_gram64).
struct Basis {
  torch::Tensor A, B;  // fp64 [dP, dP], [dQ, dQ]: P^T P, Q^T Q, or their Cholesky factors L_P, L_Q
  bool whitened = false;
};
Basis basis(const torch::Tensor& posP, const torch::Tensor& pv, int64_t dP, bool idP, const torch::Tensor& posQ,
            const torch::Tensor& qv, int64_t dQ, bool idQ, bool whitened) {
  Basis b;
  if (!idP) b.A = posP.defined() ? gram64(posP, pv, pv, dP, dP) : dense_gram64(pv, pv);
  if (!idQ) b.B = posQ.defined() ? gram64(posQ, qv, qv, dQ, dQ) : dense_gram64(qv, qv);
  b.whitened = whitened;
  if (whitened) {
    if (!idP) b.A = chol(b.A);
    if (!idQ) b.B = chol(b.B);
  }
  return b;
}

// e for one sample in closed form (fp64 after the O(r size(G)) projections); differentiable.
// (An identity side: its product is skipped, its Basis factor is undefined.)
torch::Tensor sample_error(const Prepared& s, const torch::Tensor& pi32, const torch::Tensor& pi, const torch::Tensor& pv,
                           int64_t dP, bool idP, const torch::Tensor& qi32, const torch::Tensor& qi,
                           const torch::Tensor& qv, int64_t dQ, bool idQ, const Basis& b) {
  if (s.g2 == 0) return torch::zeros({}, pv.options().dtype(torch::kFloat64));
  torch::Tensor S;
  if (s.Gt.defined()) {
    // (Q^T G^T)^T = G Q  [m, dQ]
    torch::Tensor GQ = idQ ? s.Gt.t().contiguous() : ad_left(qi32, qi, qv, dQ, s.Gt).t().contiguous();
    S = idP ? GQ : ad_left(pi32, pi, pv, dP, GQ);  // [dP, dQ]
  } else {
    const torch::Tensor A = idP ? s.Xt : ad_left(pi32, pi, pv, dP, s.Xt);     // P^T X^T
    const torch::Tensor B = idQ ? s.dYt : ad_left(qi32, qi, qv, dQ, s.dYt);  // Q^T dY^T
    S = A.mm(B.t());
  }
  S = S.to(torch::kFloat64);
  torch::Tensor e2;
  if (b.whitened) {  // ||U^T G V||^2 with U = P L_P^-T, V = Q L_Q^-T: ||L_P^-1 S L_Q^-T||^2
    const torch::Tensor Y = b.A.defined() ? torch::linalg_solve_triangular(b.A, S, /*upper=*/false) : S;
    const torch::Tensor Zt = b.B.defined() ? torch::linalg_solve_triangular(b.B, Y.t(), /*upper=*/false) : Y;
    e2 = 1.0 - Zt.square().sum() / s.g2;
  } else {
    const torch::Tensor AS = b.A.defined() ? b.A.mm(S) : S, SB = b.B.defined() ? S.mm(b.B) : S;
    e2 = 1.0 + ((AS * SB).sum() - 2.0 * S.square().sum()) / s.g2;
  }
  return torch::sqrt(torch::clamp_min(e2, 0.0) + 1e-30);
}

std::vector<GradSample> wrap_dense(const std::vector<torch::Tensor>& grads) {
  std::vector<GradSample> v;
  v.reserve(grads.size());
  for (const auto& g : grads) v.push_back(GradSample::dense(g));
  return v;
}

std::vector<Prepared> prepare_all(const SparseProjector& P, const SparseProjector& Q,
                                  const std::vector<GradSample>& samples, const char* fn) {
  torch::NoGradGuard ng;
  std::vector<Prepared> prep;
  for (const auto& s : samples) {
    check_sample_shapes(P, Q, s, fn);
    prep.push_back(prepare(s));
  }
  return prep;
}

// What one fit needs besides the values: long indices and Gram positions of both projectors.
struct FitCtx {
  const SparseProjector& P;
  const SparseProjector& Q;
  torch::Tensor pi, qi, posP, posQ;
  bool idP, idQ;  // a side kept whole (identity): not learned, no Gram matrix
  bool whitened;
  FitCtx(const SparseProjector& P_, const SparseProjector& Q_)
      : P(P_), Q(Q_), pi(P_.indices.to(torch::kLong)), qi(Q_.indices.to(torch::kLong)),
        idP(P_.is_identity()), idQ(Q_.is_identity()), whitened(P_.whitened() || Q_.whitened()) {
    if (!idP && !P_.shared_positions()) posP = gram_positions(P_.indices, P_.indices, P_.d);
    if (!idQ && !Q_.shared_positions()) posQ = gram_positions(Q_.indices, Q_.indices, Q_.d);
  }
  torch::Tensor mean_error(const std::vector<Prepared>& prep, const torch::Tensor& pv, const torch::Tensor& qv) const {
    const Basis b = basis(posP, pv, P.d, idP, posQ, qv, Q.d, idQ, whitened);
    torch::Tensor total = torch::zeros({}, pv.options().dtype(torch::kFloat64));
    for (const auto& s : prep)
      total = total + sample_error(s, P.indices, pi, pv, P.d, idP, Q.indices, qi, qv, Q.d, idQ, b);
    return total / static_cast<double>(prep.size());
  }
};

void check_fit_pair(const SparseProjector& P, const SparseProjector& Q, const char* fn) {
  P.validate();
  Q.validate();
  LSPO_CHECK(P.indices.device() == Q.indices.device(), fn, ": P and Q are on different devices");
  const bool idP = P.is_identity(), idQ = Q.is_identity();
  LSPO_CHECK(!(idP && idQ), fn, ": both projectors are identities (nothing is projected)");
  LSPO_CHECK(idP || idQ || P.whitened() == Q.whitened(), fn, ": P and Q must both be whitened or both not (P ",
             P.whitened() ? "is" : "is not", ", Q ", Q.whitened() ? "is" : "is not", ")");
}

}  // namespace

namespace detail {

double closed_form_error(const SparseProjector& P, const SparseProjector& Q, const std::vector<GradSample>& samples) {
  LSPO_CHECK(!samples.empty(), "closed_form_error: no gradient samples");
  check_fit_pair(P, Q, "closed_form_error");
  const std::vector<Prepared> prep = prepare_all(P, Q, samples, "closed_form_error");
  torch::NoGradGuard ng;
  return FitCtx(P, Q).mean_error(prep, P.values, Q.values).item<double>();
}

HeldoutFit fit_heldout(SparseProjector& P, SparseProjector& Q, const std::vector<GradSample>& samples,
                       const std::vector<GradSample>& heldout, const FitOptions& opt, int64_t eval_every,
                       int64_t patience) {
  LSPO_CHECK(!samples.empty(), "fit: no gradient samples");
  LSPO_CHECK(opt.lr > 0 && opt.max_iters >= 0 && opt.l2 >= 0, "fit: need lr > 0, max_iters >= 0, l2 >= 0");
  LSPO_CHECK(eval_every >= 1, "fit: eval_every must be >= 1");
  check_fit_pair(P, Q, "fit");
  const std::vector<Prepared> prep = prepare_all(P, Q, samples, "fit");
  const std::vector<Prepared> held = prepare_all(P, Q, heldout, "fit (held-out)");
  const FitCtx ctx(P, Q);
  // Adam runs on w = values / RMS(values at the start): its lr is relative to the values' scale.
  const double sp = std::max(P.values.square().mean().sqrt().item<double>(), 1e-30);
  const double sq = std::max(Q.values.square().mean().sqrt().item<double>(), 1e-30);
  // the learning uses autograd whatever the caller's mode (optimizers call fit under no_grad)
  torch::AutoGradMode grad_on(true);
  const torch::Tensor wp0 = P.values.detach() / sp, wq0 = Q.values.detach() / sq;
  // an identity side (a dimension kept whole) is not learned
  torch::Tensor wp = wp0.clone().requires_grad_(!ctx.idP), wq = wq0.clone().requires_grad_(!ctx.idQ);
  std::vector<torch::Tensor> learned;
  if (!ctx.idP) learned.push_back(wp);
  if (!ctx.idQ) learned.push_back(wq);
  torch::optim::Adam adam(learned, torch::optim::AdamOptions(opt.lr));

  HeldoutFit out;
  FitResult& res = out.fit;
  auto held_error = [&](const torch::Tensor& pv, const torch::Tensor& qv) {
    torch::NoGradGuard ng;
    return ctx.mean_error(held, pv, qv).item<double>();
  };
  double best = std::numeric_limits<double>::infinity(), best_fit = best;
  int64_t since_best = 0;
  torch::Tensor best_p = P.values.detach().clone(), best_q = Q.values.detach().clone();
  for (int64_t it = 0;; ++it) {
    adam.zero_grad();
    const torch::Tensor pv = wp * sp, qv = wq * sq;
    torch::Tensor e = ctx.mean_error(prep, pv, qv);
    const double ev = e.item<double>();
    const bool last = ev <= opt.target_error || it >= opt.max_iters;
    if (it == 0) res.error_before = ev;
    // the kept iterate: lowest training e, or lowest held-out e at the evaluation points
    double score = ev;
    bool scored = true;
    if (!held.empty()) {
      scored = it % eval_every == 0 || last;
      if (scored) {
        score = held_error(pv.detach(), qv.detach());
        if (it == 0) out.heldout_before = score;
      }
    }
    bool stale = false;
    if (scored && score < best) {
      best = score;
      best_fit = ev;
      best_p = pv.detach().clone();
      best_q = qv.detach().clone();
      since_best = 0;
    } else if (scored && !held.empty()) {
      stale = patience > 0 && ++since_best >= patience;
    }
    if (last || stale) break;
    torch::Tensor loss = e;
    if (opt.l2 > 0) {
      loss = ctx.whitened ? loss + opt.l2 * ((wp - wp0).square().mean() + (wq - wq0).square().mean())
                          : loss + opt.l2 * (pv.norm() + qv.norm());
    }
    loss.backward();
    adam.step();
    res.iters = it + 1;
  }
  {
    torch::NoGradGuard ng;
    P.values.copy_(best_p);
    Q.values.copy_(best_q);
    if (P.whitened()) P.whiten_();
    if (Q.whitened()) Q.whiten_();
  }
  res.error_after = best_fit;
  out.heldout_after = held.empty() ? best_fit : best;
  if (held.empty()) out.heldout_before = res.error_before;
  return out;
}

}  // namespace detail

double relative_error(const SparseProjector& P, const SparseProjector& Q, const std::vector<GradSample>& samples) {
  LSPO_CHECK(!samples.empty(), "relative_error: no gradient samples");
  double total = 0;
  for (const auto& s : samples) {
    check_sample_shapes(P, Q, s, "relative_error");
    torch::Tensor G = s.G.defined() ? s.G.to(torch::kFloat32)
                                    : s.X.to(torch::kFloat32).t().mm(s.dY.to(torch::kFloat32));
    const double gn = G.norm().item<double>();
    LSPO_CHECK(std::isfinite(gn), "relative_error: gradient sample contains NaN or Inf");
    if (gn == 0) continue;  // e of a zero gradient is taken as 0
    torch::Tensor R = decompress(P, Q, compress(P, Q, G));
    total += (R - G).norm().item<double>() / gn;
  }
  return total / static_cast<double>(samples.size());
}

double relative_error(const SparseProjector& P, const SparseProjector& Q, const std::vector<torch::Tensor>& grads) {
  return relative_error(P, Q, wrap_dense(grads));
}

FitResult fit(SparseProjector& P, SparseProjector& Q, const std::vector<GradSample>& samples, const FitOptions& opt) {
  return detail::fit_heldout(P, Q, samples, {}, opt, 1).fit;
}

FitResult fit(SparseProjector& P, SparseProjector& Q, const std::vector<torch::Tensor>& grads, const FitOptions& opt) {
  return fit(P, Q, wrap_dense(grads), opt);
}

bool should_refit(const SparseProjector& P, const SparseProjector& Q, const std::vector<GradSample>& samples,
                  double alpha) {
  return relative_error(P, Q, samples) > alpha;
}
bool should_refit(const SparseProjector& P, const SparseProjector& Q, const std::vector<torch::Tensor>& grads,
                  double alpha) {
  return relative_error(P, Q, grads) > alpha;
}

torch::Tensor cross_gram(const SparseProjector& P_new, const SparseProjector& P_old) {
  P_new.validate();
  P_old.validate();
  LSPO_CHECK(P_new.n() == P_old.n(), "cross_gram: projectors of different dimensions (n = ", P_new.n(), " and ",
             P_old.n(), ")");
  LSPO_CHECK(P_new.indices.device() == P_old.indices.device(), "cross_gram: projectors on different devices");
  torch::NoGradGuard ng;
  torch::Tensor C =
      P_new.shared_positions() && P_old.shared_positions()
          ? P_new.values.t().mm(P_old.values)
          : gram(gram_positions(P_new.indices, P_old.indices, P_old.d), P_new.values, P_old.values, P_new.d, P_old.d);
  if (P_new.whitened()) C = P_new.whiten.t().mm(C);
  if (P_old.whitened()) C = C.mm(P_old.whiten);
  return C;
}

torch::Tensor whitening_factor(const SparseProjector& P) {
  LSPO_CHECK(P.values.defined() && P.indices.defined() && P.values.sizes() == P.indices.sizes() && P.d >= 1,
             "whitening_factor: malformed projector");
  torch::NoGradGuard ng;
  const torch::Tensor A = P.shared_positions() ? dense_gram64(P.values, P.values)
                                               : gram64(gram_positions(P.indices, P.indices, P.d), P.values, P.values,
                                                        P.d, P.d);
  LSPO_CHECK(torch::isfinite(A).all().item<bool>(), "whitening_factor: projector values contain NaN or Inf");
  const torch::Tensor L = chol(A);
  const torch::Tensor Linv = torch::linalg_solve_triangular(L, torch::eye(P.d, L.options()), /*upper=*/false);
  return Linv.t().to(torch::kFloat32).contiguous();  // T = L^-T, upper triangular
}

void carry_state(const SparseProjector& P_old, const SparseProjector& Q_old, const SparseProjector& P_new,
                 const SparseProjector& Q_new, torch::Tensor& M, torch::Tensor& V) {
  // a side that is the identity before and after maps by I: skipped (no n x n cross Gram)
  const bool keepP = P_new.is_identity() && P_old.is_identity() && P_new.n() == P_old.n();
  const bool keepQ = Q_new.is_identity() && Q_old.is_identity() && Q_new.n() == Q_old.n();
  const torch::Tensor CP = keepP ? torch::Tensor() : cross_gram(P_new, P_old);  // [dPn, dPo]
  const torch::Tensor CQ = keepQ ? torch::Tensor() : cross_gram(Q_new, Q_old);  // [dQn, dQo]
  const torch::Device dev = P_new.values.device();
  for (torch::Tensor* T : {&M, &V}) {
    const char* name = T == &M ? "M" : "V";
    LSPO_CHECK(T->defined() && T->dim() == 2 && T->size(0) == P_old.d && T->size(1) == Q_old.d,
               "carry_state: state '", name, "' must have sizes [", P_old.d, ", ", Q_old.d, "], got ",
               T->defined() ? T->sizes() : torch::IntArrayRef{});
    LSPO_CHECK(T->scalar_type() == torch::kFloat32, "carry_state: state '", name, "' must be float32");
    LSPO_CHECK(T->device() == dev, "carry_state: state '", name, "' is on ", T->device(),
               " but the projectors are on ", dev);
  }
  torch::NoGradGuard ng;
  auto map = [&](const torch::Tensor& X, bool square) {
    torch::Tensor Y = X;
    if (!keepP) Y = (square ? CP.square() : CP).mm(Y);
    if (!keepQ) Y = Y.mm((square ? CQ.square() : CQ).t());
    return Y;
  };
  torch::Tensor Mn = map(M, false), Vn = map(V, true);
  if (Mn.sizes() == M.sizes()) {
    M.copy_(Mn);
    V.copy_(Vn);
  } else {
    M = Mn;
    V = Vn;
  }
}

}  // namespace lspo
