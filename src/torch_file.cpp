// Plain values as torch.save files (lspo/torch_file.h).
#include "lspo/torch_file.h"

#include <caffe2/serialize/inline_container.h>
#include <fcntl.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/serialize.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "lspo/common.h"
#include "lspo/state_store.h"

namespace lspo {

std::vector<char> torch_file_bytes(const c10::IValue& v) {
  std::vector<char> pickled;
  torch::jit::Pickler pickler([&](const char* b, size_t n) { pickled.insert(pickled.end(), b, b + n); }, nullptr,
                              nullptr, nullptr, nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(v);
  pickler.stop();
  std::vector<char> out;
  caffe2::serialize::PyTorchStreamWriter writer([&](const void* b, size_t n) {
    out.insert(out.end(), static_cast<const char*>(b), static_cast<const char*>(b) + n);
    return n;
  });
  torch::jit::writeArchiveAndTensors("data", pickled.data(), pickled.size(), pickler.tensorData(), writer);
  writer.writeEndOfFile();
  return out;
}

void save_torch_file(const c10::IValue& value, const std::string& path, bool durable) {
  std::vector<char> bytes = torch_file_bytes(value);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    LSPO_CHECK(f.good(), "save_torch_file: cannot open '", tmp, "' for writing");
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    f.flush();
    LSPO_CHECK(f.good(), "save_torch_file: writing '", tmp, "' failed (disk full?)");
  }
  if (durable) {
    const int fd = ::open(tmp.c_str(), O_RDONLY);
    LSPO_CHECK(fd >= 0, "save_torch_file: cannot reopen '", tmp, "' to sync it: ", std::strerror(errno));
    const int r = ::fsync(fd);
    const int e = errno;
    ::close(fd);
    LSPO_CHECK(r == 0, "save_torch_file: fsync of '", tmp, "' failed: ", std::strerror(e));
  }
  LSPO_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "save_torch_file: renaming '", tmp, "' to '", path,
             "' failed");  // a crash leaves the old file or the new one, never half of one
  if (durable) {
    const std::string dir = std::filesystem::path(path).parent_path().string();
    fsync_dir(dir.empty() ? "." : dir);
  }
}

c10::IValue load_torch_file(const std::string& path, const std::string& who) {
  std::ifstream f(path, std::ios::binary);
  LSPO_CHECK(f.good(), who, ": cannot open '", path, "'");
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  try {
    return torch::pickle_load(bytes);
  } catch (const std::exception& e) {
    LSPO_CHECK(false, who, ": '", path, "' is not a readable checkpoint (", e.what(), ")");
  }
  return c10::IValue();
}

}  // namespace lspo
