// OffloadEngine's disk tier: state in files is bitwise the state in host memory over N steps (odd
// sizes, several chunks, moments-only slots), resume from the directory, and an I/O error (a file
// size limit: the kernel refuses the write as it would on a full disk) gives a named error and
// leaves the committed and the durable state intact.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <torch/torch.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <type_traits>
#include <vector>

#include "lspo/common.h"
#include "lspo/engine.h"
#include "lspo/optim.h"

namespace {

using lspo::AdamConfig;
using lspo::EngineOptions;
using lspo::OffloadEngine;
using lspo::StateKind;

bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  if (a.numel() == 0) return true;
  auto ac = a.contiguous(), bc = b.contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.numel() * ac.element_size()) == 0;
}

// Flat directories only (the state directory has no subdirectories). POSIX, not std::filesystem:
// libtorch exports its own std::filesystem symbols, which crash when mixed with libstdc++'s.
std::vector<std::string> list_dir(const std::string& d) {
  std::vector<std::string> r;
  if (DIR* dp = ::opendir(d.c_str())) {
    while (dirent* e = ::readdir(dp))
      if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") r.push_back(e->d_name);
    ::closedir(dp);
  }
  return r;
}

void remove_tree(const std::string& d) {
  for (const auto& n : list_dir(d)) {
    const std::string p = d + "/" + n;
    struct stat st;
    if (::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) remove_tree(p);
    else ::unlink(p.c_str());
  }
  ::rmdir(d.c_str());
}

void copy_dir(const std::string& from, const std::string& to) {
  ::mkdir(to.c_str(), 0755);
  for (const auto& n : list_dir(from)) {
    std::ifstream in(from + "/" + n, std::ios::binary);
    std::ofstream out(to + "/" + n, std::ios::binary);
    out << in.rdbuf();
  }
}

bool exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

struct TempDir {
  std::string p;
  TempDir() {
    char tmpl[] = "/tmp/lspo_disk_XXXXXX";
    p = ::mkdtemp(tmpl);
  }
  ~TempDir() { remove_tree(p); }
  std::string sub(const std::string& s) const { return p + "/" + s; }
};

// Awkward sizes: empty, 1, odd, a chunk +- 1 (io_chunk_elems = 1024), several chunks + a tail.
const std::vector<int64_t> kSizes = {0, 1, 1023, 1025, 4097};
constexpr int64_t kMoments = 3001;  // a moments-only slot (the LSP compressed space)

void add_slots(OffloadEngine& e, torch::ScalarType gdt) {
  torch::manual_seed(3);
  for (size_t i = 0; i < kSizes.size(); ++i)
    e.add_slot("w" + std::to_string(i), torch::randn({kSizes[i]}), -1, gdt, torch::kBFloat16, int64_t(i));
  e.add_slot("moments", torch::Tensor(), kMoments, gdt, torch::kFloat, 99);
}

// Steps first..last with gradients drawn from a seed per step (the same for every engine).
void run_steps(OffloadEngine& e, int first, int last, bool persist = true) {
  for (int s = first; s <= last; ++s) {
    torch::manual_seed(100 + s);
    for (int64_t i = e.num_slots() - 1; i >= 0; --i) {
      e.grad_buffer(i).copy_(torch::randn({e.grad_buffer(i).numel()}));
      AdamConfig c;
      c.lr = 1e-2 / s;
      c.weight_decay = i < int64_t(kSizes.size()) ? 0.1 : 0.0;  // (moments-only: none)
      e.submit(i, c, s);
    }
    for (int64_t i = 0; i < e.num_slots(); ++i) e.commit(i);
    if (persist) e.persist();
  }
}

std::vector<torch::Tensor> snapshot(OffloadEngine& e) {
  std::vector<torch::Tensor> r;
  for (int64_t i = 0; i < e.num_slots(); ++i) {
    for (StateKind k : {StateKind::kMaster, StateKind::kExpAvg, StateKind::kExpAvgSq}) r.push_back(e.load_state(i, k));
    r.push_back(e.out_buffer(i).clone());
  }
  return r;
}

void expect_same(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(same_bits(a[i], b[i])) << "tensor " << i << " differs";
}

EngineOptions disk_opts(const std::string& dir, int64_t limit, bool overlap) {
  EngineOptions o;
  o.overlap = overlap;
  o.state_dir = dir;
  o.host_memory_limit_bytes = limit;
  o.io_chunk_elems = 1024;
  o.io_depth = 3;
  return o;
}

struct DiskCase {
  const char* name;
  torch::ScalarType gdt;
  bool overlap;
  int64_t limit;  // 0: every slot on disk; a middle value: some slots in host memory
};

class EngineDisk : public ::testing::TestWithParam<DiskCase> {};

// The host-memory reference: steps 1..last, no state_dir.
std::vector<torch::Tensor> ram_run(const DiskCase& c, int last) {
  EngineOptions o;
  o.overlap = c.overlap;
  OffloadEngine ram(o);
  add_slots(ram, c.gdt);
  run_steps(ram, 1, last, false);
  return snapshot(ram);
}

bool is_state(size_t i) { return i % 4 != 3; }  // snapshot(): 3 state arrays, then out_buffer

void expect_same_state(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    if (is_state(i)) EXPECT_TRUE(same_bits(a[i], b[i])) << "state " << i << " differs";
}

TEST_P(EngineDisk, BitwiseEqualToHostMemoryAndResumes) {
  const DiskCase& c = GetParam();
  TempDir td;
  {
    OffloadEngine disk(disk_opts(td.sub("st"), c.limit, c.overlap));
    add_slots(disk, c.gdt);
    if (c.limit == 0)
      for (int64_t i = 0; i < disk.num_slots(); ++i) EXPECT_TRUE(disk.on_disk(i));
    const auto st = disk.stats();
    EXPECT_GT(st.disk_slots, 0);
    if (c.limit > 0) {  // (a limit of 0: no state in host memory; the chunk buffers still exist)
      EXPECT_GT(st.host_state_bytes, 0);
      EXPECT_LE(st.host_state_bytes + st.io_buffer_bytes, c.limit);
    }
    EXPECT_EQ(st.io_buffer_bytes, 3 * 12 * 1024);  // io_depth 3 chunks of 3 x 1024 fp32
    run_steps(disk, 1, 4);
    expect_same(ram_run(c, 4), snapshot(disk));
    EXPECT_GT(disk.stats().io_bytes_written, 0);
    EXPECT_EQ(disk.stats().persists, 4);
    if (disk.on_disk(4)) EXPECT_THROW(disk.exp_avg(4), lspo::Error);
  }
  // resume with the same placement, and with every slot in host memory (placement may change)
  for (int64_t limit : {c.limit, int64_t(-1)}) {
    TempDir copy;
    copy_dir(td.sub("st"), copy.sub("st"));
    EngineOptions o = disk_opts(copy.sub("st"), limit, c.overlap);
    o.resume = true;
    OffloadEngine back(o);
    add_slots(back, c.gdt);
    for (int64_t i = 0; i < back.num_slots(); ++i) EXPECT_EQ(back.committed_step(i), 4);
    expect_same_state(ram_run(c, 4), snapshot(back));
    run_steps(back, 5, 6);
    expect_same(ram_run(c, 6), snapshot(back));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, EngineDisk,
    ::testing::Values(DiskCase{"AllOnDiskFp32Overlap", torch::kFloat, true, 0},
                      DiskCase{"AllOnDiskBf16Serial", torch::kBFloat16, false, 0},
                      DiskCase{"MixedBf16Overlap", torch::kBFloat16, true, 3 * 12 * 1024 + 2 * 24 * 1100}),
    [](const ::testing::TestParamInfo<DiskCase>& i) { return std::string(i.param.name); });

// A write the kernel refuses (RLIMIT_FSIZE: EFBIG, as ENOSPC on a full disk) fails the job with a
// named error; commit() has nothing to adopt; the committed state is unchanged and a resubmit
// works once the limit is lifted. A persist() that cannot write MANIFEST leaves the durable state.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    std::signal(SIGXFSZ, SIG_IGN);
    ::getrlimit(RLIMIT_FSIZE, &old_);
    rlimit l = old_;
    l.rlim_cur = bytes;
    ::setrlimit(RLIMIT_FSIZE, &l);
  }
  ~FileSizeLimit() { ::setrlimit(RLIMIT_FSIZE, &old_); }

 private:
  rlimit old_;
};

TEST(EngineDiskFault, WriteErrorKeepsCommittedAndDurableState) {
  TempDir td;
  OffloadEngine e(disk_opts(td.sub("st"), 0, true));
  add_slots(e, torch::kFloat);
  run_steps(e, 1, 2);
  const auto at2 = snapshot(e);
  AdamConfig cfg;
  e.grad_buffer(4).fill_(1.0f);
  {
    FileSizeLimit lim(8192);  // slot 4's generation (5 chunks of 12 KiB) cannot be written
    e.submit(4, cfg, 3);
    try {
      e.wait(4);
      ADD_FAILURE() << "the write did not fail";
    } catch (const lspo::Error& err) {
      const std::string m = err.what();
      EXPECT_NE(m.find("File too large"), std::string::npos) << m;
      EXPECT_NE(m.find("last committed state is intact"), std::string::npos) << m;
    }
    EXPECT_FALSE(e.has_result(4));
    EXPECT_THROW(e.commit(4), lspo::Error);
  }
  expect_same_state(at2, snapshot(e));
  e.submit(4, cfg, 3);  // the limit is lifted: the same step now goes through
  e.commit(4);
  EXPECT_EQ(e.committed_step(4), 3);

  // step 3 for everyone, committed in memory; MANIFEST cannot be written -> persist() throws
  run_steps(e, 3, 3, false);
  {
    FileSizeLimit lim(16);
    EXPECT_THROW(e.persist(), lspo::Error);
  }
  TempDir copy;
  copy_dir(td.sub("st"), copy.sub("st"));
  EngineOptions o = disk_opts(copy.sub("st"), 0, true);
  o.resume = true;
  OffloadEngine back(o);
  add_slots(back, torch::kFloat);
  for (int64_t i = 0; i < back.num_slots(); ++i) EXPECT_EQ(back.committed_step(i), 2);
  expect_same_state(at2, snapshot(back));
}

TEST(EngineDiskFault, ClearErrors) {
  TempDir td;
  EngineOptions o = disk_opts(td.sub("st"), 0, true);
  {
    OffloadEngine e(o);
    add_slots(e, torch::kFloat);
    run_steps(e, 1, 1);
  }
  EXPECT_THROW(OffloadEngine{o}, lspo::Error);  // a committed state exists and resume is off
  EngineOptions no_dir;
  no_dir.host_memory_limit_bytes = 100;
  OffloadEngine small(no_dir);
  EXPECT_THROW(small.add_slot("big", torch::randn({1000}), -1, torch::kFloat, torch::kFloat, 0), lspo::Error);
  o.resume = true;
  OffloadEngine back(o);
  EXPECT_THROW(back.add_slot("other", torch::randn({5}), -1, torch::kFloat, torch::kFloat, 0), lspo::Error);
}

// The C++ optimizers reach the disk tier through their options: OffloadAdamW and LSPAdamW with
// every state in files give bitwise the in-memory results (weights and state).
template <class Opt, class Options>
std::vector<torch::Tensor> optim_run(const std::string& dir) {
  torch::manual_seed(5);
  std::vector<torch::Tensor> ps = {torch::randn({33, 40}).requires_grad_(), torch::randn({7}).requires_grad_()};
  Options o(1e-2);
  if constexpr (std::is_same_v<Options, lspo::LSPAdamWOptions>) o.subspace(8).nnz(2).refit_every(2);
  if (!dir.empty()) o.state_dir(dir).host_memory_limit_bytes(0);
  Opt opt(ps, o);
  for (int s = 1; s <= 3; ++s) {
    torch::manual_seed(50 + s);
    for (auto& p : ps) p.mutable_grad() = torch::randn(p.sizes());
    opt.step();
  }
  std::vector<torch::Tensor> r;
  for (auto& p : ps) {
    r.push_back(p.detach().clone());
    r.push_back(opt.exp_avg(p));
    r.push_back(opt.exp_avg_sq(p));
  }
  return r;
}

TEST(EngineDiskOptim, OffloadAdamWAndLSPAdamWThroughOptions) {
  TempDir td;
  expect_same(optim_run<lspo::OffloadAdamW, lspo::OffloadAdamWOptions>(""),
              optim_run<lspo::OffloadAdamW, lspo::OffloadAdamWOptions>(td.sub("a")));
  EXPECT_TRUE(exists(td.sub("a") + "/MANIFEST"));
  expect_same(optim_run<lspo::LSPAdamW, lspo::LSPAdamWOptions>(""),
              optim_run<lspo::LSPAdamW, lspo::LSPAdamWOptions>(td.sub("b")));
}

// resume = true through the options: 3 steps into a directory, then fresh parameters (other
// values) and a new optimizer continue 2 steps; bitwise the 5 uninterrupted in-memory steps, the
// weights included (dense: from the masters; projected: from the projector file).
template <class Opt, class Options>
std::vector<torch::Tensor> optim_resume_run(const std::string& dir, int split) {
  auto make = [](uint64_t seed) {
    torch::manual_seed(seed);
    return std::vector<torch::Tensor>{torch::randn({33, 40}).requires_grad_(), torch::randn({7}).requires_grad_()};
  };
  auto opts = [&](bool resume) {
    Options o(1e-2);
    if constexpr (std::is_same_v<Options, lspo::LSPAdamWOptions>) o.subspace(8).nnz(2).refit_every(2);
    if (!dir.empty()) o.state_dir(dir).host_memory_limit_bytes(0).resume(resume);
    return o;
  };
  auto train = [](Opt& opt, std::vector<torch::Tensor>& ps, int from, int to) {
    for (int s = from; s <= to; ++s) {
      torch::manual_seed(50 + s);
      for (auto& p : ps) p.mutable_grad() = torch::randn(p.sizes());
      opt.step();
    }
  };
  auto ps = make(5);
  std::vector<torch::Tensor> r;
  {
    Opt opt(ps, opts(false));
    train(opt, ps, 1, split);
    if (dir.empty()) {
      train(opt, ps, split + 1, 5);
      for (auto& p : ps) r.insert(r.end(), {p.detach().clone(), opt.exp_avg(p), opt.exp_avg_sq(p)});
      return r;
    }
  }
  auto qs = make(6);
  Opt opt(qs, opts(true));
  train(opt, qs, split + 1, 5);
  for (auto& p : qs) r.insert(r.end(), {p.detach().clone(), opt.exp_avg(p), opt.exp_avg_sq(p)});
  return r;
}

TEST(EngineDiskOptim, ResumeThroughOptionsEqualsUninterrupted) {
  TempDir td;
  expect_same(optim_resume_run<lspo::OffloadAdamW, lspo::OffloadAdamWOptions>("", 3),
              optim_resume_run<lspo::OffloadAdamW, lspo::OffloadAdamWOptions>(td.sub("a"), 3));
  expect_same(optim_resume_run<lspo::LSPAdamW, lspo::LSPAdamWOptions>("", 3),
              optim_resume_run<lspo::LSPAdamW, lspo::LSPAdamWOptions>(td.sub("b"), 3));
  EXPECT_TRUE(exists(td.sub("b") + "/proj.s5.pt"));
  EXPECT_FALSE(exists(td.sub("b") + "/proj.s3.pt"));
}

}  // namespace
