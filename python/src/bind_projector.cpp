// Bindings of the public projector API (include/lspo/projector.h). A projector crosses the boundary
// as the plain triple (indices int32 [n, r], values fp32 [n, r], d); python/lspo/projector.py wraps
// it in lspo.SparseProjector. The C++ operations check every argument (named lspo::Error messages).
// The tensor-in, tensor-out operations (right_project, compress, apply_, ...) are dispatcher
// operators instead (torch.ops.lspo.*, ops_projector.cpp); this file binds the rest.
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "lspo/projector.h"
#include "lspo/refit.h"

namespace {

namespace py = pybind11;
using lspo::SparseProjector;

SparseProjector wrap(const torch::Tensor& indices, const torch::Tensor& values, int64_t d,
                     const std::optional<torch::Tensor>& whiten) {
  return SparseProjector::view(indices, values, d, whiten.value_or(torch::Tensor()));
}
std::optional<torch::Tensor> whiten_of(const SparseProjector& P) {
  return P.whitened() ? std::optional<torch::Tensor>(P.whiten) : std::nullopt;
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

// A projector: (indices, values, d, whiten or None).
#define PJ(name)                                                                     \
  const torch::Tensor &name##_indices, const torch::Tensor &name##_values, int64_t name##_d, \
      const std::optional<torch::Tensor> &name##_whiten
#define PW(name) wrap(name##_indices, name##_values, name##_d, name##_whiten)
#define PA(name) py::arg(#name "_indices"), py::arg(#name "_values"), py::arg(#name "_d"), py::arg(#name "_whiten")

}  // namespace

LSPO_REGISTER_BINDINGS(projector) {
  m.def(
      "projector_random",
      [](int64_t n, int64_t d, int64_t r, uint64_t seed, const std::string& device, const std::string& init,
         bool whitened) {
        auto P = SparseProjector::random(n, d, r, seed, torch::Device(device), parse_init(init), whitened);
        return std::make_tuple(P.indices, P.values, whiten_of(P));
      },
      py::arg("n"), py::arg("d"), py::arg("r"), py::arg("seed"), py::arg("device") = "cpu",
      py::arg("init") = "gaussian", py::arg("whitened") = false,
      "Random (d, r)-sparse projector of a dimension n: (indices, values, whiten or None).");
  m.def(
      "projector_dense_basis",
      [](int64_t n, int64_t d, uint64_t seed, const std::string& device) {
        auto P = SparseProjector::dense_basis(n, d, seed, torch::Device(device));
        return std::make_tuple(P.indices, P.values);
      },
      py::arg("n"), py::arg("d"), py::arg("seed"), py::arg("device") = "cpu",
      "Dense random orthonormal n x d projector with shared positions: (indices [n, d] expanded from one row, "
      "values).");
  m.def("projector_whitening_factor", [](PJ(P)) { return lspo::whitening_factor(PW(P)); }, PA(P),
        "T = L^-T with P^T P = L L^T, from the current values: [d, d] fp32 upper triangular.");
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
        }  // values and whiten updated in place
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
      "projector_refit",
      [](PJ(P), PJ(Q), const py::list& fit_samples, const py::list& heldout, int64_t iters, double lr, double l2,
         int64_t eval_every, int64_t patience, double threshold, double drift, double reference_error, double min_gain,
         const std::string& reinit, uint64_t seed, std::optional<torch::Tensor> M, std::optional<torch::Tensor> V) {
        lspo::RefitOptions o;
        o.iters = iters;
        o.lr = lr;
        o.l2 = l2;
        o.eval_every = eval_every;
        o.patience = patience;
        o.threshold = threshold;
        o.drift = drift;
        o.reference_error = reference_error;
        o.min_gain = min_gain;
        o.reinit = lspo::parse_reinit(reinit, "refit");
        o.seed = seed;
        auto p = PW(P);
        auto q = PW(Q);
        auto fs = samples_from(fit_samples);
        auto hs = samples_from(heldout);
        torch::Tensor m = M.value_or(torch::Tensor()), v = V.value_or(torch::Tensor());
        lspo::RefitResult r;
        {
          py::gil_scoped_release nogil;
          r = lspo::refit(p, q, fs, hs, o, M ? &m : nullptr, V ? &v : nullptr);
        }
        LSPO_CHECK(!M || m.data_ptr() == M->data_ptr(), "refit: the moments changed size (carry_state replaced them)");
        py::dict d;
        d["heldout_before"] = r.heldout_before;
        d["heldout_after"] = r.heldout_after;
        d["fit_before"] = r.fit_before;
        d["fit_after"] = r.fit_after;
        d["fitted"] = r.fitted;
        d["kept"] = r.kept;
        d["reinit"] = r.reinit;
        d["iters"] = r.iters;
        d["seconds"] = r.seconds;
        d["reference_error"] = r.reference_error;
        return d;
      },
      PA(P), PA(Q), py::arg("fit_samples"), py::arg("heldout"), py::arg("iters") = 40, py::arg("lr") = 0.1,
      py::arg("l2") = 0.01, py::arg("eval_every") = 10, py::arg("patience") = 2, py::arg("threshold") = 0.0, py::arg("drift") = 0.1,
      py::arg("reference_error") = std::numeric_limits<double>::quiet_NaN(), py::arg("min_gain") = 0.0,
      py::arg("reinit") = "on_failure", py::arg("seed") = 0, py::arg("M") = py::none(), py::arg("V") = py::none(),
      "One refit check (lspo/refit.h): values/whiten of P, Q (and M, V) updated in place when kept; returns a dict.");
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
