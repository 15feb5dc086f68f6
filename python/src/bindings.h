#pragma once
#include <torch/extension.h>

#include <functional>
#include <utility>
#include <vector>

#include "lspo/common.h"

namespace lspo {
class OffloadEngine;
namespace py_bind {
using BindFn = void (*)(pybind11::module_&);
std::vector<std::pair<const char*, BindFn>>& registry();
// OffloadEngine::stats() as a dict (the engine's and the optimizer core's bindings).
pybind11::dict stats_dict(const OffloadEngine& e);
struct Registrar {
  Registrar(const char* name, BindFn fn) { registry().emplace_back(name, fn); }
};
}  // namespace py_bind
}  // namespace lspo

// LSPO_REGISTER_BINDINGS(name) { m.def(...); }  -- `m` is the module.
#define LSPO_REGISTER_BINDINGS(name)                                                       \
  static void lspo_bind_##name(pybind11::module_& m);                                      \
  static ::lspo::py_bind::Registrar lspo_registrar_##name(#name, &lspo_bind_##name);       \
  static void lspo_bind_##name(pybind11::module_& m)
