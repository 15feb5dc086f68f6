// Internal: the per-parameter record of lspo::OffloadOptimizerBase (shared by optim.cpp and
// optim_serialize.cpp).
#pragma once
#include <string>

#include "lspo/optim.h"

namespace lspo {

struct OffloadOptimizerBase::ParamSlot {
  torch::Tensor param;     // the registered parameter (same TensorImpl as the user's)
  size_t group = 0;        // index into param_groups()
  std::string name;        // "param<i>:[sizes]" (engine slot and timeline name)
  int64_t slot = -1;       // engine slot (== the parameter's registration index)
  int64_t step = 0;        // committed steps
  bool projected = false;
  SparseProjector P, Q;    // projected only: rows [m, dP], columns [n, dQ], on the parameter's device
};

}  // namespace lspo
