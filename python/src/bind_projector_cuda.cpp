// Internal bindings of the CUDA projector primitives (src/projector_cuda.h), for tests and the GPU
// benchmark: they take the projector as raw tensors (indices int32 [n, r], values fp32 [n, r], d)
// and the backend by name. The public projector API is bound elsewhere (bind_projector.cpp).
#include <string>

#include "../../src/projector_cuda.h"
#include "bindings.h"

namespace {

lspo::ProjectorBackend parse_backend(const std::string& name) {
  if (name == "auto") return lspo::ProjectorBackend::kAuto;
  if (name == "gather") return lspo::ProjectorBackend::kGather;
  if (name == "cusparse") return lspo::ProjectorBackend::kCuSparse;
  LSPO_CHECK(false, "unknown projector backend '", name, "': use auto, gather or cusparse");
  return lspo::ProjectorBackend::kAuto;
}

lspo::SparseProjector wrap(const torch::Tensor& indices, const torch::Tensor& values, int64_t d) {
  return lspo::SparseProjector::view(indices, values, d);
}

const char* backend_name(lspo::ProjectorBackend b) {
  switch (b) {
    case lspo::ProjectorBackend::kGather: return "gather";
    case lspo::ProjectorBackend::kCuSparse: return "cusparse";
    case lspo::ProjectorBackend::kAuto: return "auto";
  }
  return "auto";
}

}  // namespace

LSPO_REGISTER_BINDINGS(projector_cuda) {
  namespace py = pybind11;
  namespace ld = lspo::detail;
  m.def("_projector_cuda_compiled", &ld::projector_cuda_compiled, "True when lspo was built with CUDA.");
  m.def(
      "_cuda_right_project",
      [](const torch::Tensor& Y, const torch::Tensor& indices, const torch::Tensor& values, int64_t d,
         const std::string& backend) { return ld::cuda_right_project(Y, wrap(indices, values, d), parse_backend(backend)); },
      py::arg("Y"), py::arg("indices"), py::arg("values"), py::arg("d"), py::arg("backend") = "auto",
      "Y [k, n] @ P -> [k, d] fp32 on the current CUDA stream (internal primitive).");
  m.def(
      "_cuda_left_project",
      [](const torch::Tensor& indices, const torch::Tensor& values, int64_t d, const torch::Tensor& Y,
         const std::string& backend) { return ld::cuda_left_project(wrap(indices, values, d), Y, parse_backend(backend)); },
      py::arg("indices"), py::arg("values"), py::arg("d"), py::arg("Y"), py::arg("backend") = "auto",
      "P^T @ Y [n, k] -> [d, k] fp32 (internal primitive).");
  m.def(
      "_cuda_expand",
      [](const torch::Tensor& indices, const torch::Tensor& values, int64_t d, const torch::Tensor& D,
         const std::string& backend) { return ld::cuda_expand(wrap(indices, values, d), D, parse_backend(backend)); },
      py::arg("indices"), py::arg("values"), py::arg("d"), py::arg("D"), py::arg("backend") = "auto",
      "P @ D [d, k] -> [n, k] fp32 (internal primitive).");
  m.def(
      "_cuda_apply_rows_",
      [](torch::Tensor W, const torch::Tensor& indices, const torch::Tensor& values, int64_t d, const torch::Tensor& T,
         double alpha, const std::string& backend) {
        ld::cuda_apply_rows_(W, wrap(indices, values, d), T, alpha, parse_backend(backend));
      },
      py::arg("W"), py::arg("indices"), py::arg("values"), py::arg("d"), py::arg("T"), py::arg("alpha"),
      py::arg("backend") = "auto", "W [n, k] += alpha * P @ T [d, k] in place, in W's dtype (internal primitive).");
  m.def(
      "_cuda_apply_cols_",
      [](torch::Tensor W, const torch::Tensor& U, const torch::Tensor& indices, const torch::Tensor& values, int64_t d,
         double alpha, const std::string& backend) {
        ld::cuda_apply_cols_(W, U, wrap(indices, values, d), alpha, parse_backend(backend));
      },
      py::arg("W"), py::arg("U"), py::arg("indices"), py::arg("values"), py::arg("d"), py::arg("alpha"),
      py::arg("backend") = "auto",
      "W [m, n] += alpha * U [m, d] @ Q^T in place, in W's dtype; Q (indices, values) over n (internal primitive).");
  m.def(
      "_cuda_prepare_projector",
      [](const torch::Tensor& indices, const torch::Tensor& values, int64_t d) {
        ld::cuda_prepare_projector(wrap(indices, values, d));
      },
      py::arg("indices"), py::arg("values"), py::arg("d"),
      "Build the projector's CUDA column index now (the one synchronising step of its first CUDA call).");
  m.def(
      "_cuda_resolve_backend",
      [](const std::string& op, int64_t n, int64_t d, int64_t r, int64_t k, const std::string& backend) {
        ld::CudaPrimitive p;
        if (op == "right_project") {
          p = ld::CudaPrimitive::kRightProject;
        } else if (op == "left_project") {
          p = ld::CudaPrimitive::kLeftProject;
        } else if (op == "expand") {
          p = ld::CudaPrimitive::kExpand;
        } else if (op == "apply_rows") {
          p = ld::CudaPrimitive::kApplyRows;
        } else if (op == "apply_cols") {
          p = ld::CudaPrimitive::kApplyCols;
        } else {
          LSPO_CHECK(false, "unknown primitive '", op, "': use right_project, left_project, expand, apply_rows or apply_cols");
          p = ld::CudaPrimitive::kRightProject;
        }
        return std::string(backend_name(ld::cuda_resolve_backend(p, n, d, r, k, parse_backend(backend))));
      },
      py::arg("op"), py::arg("n"), py::arg("d"), py::arg("r"), py::arg("k"), py::arg("backend") = "auto",
      "Which backend a CUDA projector primitive runs for this shape.");
}
