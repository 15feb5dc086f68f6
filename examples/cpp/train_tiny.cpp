// train_tiny: the smallest LibTorch training loop with lspo's optimizers. A 3-layer MLP fits a
// smooth function of 16 inputs (full-batch regression, fixed data), three times from the same
// initial weights: torch::optim::AdamW, lspo::OffloadAdamW (same math, state on the host) and
// lspo::LSPAdamW (the two hidden weights projected to a 16 x 16 subspace).
//
//   train_tiny [--steps 200] [--lr 1e-2]
//
// Prints the loss of each run every 50 steps and one line per run
// "RESULT optimizer=... loss_before=... loss_after=..." (tests/consumer/run.sh checks it).
#include <lspo/optim.h>
#include <torch/torch.h>

#include <cstdio>
#include <memory>
#include <string>

namespace {

torch::nn::Sequential make_mlp() {
  torch::manual_seed(0);  // the same initial weights for every run
  return torch::nn::Sequential(torch::nn::Linear(16, 64), torch::nn::Tanh(), torch::nn::Linear(64, 64),
                               torch::nn::Tanh(), torch::nn::Linear(64, 1));
}

void run(const std::string& name, int64_t steps, double lr) {
  torch::manual_seed(1);
  const auto x = torch::randn({512, 16});
  const auto y = torch::sin(x.narrow(1, 0, 4).sum(1, true)) + 0.5 * x.narrow(1, 4, 4).pow(2).mean(1, true);
  auto model = make_mlp();
  std::unique_ptr<torch::optim::Optimizer> opt;
  if (name == "adamw") {
    opt = std::make_unique<torch::optim::AdamW>(model->parameters(), torch::optim::AdamWOptions(lr));
  } else if (name == "offload") {
    opt = std::make_unique<lspo::OffloadAdamW>(model->parameters(), lspo::OffloadAdamWOptions(lr));
  } else {
    // [64, 16] and [64, 64] weights have both dims >= 16: projected; biases and the [1, 64] head are not
    opt = std::make_unique<lspo::LSPAdamW>(
        model->parameters(), lspo::LSPAdamWOptions(lr).weight_decay(1e-2).subspace(16).nnz(4).refit_every(50));
  }
  double first = 0, last = 0;
  for (int64_t step = 0; step < steps; ++step) {
    opt->zero_grad();
    auto loss = torch::mse_loss(model->forward(x), y);
    loss.backward();
    opt->step();
    last = loss.item<double>();
    if (step == 0) first = last;
    if ((step + 1) % 50 == 0)
      std::printf("%-8s step %4lld  loss %.5f\n", name.c_str(), static_cast<long long>(step + 1), last);
  }
  std::printf("RESULT optimizer=%s loss_before=%.5f loss_after=%.5f\n", name.c_str(), first, last);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t steps = 200;
  double lr = 1e-2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--steps") steps = std::stoll(argv[i + 1]);
    else if (a == "--lr") lr = std::stod(argv[i + 1]);
    else {
      std::fprintf(stderr, "train_tiny: unknown argument %s (use --steps N --lr X)\n", a.c_str());
      return 2;
    }
  }
  try {
    for (const char* name : {"adamw", "offload", "lsp"}) run(name, steps, lr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_tiny: %s\n", e.what());
    return 1;
  }
  return 0;
}
