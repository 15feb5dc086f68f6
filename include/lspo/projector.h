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

struct SparseProjector {
  torch::Tensor indices;  // int32 [n, r]
  torch::Tensor values;   // float32 [n, r]

  int64_t n() const { return indices.size(0); }
  int64_t r() const { return indices.size(1); }
  int64_t d = 0;

  // Random positions (no duplicates in a row) from `seed`; values N(0, 1/sqrt(r)) or +-1/sqrt(r).
  static SparseProjector random(int64_t n, int64_t d, int64_t r, uint64_t seed,
                                torch::Device device = torch::kCPU,
                                ProjectorInit init = ProjectorInit::kGaussian);
  // Wraps existing tensors after validating them.
  static SparseProjector from_tensors(torch::Tensor indices, torch::Tensor values, int64_t d);
  SparseProjector to(torch::Device device) const;
  torch::Tensor dense(torch::ScalarType dtype = torch::kFloat32) const;  // [n, d]
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

// Relative estimation error e = ||P P^T G Q Q^T - G||_F / ||G||_F (mean over samples).
double relative_error(const SparseProjector& P, const SparseProjector& Q,
                      const std::vector<torch::Tensor>& grads);
double relative_error(const SparseProjector& P, const SparseProjector& Q,
                      const std::vector<GradSample>& samples);

struct FitOptions {
  double lr = 0.05;            // Adam on the projector values
  int64_t max_iters = 100;
  double target_error = 0.0;   // stop once e <= target
  double l2 = 0.0;             // beta * (||P||_F + ||Q||_F)
};
struct FitResult {
  double error_before = 0, error_after = 0;  // mean e over the samples (error_after: the values kept)
  int64_t iters = 0;                         // Adam steps taken
};
// Learns P's and Q's values (positions fixed) to minimise the mean e over the samples with Adam
// (LibTorch autograd). Writes the best values seen into P.values / Q.values in place, so
// error_after <= error_before. e is evaluated in closed form,
//   e^2 = 1 + (<P^T P S, S Q^T Q> - 2 ||S||^2) / ||G||^2,  S = P^T G Q,
// so that one iteration costs O(r * size(G) + d^3), never an m x n reconstruction.
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
// The maps of carry_state: P_new^T P_old  [dP_new, dP_old] fp32 (O(n r^2), sparse).
torch::Tensor cross_gram(const SparseProjector& P_new, const SparseProjector& P_old);

}  // namespace lspo
