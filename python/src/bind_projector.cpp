// Bindings of the public projector API (include/lspo/projector.h). A projector crosses the boundary
// as the plain triple (indices int32 [n, r], values fp32 [n, r], d); python/lspo/projector.py wraps
// it in lspo.SparseProjector. The C++ operations check every argument (named lspo::Error messages).
// The tensor-in, tensor-out operations (right_project, compress, apply_, ...) are dispatcher
// operators instead (torch.ops.lspo.*, ops_projector.cpp); this file binds the rest.
#include <string>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "lspo/projector.h"

namespace {

namespace py = pybind11;
using lspo::SparseProjector;

SparseProjector wrap(const torch::Tensor& indices, const torch::Tensor& values, int64_t d) {
  SparseProjector P;
  P.indices = indices;
  P.values = values;
  P.d = d;
  return P;
}

lspo::ProjectorInit parse_init(const std::string& s) {
  if (s == "gaussian") return lspo::ProjectorInit::kGaussian;
  if (s == "rademacher" || s == "signs") return lspo::ProjectorInit::kRademacher;
  LSPO_CHECK(false, "unknown projector init '", s, "': use gaussian or rademacher");
  return lspo::ProjectorInit::kGaussian;
}

// Samples from Python: a list whose items are tensors G or pairs (X, dY).
std::vector<lspo::GradSample> samples_from(const py::list& items) {
  std::vector<lspo::GradSample> v;
  for (const auto& it : items) {
    if (py::isinstance<py::tuple>(it) || py::isinstance<py::list>(it)) {
      auto seq = it.cast<py::sequence>();
      LSPO_CHECK(seq.size() == 2, "gradient samples: a pair must be (X, dY), got ", seq.size(), " items");
      v.push_back(lspo::GradSample::activations(seq[0].cast<torch::Tensor>(), seq[1].cast<torch::Tensor>()));
    } else {
      v.push_back(lspo::GradSample::dense(it.cast<torch::Tensor>()));
    }
  }
  return v;
}

#define PJ(name) const torch::Tensor &name##_indices, const torch::Tensor &name##_values, int64_t name##_d
#define PW(name) wrap(name##_indices, name##_values, name##_d)
#define PA(name) py::arg(#name "_indices"), py::arg(#name "_values"), py::arg(#name "_d")

}  // namespace

LSPO_REGISTER_BINDINGS(projector) {
  m.def(
      "projector_random",
      [](int64_t n, int64_t d, int64_t r, uint64_t seed, const std::string& device, const std::string& init) {
        auto P = SparseProjector::random(n, d, r, seed, torch::Device(device), parse_init(init));
        return std::make_tuple(P.indices, P.values);
      },
      py::arg("n"), py::arg("d"), py::arg("r"), py::arg("seed"), py::arg("device") = "cpu",
      py::arg("init") = "gaussian", "Random (d, r)-sparse projector of a dimension n: (indices, values).");
  m.def("projector_validate", [](PJ(P)) { PW(P).validate(); }, PA(P),
        "Full check of a projector (shapes, dtypes, index range, distinct positions per row, finite values).");
  m.def(
      "projector_relative_error",
      [](PJ(P), PJ(Q), const py::list& samples) { return lspo::relative_error(PW(P), PW(Q), samples_from(samples)); },
      PA(P), PA(Q), py::arg("samples"), "Mean ||P P^T G Q Q^T - G|| / ||G|| over samples (tensors G or pairs (X, dY)).");
  m.def(
      "projector_should_refit",
      [](PJ(P), PJ(Q), const py::list& samples, double alpha) {
        return lspo::should_refit(PW(P), PW(Q), samples_from(samples), alpha);
      },
      PA(P), PA(Q), py::arg("samples"), py::arg("alpha"), "relative_error(samples) > alpha.");
  m.def(
      "projector_fit",
      [](PJ(P), PJ(Q), const py::list& samples, double lr, int64_t max_iters, double target_error, double l2) {
        lspo::FitOptions o;
        o.lr = lr;
        o.max_iters = max_iters;
        o.target_error = target_error;
        o.l2 = l2;
        auto p = PW(P);
        auto q = PW(Q);
        auto v = samples_from(samples);
        lspo::FitResult r;
        {
          py::gil_scoped_release nogil;
          r = lspo::fit(p, q, v, o);
        }
        py::dict d;
        d["error_before"] = r.error_before;
        d["error_after"] = r.error_after;
        d["iters"] = r.iters;
        return d;
      },
      PA(P), PA(Q), py::arg("samples"), py::arg("lr") = 0.05, py::arg("max_iters") = 100,
      py::arg("target_error") = 0.0, py::arg("l2") = 0.0,
      "Learn P's and Q's values in place (Adam); returns {error_before, error_after, iters}.");
  m.def(
      "projector_carry_state",
      [](PJ(Po), PJ(Qo), PJ(Pn), PJ(Qn), torch::Tensor M, torch::Tensor V) {
        lspo::carry_state(PW(Po), PW(Qo), PW(Pn), PW(Qn), M, V);
        return std::make_tuple(M, V);
      },
      PA(Po), PA(Qo), PA(Pn), PA(Qn), py::arg("M"), py::arg("V"),
      "Carry Adam moments into new projectors; returns (M, V) (in place when the sizes agree).");
  m.def(
      "set_projector_backend",
      [](const std::string& b) {
        if (b == "auto") {
          lspo::set_projector_backend(lspo::ProjectorBackend::kAuto);
        } else if (b == "gather") {
          lspo::set_projector_backend(lspo::ProjectorBackend::kGather);
        } else if (b == "cusparse") {
          lspo::set_projector_backend(lspo::ProjectorBackend::kCuSparse);
        } else {
          LSPO_CHECK(false, "unknown projector backend '", b, "': use auto, gather or cusparse");
        }
      },
      py::arg("backend"), "CUDA kernel family of the projector operations (auto, gather, cusparse).");
}
