// The disk tier's files (lspo/state_store.h): aligned buffers, O_DIRECT files, I/O threads, the
// state directory and its atomically replaced manifest.
#include "lspo/state_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "lspo/common.h"

namespace lspo {

namespace {
std::string sys_error() { return std::strerror(errno); }
const char* kManifest = "MANIFEST";
const char* kManifestTmp = "MANIFEST.tmp";
const char* kMagic = "lspo-state-dir";
constexpr int kVersion = 1;

// Parses "s<slot>.g<gen>.bin"; false for any other name.
bool parse_gen_name(const std::string& n, int64_t* slot, int64_t* gen) {
  long long s = -1, g = -1;
  int used = 0;
  if (std::sscanf(n.c_str(), "s%lld.g%lld.bin%n", &s, &g, &used) != 2) return false;
  if (used != static_cast<int>(n.size()) || s < 0 || g < 0) return false;
  *slot = s;
  *gen = g;
  return true;
}

}  // namespace

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  LSPO_CHECK(fd >= 0, "state_dir: cannot open directory '", dir, "' to sync it: ", sys_error());
  int r = ::fsync(fd);
  int e = errno;
  ::close(fd);
  errno = e;
  LSPO_CHECK(r == 0, "state_dir: fsync of directory '", dir, "' failed: ", sys_error());
}

// ---------------------------------------------------------------- AlignedBuffer
AlignedBuffer::AlignedBuffer(int64_t bytes) : n_(io_round_up(bytes)) {
  if (n_ == 0) return;
  p_ = std::aligned_alloc(kIoAlign, static_cast<size_t>(n_));
  LSPO_CHECK(p_ != nullptr, "state_dir: cannot allocate an I/O buffer of ", n_, " bytes");
}
AlignedBuffer::~AlignedBuffer() { std::free(p_); }
AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& o) noexcept {
  if (this != &o) {
    std::free(p_);
    p_ = o.p_;
    n_ = o.n_;
    o.p_ = nullptr;
    o.n_ = 0;
  }
  return *this;
}

// ---------------------------------------------------------------- StateFile
StateFile::StateFile(const std::string& path, Mode mode, bool direct) : path_(path) {
  const int flags = mode == kRead ? O_RDONLY : (O_WRONLY | O_CREAT | O_TRUNC);
  if (direct) {
    fd_ = ::open(path.c_str(), flags | O_DIRECT | O_CLOEXEC, 0644);
    direct_ = fd_ >= 0;
    if (fd_ < 0) LSPO_CHECK(errno == EINVAL, "state_dir: cannot open '", path, "': ", sys_error());
  }
  if (fd_ < 0) fd_ = ::open(path.c_str(), flags | O_CLOEXEC, 0644);  // no O_DIRECT here (tmpfs, ...)
  LSPO_CHECK(fd_ >= 0, "state_dir: cannot open '", path, "' for ", mode == kRead ? "reading" : "writing", ": ",
             sys_error());
}

StateFile::~StateFile() {
  if (fd_ >= 0) ::close(fd_);
}

void StateFile::read(void* buf, int64_t bytes, int64_t offset) const {
  char* p = static_cast<char*>(buf);
  while (bytes > 0) {
    ssize_t r = ::pread(fd_, p, static_cast<size_t>(bytes), offset);
    if (r < 0 && errno == EINTR) continue;
    LSPO_CHECK(r >= 0, "state_dir: reading '", path_, "' at byte ", offset, " failed: ", sys_error());
    LSPO_CHECK(r > 0, "state_dir: '", path_, "' ends early (", bytes, " bytes missing at byte ", offset,
               "): the file is truncated or not a state file of this slot");
    p += r;
    bytes -= r;
    offset += r;
  }
}

void StateFile::write(const void* buf, int64_t bytes, int64_t offset) const {
  const char* p = static_cast<const char*>(buf);
  while (bytes > 0) {
    ssize_t r = ::pwrite(fd_, p, static_cast<size_t>(bytes), offset);
    if (r < 0 && errno == EINTR) continue;
    LSPO_CHECK(r > 0, "state_dir: writing ", bytes, " bytes to '", path_, "' at byte ", offset, " failed: ",
               r < 0 ? sys_error() : std::string("nothing written"), " (the last committed state is intact)");
    p += r;
    bytes -= r;
    offset += r;
  }
}

void StateFile::sync() const {
  LSPO_CHECK(::fdatasync(fd_) == 0, "state_dir: fdatasync of '", path_, "' failed: ", sys_error());
}

int64_t StateFile::size() const {
  struct stat st;
  LSPO_CHECK(::fstat(fd_, &st) == 0, "state_dir: stat of '", path_, "' failed: ", sys_error());
  return st.st_size;
}

// ---------------------------------------------------------------- IoThread
IoThread::IoThread() : th_([this] { loop(); }) {}

IoThread::~IoThread() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  th_.join();
}

uint64_t IoThread::submit(std::function<void()> fn) {
  uint64_t t;
  {
    std::lock_guard<std::mutex> g(mu_);
    t = next_++;
    q_.emplace_back(t, std::move(fn));
  }
  cv_.notify_all();
  return t;
}

void IoThread::loop() {
  for (;;) {
    std::pair<uint64_t, std::function<void()>> task;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return stop_ || !q_.empty(); });
      if (q_.empty()) return;
      task = std::move(q_.front());
      q_.pop_front();
    }
    std::exception_ptr err;
    try {
      task.second();
    } catch (...) {
      err = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      if (err) errors_[task.first] = err;
      done_ = task.first;
    }
    cv_.notify_all();
  }
}

void IoThread::wait(uint64_t ticket) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return done_ >= ticket; });
  auto it = errors_.find(ticket);
  if (it != errors_.end()) {
    std::exception_ptr e = it->second;
    errors_.erase(it);
    std::rethrow_exception(e);
  }
}

void IoThread::drain() {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return done_ + 1 == next_; });
  errors_.clear();
}

// ---------------------------------------------------------------- StateDir
bool read_manifest(const std::string& dir, int64_t* chunk_elems, std::map<int64_t, ManifestSlot>* slots) {
  const std::string path = dir + "/" + kManifest;
  std::ifstream in(path);
  if (!in) return false;
  std::string magic;
  int version = 0;
  int64_t n = -1;
  std::string key;
  in >> magic >> version >> key >> *chunk_elems;
  LSPO_CHECK(in && magic == kMagic && key == "chunk_elems", "state_dir: '", path, "' is not an lspo manifest");
  LSPO_CHECK(version == kVersion, "state_dir: '", path, "' has version ", version, ", this build reads ", kVersion);
  in >> key >> n;
  LSPO_CHECK(in && key == "slots" && n >= 0, "state_dir: malformed manifest '", path, "' (slot count)");
  slots->clear();
  for (int64_t i = 0; i < n; ++i) {
    ManifestSlot s;
    in >> key >> s.index >> s.numel >> s.nstate >> s.gen >> s.step;
    LSPO_CHECK(in && key == "slot", "state_dir: malformed manifest '", path, "' (slot line ", i, ")");
    in.get();  // the space before the name
    std::getline(in, s.name);
    (*slots)[s.index] = s;
  }
  in >> key;
  LSPO_CHECK(in && key == "end", "state_dir: manifest '", path, "' is incomplete");
  return true;
}

StateDir::StateDir(const std::string& path, bool resume, int64_t chunk_elems) : path_(path), chunk_elems_(chunk_elems) {
  LSPO_CHECK(!path.empty(), "state_dir: empty path");
  if (::mkdir(path.c_str(), 0755) != 0)
    LSPO_CHECK(errno == EEXIST, "state_dir: cannot create '", path, "': ", sys_error());
  int64_t ce = 0;
  std::map<int64_t, ManifestSlot> slots;
  const bool have = read_manifest(path, &ce, &slots);
  if (resume) {
    LSPO_CHECK(have, "state_dir: resume requested but '", path, "' holds no MANIFEST (nothing was committed)");
    chunk_elems_ = ce;  // the files were cut with the manifest's chunk size
    resumed_ = std::move(slots);
  } else {
    LSPO_CHECK(!have, "state_dir: '", path, "' already holds a committed optimizer state; pass resume=true to "
                      "continue from it or use an empty directory");
    remove_unlisted({});
  }
}

std::string StateDir::gen_path(int64_t slot, int64_t gen) const {
  return path_ + "/s" + std::to_string(slot) + ".g" + std::to_string(gen) + ".bin";
}

void StateDir::write_manifest(const std::vector<ManifestSlot>& slots) const {
  std::ostringstream os;
  os << kMagic << " " << kVersion << "\nchunk_elems " << chunk_elems_ << "\nslots " << slots.size() << "\n";
  for (const auto& s : slots)
    os << "slot " << s.index << " " << s.numel << " " << s.nstate << " " << s.gen << " " << s.step << " " << s.name
       << "\n";
  os << "end\n";
  const std::string text = os.str();
  const std::string tmp = path_ + "/" + kManifestTmp;
  {
    StateFile f(tmp, StateFile::kWrite, false);
    f.write(text.data(), static_cast<int64_t>(text.size()), 0);
    f.sync();
  }
  LSPO_CHECK(::rename(tmp.c_str(), (path_ + "/" + kManifest).c_str()) == 0, "state_dir: renaming '", tmp,
             "' to MANIFEST failed: ", sys_error(), " (the last committed state is intact)");
  fsync_dir(path_);
}

void StateDir::remove_gen(int64_t slot, int64_t gen) const {
  const std::string p = gen_path(slot, gen);
  LSPO_CHECK(::unlink(p.c_str()) == 0 || errno == ENOENT, "state_dir: cannot remove '", p, "': ", sys_error());
}

void StateDir::remove_unlisted(const std::map<int64_t, std::vector<int64_t>>& keep) const {
  DIR* d = ::opendir(path_.c_str());
  LSPO_CHECK(d != nullptr, "state_dir: cannot list '", path_, "': ", sys_error());
  std::vector<std::pair<int64_t, int64_t>> drop;
  while (dirent* e = ::readdir(d)) {
    int64_t s, g;
    if (!parse_gen_name(e->d_name, &s, &g)) continue;
    auto it = keep.find(s);
    bool kept = false;
    if (it != keep.end())
      for (int64_t k : it->second) kept = kept || k == g;
    if (!kept) drop.emplace_back(s, g);
  }
  ::closedir(d);
  for (const auto& sg : drop) remove_gen(sg.first, sg.second);
}

}  // namespace lspo
