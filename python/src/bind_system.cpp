// System-level bindings: CPU dispatch and the thread pool.
#include "bindings.h"
#include "lspo/cpu_features.h"
#include "lspo/thread_pool.h"

namespace {
void set_isa(const std::string& name) {
  if (name == "auto") return lspo::clear_isa_override();
  if (name == "avx512") return lspo::set_isa_override(lspo::Isa::kAVX512);
  if (name == "avx2") return lspo::set_isa_override(lspo::Isa::kAVX2);
  if (name == "scalar") return lspo::set_isa_override(lspo::Isa::kScalar);
  LSPO_CHECK(false, "unknown ISA '", name, "': use auto, scalar, avx2 or avx512");
}
}  // namespace

LSPO_REGISTER_BINDINGS(system) {
  m.def("detected_isa", [] { return std::string(lspo::isa_name(lspo::detected_isa())); },
        "The best SIMD instruction set this CPU supports: 'avx512', 'avx2' or 'scalar'.");
  m.def("active_isa", [] { return std::string(lspo::isa_name(lspo::active_isa())); },
        "The instruction set the CPU kernels use now.");
  m.def("set_isa", &set_isa, pybind11::arg("name"),
        "Force the CPU kernels onto one ISA path ('auto' to undo).");
  m.def("set_num_threads", &lspo::ThreadPool::set_num_threads, pybind11::arg("n"),
        "Size of lspo's persistent CPU thread pool (counting the calling thread).");
  m.def("get_num_threads", &lspo::ThreadPool::get_num_threads);
}
