// The pybind11 module lspo._C. Each python/src/bind_*.cpp registers its part through
// LSPO_REGISTER_BINDINGS, so components add bindings without touching this file.
#include "bindings.h"

namespace lspo {
namespace py_bind {
std::vector<std::pair<const char*, BindFn>>& registry() {
  static std::vector<std::pair<const char*, BindFn>> r;
  return r;
}
}  // namespace py_bind
}  // namespace lspo

PYBIND11_MODULE(_C, m) {
  m.doc() = "lspo native core";
#ifdef LSPO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  pybind11::register_exception<lspo::Error>(m, "LspoError", PyExc_RuntimeError);
  for (auto& entry : lspo::py_bind::registry()) entry.second(m);
}
