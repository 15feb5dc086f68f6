// lspo/state_store.h -- the disk tier of the offload engine: optimizer state in files.
//
// A state directory holds, per engine slot, generation files `s<slot>.g<gen>.bin` and one
// `MANIFEST` naming, for every slot, the generation and step that are durable. A generation file
// is the slot's fp32 state cut into chunks of `chunk_elems` elements; chunk k holds the chunk's
// [master | exp_avg | exp_avg_sq] (moments-only slots: [exp_avg | exp_avg_sq]) back to back and
// starts at byte k * nstate * chunk_elems * 4. Every chunk's byte length is rounded up to 4 KiB,
// so reads and writes can use O_DIRECT (page cache bypassed) where the file system allows it.
//
// Atomicity: generation files are written, never modified; write_manifest() fsyncs a temporary
// manifest, renames it over MANIFEST and fsyncs the directory. A crash at any point therefore
// leaves MANIFEST naming either every old or every new generation, and files it names are only
// deleted after a newer MANIFEST is durable (the engine's job, see engine.h).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace lspo {

constexpr int64_t kIoAlign = 4096;
// fsyncs a directory (a rename or unlink in it becomes durable); lspo::Error naming it otherwise.
void fsync_dir(const std::string& dir);

inline int64_t io_round_up(int64_t bytes) { return (bytes + kIoAlign - 1) / kIoAlign * kIoAlign; }

// A kIoAlign-aligned heap buffer (RAII).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(int64_t bytes);
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  float* data() const { return static_cast<float*>(p_); }
  int64_t bytes() const { return n_; }

 private:
  void* p_ = nullptr;
  int64_t n_ = 0;
};

// An open state file (RAII). Opened with O_DIRECT when `direct` and the file system accepts it.
// Every error throws lspo::Error naming the file and the system's reason (e.g. "No space left on
// device"); a short read is an error ("file ends early").
class StateFile {
 public:
  enum Mode { kRead, kWrite };  // kWrite creates or truncates
  StateFile(const std::string& path, Mode mode, bool direct);
  ~StateFile();
  StateFile(const StateFile&) = delete;
  StateFile& operator=(const StateFile&) = delete;
  void read(void* buf, int64_t bytes, int64_t offset) const;
  void write(const void* buf, int64_t bytes, int64_t offset) const;
  void sync() const;  // fdatasync
  int64_t size() const;
  bool direct() const { return direct_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
  bool direct_ = false;
};

// One I/O thread running tasks in submission order (read-ahead or write-behind). submit() returns a
// ticket; wait(ticket) blocks until that task ran and rethrows its exception; drain() waits for
// everything and forgets any errors (used to quiesce before rethrowing the first one).
class IoThread {
 public:
  IoThread();
  ~IoThread();
  IoThread(const IoThread&) = delete;
  IoThread& operator=(const IoThread&) = delete;
  uint64_t submit(std::function<void()> fn);
  void wait(uint64_t ticket);
  void drain();

 private:
  void loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<uint64_t, std::function<void()>>> q_;
  std::map<uint64_t, std::exception_ptr> errors_;
  uint64_t next_ = 1, done_ = 0;
  bool stop_ = false;
  std::thread th_;
};

// The directory: file names, the manifest, cleanup.
struct ManifestSlot {
  int64_t index = 0, numel = 0, nstate = 0, gen = 0, step = 0;
  std::string name;
};

class StateDir {
 public:
  // Creates `path` if missing. With resume=false an existing MANIFEST is an error (the caller
  // would silently overwrite a checkpoint); stray generation files of an unfinished run are removed.
  StateDir(const std::string& path, bool resume, int64_t chunk_elems);
  const std::string& path() const { return path_; }
  int64_t chunk_elems() const { return chunk_elems_; }
  std::string gen_path(int64_t slot, int64_t gen) const;
  // The manifest read at construction (resume): slot index -> entry; empty otherwise.
  const std::map<int64_t, ManifestSlot>& resumed() const { return resumed_; }
  // Atomically replaces MANIFEST (temporary file, fsync, rename, fsync of the directory).
  void write_manifest(const std::vector<ManifestSlot>& slots) const;
  void remove_gen(int64_t slot, int64_t gen) const;  // ignores a missing file
  // Removes every generation file not named in `keep` (slot -> generations to keep).
  void remove_unlisted(const std::map<int64_t, std::vector<int64_t>>& keep) const;

 private:
  std::string path_;
  int64_t chunk_elems_;
  std::map<int64_t, ManifestSlot> resumed_;
};

// Reads a manifest (throws a named error on a malformed one); returns false if none exists.
bool read_manifest(const std::string& dir, int64_t* chunk_elems, std::map<int64_t, ManifestSlot>* slots);

}  // namespace lspo
