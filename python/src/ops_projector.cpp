// The projector operations (include/lspo/projector.h) as PyTorch dispatcher
// operators in the namespace `lspo`: torch.ops.lspo.right_project, ... They
// show by name in torch.profiler, and torch.compile traces them as opaque nodes
// (their fake/meta implementations, which only compute output shapes, are
// registered in python/lspo/projector.py with torch.library.register_fake).
//
// A projector crosses the boundary as (indices int32 [n, r], values fp32 [n,
// r], int d, whiten fp32 [d, d] or None): a whitened projector stands for U = P
// T (include/lspo/projector.h). Kernels: the same lspo functions for CPU and
// CUDA tensors (they dispatch on the device and check every argument with named
// lspo::Error messages). The operators have no autograd formula: lspo's layers
// call them from inside a torch.autograd.Function (python/lspo/wrap.py).
#include <torch/library.h>

#include <optional>

#include "lspo/projector.h"

namespace {

using lspo::SparseProjector;
using torch::Tensor;

SparseProjector proj(const Tensor& indices, const Tensor& values, int64_t d, const std::optional<Tensor>& whiten) {
  return SparseProjector::view(indices, values, d, whiten.value_or(Tensor()));
}

Tensor right_project(const Tensor& X, const Tensor& Pi, const Tensor& Pv, int64_t Pd, const std::optional<Tensor>& Pw) {
  return lspo::right_project(X, proj(Pi, Pv, Pd, Pw));
}
Tensor left_project(const Tensor& Pi, const Tensor& Pv, int64_t Pd, const std::optional<Tensor>& Pw, const Tensor& Y) {
  return lspo::left_project(proj(Pi, Pv, Pd, Pw), Y);
}
Tensor compress(const Tensor& Pi, const Tensor& Pv, int64_t Pd, const std::optional<Tensor>& Pw, const Tensor& Qi,
                const Tensor& Qv, int64_t Qd, const std::optional<Tensor>& Qw, const Tensor& G) {
  return lspo::compress(proj(Pi, Pv, Pd, Pw), proj(Qi, Qv, Qd, Qw), G);
}
Tensor project_input(const Tensor& Pi, const Tensor& Pv, int64_t Pd, const std::optional<Tensor>& Pw, const Tensor& X) {
  return lspo::project_input(proj(Pi, Pv, Pd, Pw), X);
}
Tensor project_grad_output(const Tensor& Qi, const Tensor& Qv, int64_t Qd, const std::optional<Tensor>& Qw,
                           const Tensor& dY) {
  return lspo::project_grad_output(proj(Qi, Qv, Qd, Qw), dY);
}
Tensor compress_activations(const Tensor& Pi, const Tensor& Pv, int64_t Pd, const std::optional<Tensor>& Pw,
                            const Tensor& Qi, const Tensor& Qv, int64_t Qd, const std::optional<Tensor>& Qw,
                            const Tensor& X, const Tensor& dY) {
  return lspo::compress_activations(proj(Pi, Pv, Pd, Pw), proj(Qi, Qv, Qd, Qw), X, dY);
}
Tensor decompress(const Tensor& Pi, const Tensor& Pv, int64_t Pd, const std::optional<Tensor>& Pw, const Tensor& Qi,
                  const Tensor& Qv, int64_t Qd, const std::optional<Tensor>& Qw, const Tensor& Delta) {
  return lspo::decompress(proj(Pi, Pv, Pd, Pw), proj(Qi, Qv, Qd, Qw), Delta);
}
void apply_(Tensor W, const Tensor& Pi, const Tensor& Pv, int64_t Pd, const std::optional<Tensor>& Pw, const Tensor& Qi,
            const Tensor& Qv, int64_t Qd, const std::optional<Tensor>& Qw, const Tensor& Delta, double alpha) {
  lspo::apply_(W, proj(Pi, Pv, Pd, Pw), proj(Qi, Qv, Qd, Qw), Delta, alpha);
}

void impl_all(torch::Library& m) {
  m.impl("right_project", &right_project);
  m.impl("left_project", &left_project);
  m.impl("compress", &compress);
  m.impl("project_input", &project_input);
  m.impl("project_grad_output", &project_grad_output);
  m.impl("compress_activations", &compress_activations);
  m.impl("decompress", &decompress);
  m.impl("apply_", &apply_);
}

}  // namespace

#define LSPO_P(name) "Tensor " #name "_indices, Tensor " #name "_values, int " #name "_d, Tensor? " #name "_whiten"

TORCH_LIBRARY(lspo, m) {
  m.def("right_project(Tensor X, " LSPO_P(P) ") -> Tensor");
  m.def("left_project(" LSPO_P(P) ", Tensor Y) -> Tensor");
  m.def("compress(" LSPO_P(P) ", " LSPO_P(Q) ", Tensor G) -> Tensor");
  m.def("project_input(" LSPO_P(P) ", Tensor X) -> Tensor");
  m.def("project_grad_output(" LSPO_P(Q) ", Tensor dY) -> Tensor");
  m.def("compress_activations(" LSPO_P(P) ", " LSPO_P(Q) ", Tensor X, Tensor dY) -> Tensor");
  m.def("decompress(" LSPO_P(P) ", " LSPO_P(Q) ", Tensor Delta) -> Tensor");
  m.def("apply_(Tensor(a!) W, " LSPO_P(P) ", " LSPO_P(Q) ", Tensor Delta, float alpha) -> ()");
}

TORCH_LIBRARY_IMPL(lspo, CPU, m) { impl_all(m); }

#ifdef LSPO_WITH_CUDA
TORCH_LIBRARY_IMPL(lspo, CUDA, m) { impl_all(m); }
#endif
