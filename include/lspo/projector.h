// lspo/projector.h -- learned (d, r)-sparse projectors (LSP-Offload).
//
// A SparseProjector for a dimension of size n is an n x d matrix with exactly r nonzeros in every
// row, stored in ELL layout: indices int32 [n, r] (column positions in [0, d), distinct within a
// row), values float32 [n, r]. Only the values are learned. Plain tensors inside, so a projector
// serialises with torch.save and loads with torch.load(weights_only=True).
//
// Conventions: a weight gradient G has shape [m, n]; P is the projector of its rows (size m),
// Q of its columns (size n). The compressed gradient is S = P^T G Q  ([dP, dQ]).
// For a linear map whose gradient is G = X^T dY (X: [tokens, m], dY: [tokens, n]),
// S = (P^T X^T)(dY Q) = A B -- computed without ever forming the m x n gradient.
// (For torch.nn.Linear, weight [out, in], G = dY^T X: pass (dY, X) as (X, dY).)
//
// Whitening (optional): a projector may carry `whiten`, the d x d upper-triangular factor T = L^-T of
// its Gram matrix P^T P = L L^T (computed by whiten_() from the current values). A whitened projector
// stands for U = P T, whose columns are orthonormal (U^T U = I): every operation below then works
// with U instead of P (T is applied to the d x d / d x k results; the ELL kernels stay sparse), so
// P P^T G Q Q^T is a true projection (e <= 1), carry_state is the identity for an unchanged pair and
// the size of an update P u Q^T equals the size of u. T is a function of the values: call whiten_()
// again after changing them (fit() and refit() do).
//
// Indices are contiguous, except for dense_basis's shared positions (one row, expanded).
//
// Every operation takes fp32 or bf16 inputs, accumulates in fp32, works on CPU and CUDA tensors
// (CUDA on the current PyTorch stream), and checks its inputs with named error messages.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lspo/common.h"

namespace lspo {

enum class ProjectorInit { kGaussian, kRademacher };

// How a refit check chooses a projected side's basis (RefitOptions::basis, LSPAdamW's `basis`):
//   kSparse  learned (d, r)-sparse values (lspo::fit, Adam on the closed-form error);
//   kSvd     the leading singular directions of the check's fit gradients (top_singular_basis),
//            restricted to the projector's positions: exact for a dense projector (r = d), which is
//            how LSPAdamW(basis="svd") builds its projected sides. No iterations.
enum class ProjectorBasis { kSparse, kSvd };

struct SparseProjector {
  torch::Tensor indices;  // int32 [n, r]
  torch::Tensor values;   // float32 [n, r]
  torch::Tensor whiten;   // float32 [d, d] upper triangular T (U = P T), or undefined (U = P)

  int64_t n() const { return indices.size(0); }
  int64_t r() const { return indices.size(1); }
  int64_t d = 0;

  // Random positions (no duplicates in a row) from `seed`, every column used at least once (row t's
  // first position walks a random permutation of [0, d)); values N(0, s^2) or +-s with the
  // scale-correct s = sqrt(d / (n r)), so that E[P^T P] = I. whitened: also computes `whiten`.
  static SparseProjector random(int64_t n, int64_t d, int64_t r, uint64_t seed,
                                torch::Device device = torch::kCPU,
                                ProjectorInit init = ProjectorInit::kGaussian, bool whitened = false);
  // A dense projector (r = d) with shared positions: `indices` is the row 0, 1, ..., d-1 expanded to
  // [n, d] (row stride 0), so the positions cost d int32 instead of n d (the optimizer state counts
  // 4 bytes per basis entry, as for a plain dense matrix); values a random orthonormal basis (fp64
  // QR of a Gaussian [n, d] matrix from `seed`, U^T U = I), not whitened: an orthonormal basis needs
  // no factor. Every operation on it runs on ATen GEMMs. LSPAdamW(basis="svd") builds its projected
  // sides this way.
  static SparseProjector dense_basis(int64_t n, int64_t d, uint64_t seed, torch::Device device = torch::kCPU);
  // Positions shared by every row (dense_basis's layout: r = d, indices row stride 0)? O(1).
  bool shared_positions() const;
  // The identity of a dimension kept whole (LSPAdamW's one_sided layout): d = n, r = 1, positions
  // 0..n-1, values 1, not whitened (it is orthonormal as it is). fit() does not learn it, carry_state
  // and the closed-form error skip it, so no n x n matrix is ever formed for it.
  static SparseProjector identity(int64_t n, torch::Device device = torch::kCPU);
  // Exactly such an identity? (one host check of positions and values; synchronises for CUDA)
  bool is_identity() const;
  // New random values (same positions, same init law) from `seed`; keeps whitening on if it was on.
  // (Shared positions: a new random orthonormal basis, as dense_basis.)
  void reinit_values_(uint64_t seed, ProjectorInit init = ProjectorInit::kGaussian);
  // values[i, j] = B[i, indices[i, j]] for a dense basis B [n, d] (any float dtype and device): P
  // becomes B restricted to P's positions (B itself for a dense projector, r = d); recomputes
  // `whiten` if whitened.
  void assign_dense_(const torch::Tensor& B);
  // (Re)computes `whiten` from the current values (fp64 Cholesky of P^T P + 1e-10 tr/d I).
  void whiten_();
  bool whitened() const { return whiten.defined(); }
  // A deep copy (values and whiten cloned; indices shared: they never change).
  SparseProjector clone() const;
  // Wraps existing tensors after validating them.
  static SparseProjector from_tensors(torch::Tensor indices, torch::Tensor values, int64_t d);
  // Wraps existing tensors without the full (host-syncing) validation: every operation still checks
  // shapes, dtypes and devices. `whiten` undefined: not whitened. (The bindings' per-call path.)
  static SparseProjector view(torch::Tensor indices, torch::Tensor values, int64_t d,
                              torch::Tensor whiten = torch::Tensor());
  SparseProjector to(torch::Device device) const;
  torch::Tensor dense(torch::ScalarType dtype = torch::kFloat32) const;  // [n, d]: P, or U = P T if whitened
  void validate() const;
};

// Which kernel family a CUDA operation uses.
enum class ProjectorBackend { kAuto, kGather, kCuSparse };
void set_projector_backend(ProjectorBackend b);
ProjectorBackend projector_backend();

// X P for X [k, n] (any float dtype) -> [k, d] fp32.       (sparse on the right)
torch::Tensor right_project(const torch::Tensor& X, const SparseProjector& P);
// P^T Y for Y [n, k] -> [d, k] fp32.
torch::Tensor left_project(const SparseProjector& P, const torch::Tensor& Y);

// S = P^T G Q, G [m, n] -> [dP, dQ] fp32.
torch::Tensor compress(const SparseProjector& P, const SparseProjector& Q, const torch::Tensor& G);
// Halves of compress_activations: A = P^T X^T  ([dP, tokens]), B = dY Q  ([tokens, dQ]).
torch::Tensor project_input(const SparseProjector& P, const torch::Tensor& X);
torch::Tensor project_grad_output(const SparseProjector& Q, const torch::Tensor& dY);
// S = (P^T X^T)(dY Q) for X [tokens, m], dY [tokens, n] -> [dP, dQ] fp32.
torch::Tensor compress_activations(const SparseProjector& P, const SparseProjector& Q,
                                   const torch::Tensor& X, const torch::Tensor& dY);
// P Delta Q^T, Delta [dP, dQ] -> [m, n] fp32.
torch::Tensor decompress(const SparseProjector& P, const SparseProjector& Q, const torch::Tensor& Delta);
// W += alpha * P Delta Q^T in place, in W's dtype (fp32 or bf16), with no fp32 m x n temporary.
void apply_(torch::Tensor& W, const SparseProjector& P, const SparseProjector& Q,
            const torch::Tensor& Delta, double alpha);

// A gradient sample of one layer: its weight gradient G = X^T dY given either densely (G [m, n]) or
// as the activation pair (X [tokens, m], dY [tokens, n]) it comes from. fit() on pairs never forms G
// (it uses X P and dY Q); relative_error on pairs forms G once per sample.
struct GradSample {
  torch::Tensor G;       // [m, n], or undefined
  torch::Tensor X, dY;   // [tokens, m], [tokens, n], used when G is undefined
  static GradSample dense(torch::Tensor G) { return {std::move(G), {}, {}}; }
  static GradSample activations(torch::Tensor X, torch::Tensor dY) { return {{}, std::move(X), std::move(dY)}; }
};

// The k leading singular directions of one side of the samples' gradients, stacked along the other
// side: the top-k eigenvectors of sum_i G_i G_i^T (left: rows, [m, k]) or sum_i G_i^T G_i (right:
// columns, [n, k]), computed in fp64 (eigh), returned fp32 on the samples' device, largest first.
// The orthonormal basis that minimises sum_i ||G_i - B B^T G_i||^2 (left) over k-dimensional bases.
// Past the numerical rank (squared singular values <= 1e-10 of the largest, the rounding level of
// fp32 gradients), the basis is completed deterministically (QR of the significant directions and a
// Gaussian fixed by (size, k)), so that rounding, e.g. another accumulation order, moves the basis
// only by rounding. Needs 1 <= k <= the side's size.
torch::Tensor top_singular_basis(const std::vector<GradSample>& samples, bool left, int64_t k);

// Relative estimation error e = ||P P^T G Q Q^T - G||_F / ||G||_F (mean over samples).
double relative_error(const SparseProjector& P, const SparseProjector& Q,
                      const std::vector<torch::Tensor>& grads);
double relative_error(const SparseProjector& P, const SparseProjector& Q,
                      const std::vector<GradSample>& samples);

struct FitOptions {
  double lr = 0.05;            // Adam on the projector values, relative to their RMS at the start
  int64_t max_iters = 100;
  double target_error = 0.0;   // stop once e <= target
  double l2 = 0.0;             // unwhitened: beta * (||P||_F + ||Q||_F) (the paper's term);
                               // whitened (scale-free objective): l2 * mean((w - w0)^2) over both
                               // projectors, w = values / RMS(start values): a proximal term that keeps
                               // a fit near its start (a warm start near the previous projectors)
};
struct FitResult {
  double error_before = 0, error_after = 0;  // mean e over the samples (error_after: the values kept)
  int64_t iters = 0;                         // Adam steps taken
};
// Learns P's and Q's values (positions fixed) to minimise the mean e over the samples with Adam
// (LibTorch autograd). Writes the best values seen into P.values / Q.values in place, so
// error_after <= error_before (and recomputes `whiten` of a whitened projector). e is evaluated in
// closed form, S = P^T G Q:
//   unwhitened  e^2 = 1 + (<P^T P S, S Q^T Q> - 2 ||S||^2) / ||G||^2,
//   whitened    e^2 = 1 - ||L_P^-1 S L_Q^-T||^2 / ||G||^2   (L: Cholesky factors of the Gram matrices),
// so that one iteration costs O(r * size(G) + d^3), never an m x n reconstruction. Both projectors
// must be whitened or both not. Works on CPU and CUDA tensors (the projectors' device).
FitResult fit(SparseProjector& P, SparseProjector& Q, const std::vector<torch::Tensor>& grads,
              const FitOptions& opt = {});
FitResult fit(SparseProjector& P, SparseProjector& Q, const std::vector<GradSample>& samples,
              const FitOptions& opt = {});
// e > alpha on these samples?
bool should_refit(const SparseProjector& P, const SparseProjector& Q,
                  const std::vector<torch::Tensor>& grads, double alpha);
bool should_refit(const SparseProjector& P, const SparseProjector& Q,
                  const std::vector<GradSample>& samples, double alpha);

// Optimizer state carried into a new subspace (M and V, [dP_old, dQ_old] fp32 -> [dP_new, dQ_new];
// written in place when the sizes agree, else the tensors are replaced):
//   M <- P_new^T P_old M Q_old^T Q_new,   V <- (P_new^T P_old)^2 V (Q_old^T Q_new)^2  (elementwise squares)
void carry_state(const SparseProjector& P_old, const SparseProjector& Q_old,
                 const SparseProjector& P_new, const SparseProjector& Q_new,
                 torch::Tensor& M, torch::Tensor& V);
// The maps of carry_state: P_new^T P_old  [dP_new, dP_old] fp32 (O(n r^2), sparse); with whitening
// U_new^T U_old = T_new^T P_new^T P_old T_old.
torch::Tensor cross_gram(const SparseProjector& P_new, const SparseProjector& P_old);
// The whitening factor T = L^-T (P^T P = L L^T) of P's current values  [d, d] fp32, upper triangular.
torch::Tensor whitening_factor(const SparseProjector& P);

}  // namespace lspo
