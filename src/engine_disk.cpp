// The offload engine's state placement and disk tier (lspo/engine.h, lspo/state_store.h): host or
// file slots, the chunked read-ahead / write-behind stream through the fused Adam, load/store of
// committed state, persist() and resume.
#include <algorithm>
#include <cstring>

#include "engine_internal.h"
#include "lspo/engine.h"

namespace lspo {

namespace {
constexpr int64_t kF32 = 4;
}

void OffloadEngine::init_io() {
  if (reader_) return;
  const int64_t bytes = 3 * dir_->chunk_elems() * kF32;
  for (int64_t i = 0; i < opt_.io_depth; ++i) ring_.emplace_back(bytes);
  reader_ = std::make_unique<IoThread>();
  writer_ = std::make_unique<IoThread>();
  std::lock_guard<std::mutex> g(mu_);
  stats_.io_buffer_bytes = opt_.io_depth * io_round_up(bytes);
}

// Streams the slot's generation `src_gen` (none: < 0) chunk by chunk through fn(offset, count,
// chunk) into generation `dst_gen` (none: < 0). chunk holds [state 0 | state 1 | (state 2)] of
// `count` elements each. Reads run io_depth - 1 chunks ahead on reader_, writes behind on writer_;
// dst's fsync is queued behind its writes (ticket in s.last_sync: persist() waits for it).
void OffloadEngine::stream_slot(Slot& s, int64_t src_gen, int64_t dst_gen, const ChunkFn& fn) {
  std::lock_guard<std::mutex> io(io_mu_);
  init_io();
  const int64_t C = dir_->chunk_elems(), n = s.numel, nch = (n + C - 1) / C;
  const int64_t R = static_cast<int64_t>(ring_.size());
  std::unique_ptr<StateFile> src;
  std::shared_ptr<StateFile> dst;  // (shared with the fsync task queued at the end)
  if (src_gen >= 0) src = std::make_unique<StateFile>(dir_->gen_path(s.index, src_gen), StateFile::kRead, opt_.direct_io);
  if (dst_gen >= 0) dst = std::make_shared<StateFile>(dir_->gen_path(s.index, dst_gen), StateFile::kWrite, opt_.direct_io);
  auto count = [&](int64_t k) { return std::min(C, n - k * C); };
  auto nbytes = [&](int64_t k) { return io_round_up(s.nstate * count(k) * kF32); };
  auto offset = [&](int64_t k) { return k * s.nstate * C * kF32; };
  std::vector<uint64_t> rd(static_cast<size_t>(nch), 0), wr(static_cast<size_t>(nch), 0);
  auto issue_read = [&](int64_t k) {
    if (src) rd[k] = reader_->submit([&, k] { src->read(ring_[k % R].data(), nbytes(k), offset(k)); });
  };
  int64_t moved_r = 0, moved_w = 0;
  try {
    for (int64_t k = 0; k < std::min(R - 1, nch); ++k) issue_read(k);
    for (int64_t k = 0; k < nch; ++k) {
      if (src) reader_->wait(rd[k]), moved_r += nbytes(k);
      float* buf = ring_[k % R].data();
      fn(k * C, count(k), buf);
      if (dst) wr[k] = writer_->submit([&, k, buf] { dst->write(buf, nbytes(k), offset(k)); }), moved_w += nbytes(k);
      if (k + R - 1 < nch) {
        if (dst && k >= 1) writer_->wait(wr[k - 1]);  // its buffer is the one the next read fills
        issue_read(k + R - 1);
      }
    }
    if (dst)
      for (int64_t k = 0; k < nch; ++k) writer_->wait(wr[k]);
  } catch (...) {
    // no task may touch src, dst or the ring after we return: wait for ours, their errors dropped
    for (uint64_t t : rd)
      if (t) try { reader_->wait(t); } catch (...) {}
    for (uint64_t t : wr)
      if (t) try { writer_->wait(t); } catch (...) {}
    throw;
  }
  // durability is persist()'s business: the fsync runs behind, overlapped with the next slots
  s.last_sync = dst ? writer_->submit([dst] { dst->sync(); }) : 0;
  std::lock_guard<std::mutex> g(mu_);
  stats_.io_bytes_read += moved_r;
  stats_.io_bytes_written += moved_w;
}

void OffloadEngine::place_slot(Slot& s, const torch::Tensor& master) {
  const int64_t state_bytes = s.nstate * s.numel * kF32;  // one half
  const ManifestSlot* saved = nullptr;
  if (dir_ && opt_.resume) {
    auto it = dir_->resumed().find(s.index);
    LSPO_CHECK(it != dir_->resumed().end(), "OffloadEngine::add_slot('", s.name, "'): resuming from '",
               dir_->path(), "', which holds no state for slot ", s.index);
    saved = &it->second;
    LSPO_CHECK(saved->name == s.name && saved->numel == s.numel && saved->nstate == s.nstate,
               "OffloadEngine::add_slot: slot ", s.index, " is '", s.name, "' (", s.numel, " elements, ", s.nstate,
               " arrays) but state_dir holds '", saved->name, "' (", saved->numel, " elements, ", saved->nstate,
               " arrays)");
  }
  bool host;
  {
    std::lock_guard<std::mutex> g(mu_);
    const int64_t limit = opt_.host_memory_limit_bytes;
    const int64_t io_reserve = dir_ && limit >= 0 ? opt_.io_depth * io_round_up(3 * dir_->chunk_elems() * kF32) : 0;
    host = limit < 0 || stats_.host_state_bytes + 2 * state_bytes + io_reserve <= limit;
    LSPO_CHECK(host || dir_, "OffloadEngine::add_slot('", s.name, "'): its state (", 2 * state_bytes,
               " bytes) does not fit host_memory_limit_bytes (", limit, ", ", stats_.host_state_bytes,
               " used); set state_dir to keep state in files");
    if (host) stats_.host_state_bytes += 2 * state_bytes;
    else stats_.disk_state_bytes += state_bytes, stats_.disk_slots += 1;
  }
  s.disk = !host;
  auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(torch::kCPU);
  if (host) {
    for (int i = 0; i < 2; ++i) {
      if (s.nstate == 3) s.master[i] = torch::empty({s.numel}, f32);
      s.m[i] = torch::zeros({s.numel}, f32);
      s.v[i] = torch::zeros({s.numel}, f32);
    }
    if (saved) {
      stream_slot(s, saved->gen, -1, [&](int64_t off, int64_t c, float* buf) {
        torch::Tensor* dst[3] = {&s.master[0], &s.m[0], &s.v[0]};
        for (int k = 0, j = 3 - s.nstate; j < 3; ++j, ++k)
          std::memcpy(dst[j]->data_ptr<float>() + off, buf + k * c, c * kF32);
      });
    } else if (s.nstate == 3) {
      s.master[0].copy_(master.detach().reshape({-1}));
    }
  } else if (saved) {
    s.gen_committed = saved->gen;
    StateFile f(dir_->gen_path(s.index, saved->gen), StateFile::kRead, false);
    const int64_t C = dir_->chunk_elems(), full = s.numel / C, rest = s.numel % C;
    const int64_t want = full * s.nstate * C * kF32 + (rest ? io_round_up(s.nstate * rest * kF32) : 0);
    LSPO_CHECK(f.size() >= want, "OffloadEngine::add_slot('", s.name, "'): '", f.path(), "' has ", f.size(),
               " bytes, the slot needs ", want);
  } else {
    const torch::Tensor flat = master.defined() ? master.detach().reshape({-1}) : torch::Tensor();
    s.gen_committed = s.next_gen++;
    stream_slot(s, -1, s.gen_committed, [&](int64_t off, int64_t c, float* buf) {
      float* mv = buf;
      if (s.nstate == 3) {
        torch::from_blob(buf, {c}, f32).copy_(flat.slice(0, off, off + c));
        mv += c;
      }
      std::memset(mv, 0, 2 * c * kF32);
    });
    s.sync_ticket[0] = s.last_sync;
    s.synced = false;
  }
  if (saved) {
    s.step[0] = saved->step;
    s.gen_durable = saved->gen;
    s.next_gen = saved->gen + 1;
    s.dirty = false;
  }
}

void OffloadEngine::run_disk_job(Slot& s, const Job& job) {
  if (s.gen_spec >= 0) dir_->remove_gen(s.index, s.gen_spec);  // a speculation that was never committed
  s.gen_spec = s.next_gen++;
  const bool hm = s.nstate == 3;
  stream_slot(s, s.gen_committed, s.gen_spec, [&](int64_t off, int64_t c, float* buf) {
    AdamBuffers b = kernel_buffers(s, hm ? buf : nullptr, buf + (hm ? c : 0), buf + (hm ? 2 * c : c), off, c);
    adam_step(job.cfg, job.step, b);
  });
  s.sync_ticket[1] = s.last_sync;
}

// Index of a state kind inside a chunk (-1: the slot has no such array).
static int part_of(int nstate, StateKind kind) {
  const int k = static_cast<int>(kind);
  return nstate == 3 ? k : k - 1;
}

torch::Tensor OffloadEngine::load_state(int64_t slot, StateKind kind) {
  check_slot(slot, "load_state");
  wait(slot);
  Slot& s = *slots_[slot];
  if (!s.disk) {
    const torch::Tensor& t = kind == StateKind::kMaster ? s.master[0] : kind == StateKind::kExpAvg ? s.m[0] : s.v[0];
    return t.defined() ? t.clone() : torch::Tensor();
  }
  const int part = part_of(s.nstate, kind);
  if (part < 0) return torch::Tensor();
  torch::Tensor out = torch::empty({s.numel}, torch::TensorOptions().dtype(torch::kFloat));
  float* o = out.data_ptr<float>();
  stream_slot(s, s.gen_committed, -1,
              [&](int64_t off, int64_t c, float* buf) { std::memcpy(o + off, buf + part * c, c * kF32); });
  return out;
}

void OffloadEngine::store_state(int64_t slot, StateKind kind, const torch::Tensor& value) {
  check_slot(slot, "store_state");
  wait(slot);
  Slot& s = *slots_[slot];
  const int part = part_of(s.nstate, kind);
  LSPO_CHECK(part >= 0, "OffloadEngine::store_state('", s.name, "'): a moments-only slot has no master");
  LSPO_CHECK(value.numel() == s.numel, "OffloadEngine::store_state('", s.name, "'): ", value.numel(),
             " elements given, the slot has ", s.numel);
  const torch::Tensor v = value.detach().to(torch::kCPU, torch::kFloat).contiguous().view({-1});
  if (!s.disk) {
    (kind == StateKind::kMaster ? s.master[0] : kind == StateKind::kExpAvg ? s.m[0] : s.v[0]).copy_(v);
  } else {
    if (s.gen_spec >= 0) dir_->remove_gen(s.index, s.gen_spec);
    const int64_t gen = s.next_gen++;
    s.gen_spec = gen;  // (removed again if the stream fails half-way and the slot is resubmitted)
    const float* src = v.data_ptr<float>();
    stream_slot(s, s.gen_committed, gen,
                [&](int64_t off, int64_t c, float* buf) { std::memcpy(buf + part * c, src + off, c * kF32); });
    s.sync_ticket[0] = s.last_sync;
    const int64_t stale = s.gen_committed != s.gen_durable ? s.gen_committed : -1;
    s.gen_committed = gen;
    s.gen_spec = -1;
    s.synced = false;
    if (stale >= 0) dir_->remove_gen(s.index, stale);
  }
  std::lock_guard<std::mutex> g(mu_);
  s.dirty = true;
  s.result = false;
}

void OffloadEngine::persist() {
  if (!dir_) return;
  wait_all();
  std::vector<ManifestSlot> ms;
  std::vector<int64_t> fresh(slots_.size(), -1);  // host slots: the generation written now
  try {
    for (auto& sp : slots_) {
      Slot& s = *sp;
      ManifestSlot e{s.index, s.numel, s.nstate, s.gen_committed, s.step[0], s.name};
      if (s.disk) {
        if (!s.synced && s.sync_ticket[0]) writer_->wait(s.sync_ticket[0]);  // its queued fsync
        else if (!s.synced) StateFile(dir_->gen_path(s.index, s.gen_committed), StateFile::kRead, false).sync();
      } else if (s.dirty || s.gen_durable < 0) {
        e.gen = fresh[s.index] = s.next_gen++;
        stream_slot(s, -1, e.gen, [&](int64_t off, int64_t c, float* buf) {
          const torch::Tensor* src[3] = {&s.master[0], &s.m[0], &s.v[0]};
          for (int k = 0, j = 3 - s.nstate; j < 3; ++j, ++k)
            std::memcpy(buf + k * c, src[j]->data_ptr<float>() + off, c * kF32);
        });
        writer_->wait(s.last_sync);
      } else {
        e.gen = s.gen_durable;
      }
      ms.push_back(e);
    }
    dir_->write_manifest(ms);
  } catch (...) {
    for (size_t i = 0; i < fresh.size(); ++i)
      if (fresh[i] >= 0) dir_->remove_gen(static_cast<int64_t>(i), fresh[i]);
    throw;
  }
  // MANIFEST now names `ms`: older durable generations are garbage
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = *slots_[i];
    const int64_t old = s.gen_durable;
    s.gen_durable = ms[i].gen;
    s.synced = true;
    s.sync_ticket[0] = 0;
    s.dirty = false;
    if (old >= 0 && old != s.gen_durable && old != s.gen_committed) dir_->remove_gen(s.index, old);
  }
  if (opt_.resume && stats_.persists == 0) {  // leftovers of the run that crashed
    std::map<int64_t, std::vector<int64_t>> keep;
    for (auto& sp : slots_) keep[sp->index] = {sp->gen_durable, sp->gen_committed, sp->gen_spec};
    dir_->remove_unlisted(keep);
  }
  std::lock_guard<std::mutex> g(mu_);
  stats_.persists += 1;
}

}  // namespace lspo
