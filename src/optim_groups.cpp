// lspo::lsp_param_groups (lspo/optim.h): which parameters of a module LSPAdamW projects.
#include <set>
#include <string>

#include "lspo/optim.h"

namespace lspo {

std::vector<torch::optim::OptimizerParamGroup> lsp_param_groups(const torch::nn::Module& model,
                                                                const LSPAdamWOptions& o) {
  // apply() with names visits the module itself too, without needing it in a shared_ptr
  std::set<const void*> tied;
  model.apply([&](const std::string&, const torch::nn::Module& m) {
    if (const auto* e = dynamic_cast<const torch::nn::EmbeddingImpl*>(&m))
      tied.insert(e->weight.unsafeGetTensorImpl());
  });
  std::set<const void*> eligible;
  model.apply([&](const std::string& name, const torch::nn::Module& m) {
    const auto* lin = dynamic_cast<const torch::nn::LinearImpl*>(&m);
    if (!lin) return;
    const auto dot = name.find_last_of('.');
    const std::string leaf = dot == std::string::npos ? name : name.substr(dot + 1);
    if (leaf == "lm_head" || leaf == "embed_out" || leaf == "output_layer") return;
    if (tied.count(lin->weight.unsafeGetTensorImpl())) return;
    eligible.insert(lin->weight.unsafeGetTensorImpl());
  });
  std::vector<torch::Tensor> proj, rest;
  std::set<const void*> seen;  // a tied weight is listed once per module that registers it
  for (const auto& p : model.parameters(/*recurse=*/true)) {
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    (eligible.count(p.unsafeGetTensorImpl()) ? proj : rest).push_back(p);
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(proj, std::make_unique<LSPAdamWOptions>(o));
  groups.emplace_back(rest, std::make_unique<LSPAdamWOptions>(LSPAdamWOptions(o).project(false)));
  return groups;
}

}  // namespace lspo
