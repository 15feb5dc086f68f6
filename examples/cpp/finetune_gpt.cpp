// finetune_gpt: a small GPT written with LibTorch's C++ API, trained on tinyshakespeare (bytes as
// tokens) with lspo::LSPAdamW. The same model as python/lspo/tinygpt.py: pre-norm blocks, learned
// positions, GELU MLP, causal scaled-dot-product attention, lm_head tied to the token embedding.
//
//   finetune_gpt [--data examples/data/tinyshakespeare.txt] [--steps 200] [--optimizer lsp|offload|adamw]
//                [--batch 16] [--seq 64] [--layers 2] [--embd 128] [--heads 4] [--lr 3e-3]
//                [--subspace 64] [--nnz 4] [--refit-every 50] [--eval-every 50] [--seed 0] [--device cpu|cuda]
//
// LSPAdamW parameter groups: the blocks' Linear weights (2-D, both dims >= subspace) are projected;
// the embeddings (tied lm_head), LayerNorms and biases are in a group with project(false) and get a
// plain offloaded AdamW. Data split (as lspo.tinygpt.load_text): the first 90% of the file's bytes
// train, the last 10% validate. All three optimizers clip the global gradient norm at 1.0.
// Prints the validation loss before and after training and a final line
// "RESULT optimizer=... val_loss_before=... val_loss_after=..." (tests/consumer/run.sh checks it).
//
// Measured (2-core CPU machine, shared, OMP_NUM_THREADS=1, defaults, 300 steps, seed 0): validation
// loss 5.557 -> torch AdamW 2.409, OffloadAdamW 2.402, LSPAdamW 2.510 (subspace 64, nnz 4).
#include <lspo/optim.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Config {
  std::string data = "examples/data/tinyshakespeare.txt", optimizer = "lsp", device = "cpu";
  int64_t steps = 200, batch = 16, seq = 64, layers = 2, embd = 128, heads = 4;
  int64_t subspace = 64, nnz = 4, refit_every = 50, eval_every = 50, seed = 0;
  double lr = 3e-3;
};

struct BlockImpl : torch::nn::Module {
  int64_t heads;
  torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr}, fc{nullptr}, fc_out{nullptr};
  BlockImpl(int64_t embd, int64_t heads_, int64_t layers) : heads(heads_) {
    ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({embd})));
    qkv = register_module("qkv", torch::nn::Linear(embd, 3 * embd));
    proj = register_module("proj", torch::nn::Linear(embd, embd));
    ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({embd})));
    fc = register_module("fc", torch::nn::Linear(embd, 4 * embd));
    fc_out = register_module("fc_out", torch::nn::Linear(4 * embd, embd));
    torch::NoGradGuard ng;
    for (auto* lin : {&qkv, &proj, &fc, &fc_out}) {
      const double std = (lin == &proj || lin == &fc_out) ? 0.02 / std::sqrt(2.0 * layers) : 0.02;
      (*lin)->weight.normal_(0, std);
      (*lin)->bias.zero_();
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    const int64_t b = x.size(0), t = x.size(1), e = x.size(2);
    auto parts = qkv(ln1(x)).split(e, 2);
    for (auto& z : parts) z = z.view({b, t, heads, e / heads}).transpose(1, 2);
    auto y = torch::scaled_dot_product_attention(parts[0], parts[1], parts[2], {}, 0.0, /*is_causal=*/true);
    x = x + proj(y.transpose(1, 2).reshape({b, t, e}));
    return x + fc_out(torch::gelu(fc(ln2(x))));
  }
};
TORCH_MODULE(Block);

struct GPTImpl : torch::nn::Module {
  torch::nn::Embedding tok{nullptr}, pos{nullptr};
  std::vector<Block> blocks;
  torch::nn::LayerNorm ln_f{nullptr};
  GPTImpl(const Config& c) {
    tok = register_module("tok", torch::nn::Embedding(256, c.embd));
    pos = register_module("pos", torch::nn::Embedding(c.seq, c.embd));
    for (int64_t i = 0; i < c.layers; ++i)
      blocks.push_back(register_module("block" + std::to_string(i), Block(c.embd, c.heads, c.layers)));
    ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.embd})));
    torch::NoGradGuard ng;
    tok->weight.normal_(0, 0.02);
    pos->weight.normal_(0, 0.02);
  }
  torch::Tensor loss(const torch::Tensor& idx, const torch::Tensor& targets) {
    auto x = tok(idx) + pos(torch::arange(idx.size(1), idx.options()));
    for (auto& b : blocks) x = b(x);
    auto logits = torch::nn::functional::linear(ln_f(x), tok->weight);  // lm_head tied to tok
    return torch::nn::functional::cross_entropy(logits.reshape({-1, 256}), targets.reshape(-1));
  }
};
TORCH_MODULE(GPT);

// Random windows of `seq` tokens (and their next-token targets), reproducible from the generator's seed.
std::pair<torch::Tensor, torch::Tensor> batch(const torch::Tensor& data, int64_t b, int64_t seq,
                                              at::Generator& gen, torch::Device dev) {
  auto ix = torch::randint(data.numel() - seq - 1, {b}, gen, torch::kLong);
  std::vector<torch::Tensor> xs, ys;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t s = ix[i].item<int64_t>();
    xs.push_back(data.slice(0, s, s + seq));
    ys.push_back(data.slice(0, s + 1, s + 1 + seq));
  }
  return {torch::stack(xs).to(dev, torch::kLong), torch::stack(ys).to(dev, torch::kLong)};
}

double evaluate(GPT& model, const torch::Tensor& val, const Config& c, torch::Device dev) {
  torch::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1234);  // the same windows every call
  double tot = 0;
  const int n = 8;
  for (int i = 0; i < n; ++i) {
    auto [x, y] = batch(val, c.batch, c.seq, gen, dev);
    tot += model->loss(x, y).item<double>();
  }
  return tot / n;
}

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument("missing value after " + a);
      return argv[++i];
    };
    if (a == "--data") c.data = next();
    else if (a == "--optimizer") c.optimizer = next();
    else if (a == "--device") c.device = next();
    else if (a == "--steps") c.steps = std::stoll(next());
    else if (a == "--batch") c.batch = std::stoll(next());
    else if (a == "--seq") c.seq = std::stoll(next());
    else if (a == "--layers") c.layers = std::stoll(next());
    else if (a == "--embd") c.embd = std::stoll(next());
    else if (a == "--heads") c.heads = std::stoll(next());
    else if (a == "--subspace") c.subspace = std::stoll(next());
    else if (a == "--nnz") c.nnz = std::stoll(next());
    else if (a == "--refit-every") c.refit_every = std::stoll(next());
    else if (a == "--eval-every") c.eval_every = std::stoll(next());
    else if (a == "--seed") c.seed = std::stoll(next());
    else if (a == "--lr") c.lr = std::stod(next());
    else if (a == "-h" || a == "--help") {
      std::printf("see the comment at the top of examples/cpp/finetune_gpt.cpp\n");
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown argument " + a);
    }
  }
  if (c.steps < 1 || c.batch < 1 || c.seq < 2 || c.layers < 1 || c.heads < 1 || c.embd % c.heads != 0)
    throw std::invalid_argument(
        "need --steps >= 1, --batch >= 1, --seq >= 2, --layers >= 1, --embd divisible by --heads");
  if (c.optimizer != "lsp" && c.optimizer != "offload" && c.optimizer != "adamw")
    throw std::invalid_argument("--optimizer must be lsp, offload or adamw, got " + c.optimizer);
  return c;
}

torch::Tensor read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open --data " + path);
  std::vector<char> buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (buf.size() < 10000)
    throw std::runtime_error("--data " + path + " is too small (" + std::to_string(buf.size()) + " bytes)");
  return torch::from_blob(buf.data(), {static_cast<int64_t>(buf.size())}, torch::kUInt8).clone();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Config c = parse(argc, argv);
    const torch::Device dev(c.device);
    if (dev.is_cuda() && !torch::cuda::is_available())
      throw std::runtime_error("--device cuda but no GPU is available");
    torch::manual_seed(c.seed);
    const torch::Tensor data = read_bytes(c.data);
    const int64_t cut = static_cast<int64_t>(data.numel() * 0.9);
    const torch::Tensor train = data.slice(0, 0, cut), val = data.slice(0, cut);

    GPT model(c);
    model->to(dev);
    // group 0: the blocks' Linear weights (projected by LSPAdamW); group 1: everything else
    std::vector<torch::Tensor> proj, rest;
    for (const auto& kv : model->named_parameters()) {
      const bool linear_weight = kv.key().find("block") == 0 && kv.value().dim() == 2;
      (linear_weight ? proj : rest).push_back(kv.value());
    }
    std::unique_ptr<torch::optim::Optimizer> opt;
    if (c.optimizer == "lsp") {
      auto o = lspo::LSPAdamWOptions(c.lr).subspace(c.subspace).nnz(c.nnz).refit_every(c.refit_every)
                   .refit_iters(20).seed(c.seed).max_grad_norm(1.0);
      auto dense = std::make_unique<lspo::LSPAdamWOptions>(o);
      dense->project(false);
      opt = std::make_unique<lspo::LSPAdamW>(
          std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(proj),
                                                         torch::optim::OptimizerParamGroup(rest, std::move(dense))},
          o);
    } else if (c.optimizer == "offload") {
      proj.insert(proj.end(), rest.begin(), rest.end());
      opt = std::make_unique<lspo::OffloadAdamW>(
          proj, lspo::OffloadAdamWOptions(c.lr).weight_decay(0).max_grad_norm(1.0));
    } else {
      proj.insert(proj.end(), rest.begin(), rest.end());
      opt = std::make_unique<torch::optim::AdamW>(proj, torch::optim::AdamWOptions(c.lr).weight_decay(0));
    }
    if (auto* l = dynamic_cast<lspo::LSPAdamW*>(opt.get())) {
      int64_t n = 0;
      for (const auto& p : model->parameters()) n += l->is_projected(p);
      std::printf("LSPAdamW: %lld of %zu parameter tensors projected (subspace %lld, nnz %lld)\n",
                  static_cast<long long>(n), model->parameters().size(), static_cast<long long>(c.subspace),
                  static_cast<long long>(c.nnz));
    }

    const double before = evaluate(model, val, c, dev);
    std::printf("step 0: val_loss %.4f\n", before);
    std::fflush(stdout);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(c.seed));
    const auto t0 = std::chrono::steady_clock::now();
    double avg = 0;
    for (int64_t step = 1; step <= c.steps; ++step) {
      auto [x, y] = batch(train, c.batch, c.seq, gen, dev);
      opt->zero_grad();
      auto loss = model->loss(x, y);
      loss.backward();
      // lspo's optimizers clip inside step() (max_grad_norm 1.0); torch AdamW gets the same clipping
      if (c.optimizer == "adamw") torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0);
      opt->step();
      const double l = loss.item<double>();
      avg = step == 1 ? l : 0.9 * avg + 0.1 * l;
      if (step % c.eval_every == 0 || step == c.steps) {
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::printf("step %lld: train_loss %.4f (ema) val_loss %.4f  %.1f tokens/s\n", static_cast<long long>(step),
                    avg, evaluate(model, val, c, dev), step * c.batch * c.seq / secs);
        std::fflush(stdout);
      }
    }
    const double after = evaluate(model, val, c, dev);
    std::printf("RESULT optimizer=%s steps=%lld val_loss_before=%.4f val_loss_after=%.4f\n", c.optimizer.c_str(),
                static_cast<long long>(c.steps), before, after);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "finetune_gpt: %s\n", e.what());
    return 2;
  }
}
