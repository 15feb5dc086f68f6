// lspo_crosscheck: trains a small MLP with the C++ face of lspo's optimizers, driven by a file the
// Python test (tests/python/test_faces.py) writes, so both faces can be compared bitwise on the same
// model, seed and data. Usage: lspo_crosscheck IN.pt OUT.pt
//   IN  (torch.save'd dict): weights [W1, b1, W2, b2, W3, b3], xs [steps*accum tensors [n, 24]],
//       ys (int64 targets), steps, accum, kind ("lsp" | "offload"), options (dict of numbers),
//       load ("" or a checkpoint written by Python's torch.save(opt.state_dict())), start (first step
//       index into xs), save_at (-1 or a step count), save_path.
//   OUT (pickled dict, torch.load-able): weights (after training), checkpoint (save_checkpoint's dict).
#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <iterator>

#include "lspo/optim.h"

namespace {

c10::IValue read_pickle(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes);
}

double num(const c10::IValue& v) { return v.isInt() ? static_cast<double>(v.toInt()) : v.toDouble(); }

struct MLP : torch::nn::Module {
  torch::nn::Linear l1{nullptr}, l2{nullptr}, l3{nullptr};
  explicit MLP(const std::vector<torch::Tensor>& w) {
    l1 = register_module("l1", torch::nn::Linear(w[0].size(1), w[0].size(0)));
    l2 = register_module("l2", torch::nn::Linear(w[2].size(1), w[2].size(0)));
    l3 = register_module("l3", torch::nn::Linear(w[4].size(1), w[4].size(0)));
    torch::NoGradGuard ng;
    auto ps = parameters();
    for (size_t i = 0; i < ps.size(); ++i) ps[i].copy_(w[i]);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return l3->forward(torch::gelu(l2->forward(torch::tanh(l1->forward(x)))));
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: lspo_crosscheck IN.pt OUT.pt\n";
    return 2;
  }
  try {
    at::set_num_threads(1);
    auto in = read_pickle(argv[1]).toGenericDict();
    std::vector<torch::Tensor> w;
    for (const auto& t : in.at("weights").toListRef()) w.push_back(t.toTensor());
    std::vector<torch::Tensor> xs, ys;
    for (const auto& t : in.at("xs").toListRef()) xs.push_back(t.toTensor());
    for (const auto& t : in.at("ys").toListRef()) ys.push_back(t.toTensor());
    const int64_t steps = in.at("steps").toInt(), accum = in.at("accum").toInt(), start = in.at("start").toInt();
    const int64_t save_at = in.at("save_at").toInt();
    const std::string kind = in.at("kind").toStringRef(), load = in.at("load").toStringRef();
    auto o = in.at("options").toGenericDict();
    auto model = std::make_shared<MLP>(w);
    std::unique_ptr<lspo::OffloadOptimizerBase> opt;
    if (kind == "lsp" || kind == "lsp1" || kind == "lsvd") {
      lspo::LSPAdamWOptions lo(num(o.at("lr")));
      lo.weight_decay(num(o.at("weight_decay")))
          .subspace(o.at("subspace").toInt())
          .nnz(o.at("nnz").toInt())
          .min_dim(o.at("min_dim").toInt())
          .refit_every(o.at("refit_every").toInt())
          .refit_threshold(num(o.at("refit_threshold")))
          .refit_iters(o.at("refit_iters").toInt())
          .refit_lr(num(o.at("refit_lr")))
          .max_grad_norm(num(o.at("max_grad_norm")))
          .overlap(o.at("overlap").toBool())
          .seed(o.at("seed").toInt());
      if (o.contains("one_sided")) lo.one_sided(o.at("one_sided").toBool());
      if (o.contains("basis")) lo.basis(o.at("basis").toStringRef());
      opt = std::make_unique<lspo::LSPAdamW>(model->parameters(), lo);
    } else {
      lspo::OffloadAdamWOptions oo(num(o.at("lr")));
      oo.weight_decay(num(o.at("weight_decay"))).max_grad_norm(num(o.at("max_grad_norm"))).overlap(o.at("overlap").toBool());
      opt = std::make_unique<lspo::OffloadAdamW>(model->parameters(), oo);
    }
    if (!load.empty()) opt->load_checkpoint(load);
    c10::IValue saved;
    for (int64_t s = 0; s < steps; ++s) {
      for (int64_t k = 0; k < accum; ++k) {
        const size_t i = static_cast<size_t>((start + s) * accum + k);
        auto loss = torch::nn::functional::cross_entropy(model->forward(xs.at(i)), ys.at(i)) / static_cast<double>(accum);
        loss.backward();
      }
      opt->step();
      opt->zero_grad();
      if (s + 1 == save_at) saved = opt->checkpoint();
    }
    c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
    c10::impl::GenericList ws(c10::AnyType::get());
    for (const auto& p : model->parameters()) ws.push_back(p.detach().clone());
    out.insert("weights", ws);
    out.insert("checkpoint", opt->checkpoint());
    if (!saved.isNone()) out.insert("saved", saved);
    lspo::save_torch_file(out, argv[2]);
  } catch (const std::exception& e) {
    std::cerr << "lspo_crosscheck: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
