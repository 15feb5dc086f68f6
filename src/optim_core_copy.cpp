// The optimizer core's host <-> device traffic (lspo/optim_core.h): gradients to the host on the
// D2H copy stream (with an event the engine's worker waits on), results back on the H2D copy stream
// (with an event the compute stream waits on, GPU-side). CPU tensors: plain copies, same code path.
#include <torch/csrc/autograd/variable.h>

#include "optim_core_internal.h"

#ifdef LSPO_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace lspo {

#ifdef LSPO_WITH_CUDA
namespace {

cudaStream_t current_stream(const torch::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void ensure_event(cuda::Event& e) {
  if (!e.get()) e = cuda::Event::create();
}

// The caching allocator must not hand `t`'s memory to anyone before the work queued on `s` is done.
void record_on(const torch::Tensor& t, cudaStream_t s) {
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(),
                                                c10::cuda::getStreamFromExternal(s, t.device().index()));
}

}  // namespace
#endif

void OptimizerCore::Impl::copy_to_host(CoreSlot& s, const torch::Tensor& src) {
  engine->wait(s.eslot);  // a queued or running (now stale) speculation may still read the buffer
  torch::Tensor buf = engine->grad_buffer(s.eslot);
  const double t0 = engine->now_us();
  if (src.is_cuda()) {
#ifdef LSPO_WITH_CUDA
    const int dev = src.device().index();
    c10::cuda::CUDAGuard guard(dev);
    if (!d2h.get()) {
      device = dev;
      d2h = cuda::Stream::create();
      h2d = cuda::Stream::create();
    }
    LSPO_CHECK(dev == device, opt.name, ": parameters on more than one CUDA device (", device, " and ", dev,
               ") are not supported by one optimizer");
    // on the compute stream: dtype/contiguity (no copy when both already fit)
    torch::Tensor c = src.reshape(-1).to(buf.scalar_type()).contiguous();
    ensure_event(s.compute_ready);
    s.compute_ready.record(current_stream(c));
    s.compute_ready.block(d2h.get());
    LSPO_CUDA_CHECK(cudaMemcpyAsync(buf.data_ptr(), c.data_ptr(), c.nbytes(), cudaMemcpyDeviceToHost, d2h.get()));
    record_on(c, d2h.get());
    ensure_event(s.d2h_done);
    s.d2h_done.record(d2h.get());
    s.d2h_pending = true;
    // Holding a reference makes autograd accumulate the next micro-batch out of place (AccumulateGrad
    // adds in place only into an unshared gradient), so the copy in flight reads unchanged memory.
    s.inflight = src;
#else
    LSPO_CHECK(false, opt.name, ": a CUDA tensor reached a build without CUDA");
#endif
  } else {
    buf.copy_(src.reshape(-1));
    engine->add_event("d2h", s.name, 2, t0, engine->now_us());
  }
  s.host_fresh = true;
  if (!s.projected) {
    s.grad_seen.emplace(src.getIntrusivePtr());
    s.grad_version = src._version();
  }
}

bool OptimizerCore::Impl::same_grad(const CoreSlot& s, const torch::Tensor& g) const {
  if (!s.grad_seen) return false;
  auto p = s.grad_seen->lock();
  return p.get() == g.unsafeGetTensorImpl() && g._version() == s.grad_version;
}

uintptr_t OptimizerCore::Impl::ready_event(CoreSlot& s) {
#ifdef LSPO_WITH_CUDA
  if (s.d2h_pending) return reinterpret_cast<uintptr_t>(s.d2h_done.get());
#endif
  return 0;
}

void OptimizerCore::Impl::wait_upload(CoreSlot& s) {
#ifdef LSPO_WITH_CUDA
  if (s.h2d_pending) {
    s.h2d_done.synchronize();  // the previous step's upload: long done by now
    s.h2d_pending = false;
  }
#endif
}

void OptimizerCore::Impl::before_acc_write(CoreSlot& s) {
#ifdef LSPO_WITH_CUDA
  if (s.d2h_pending && s.acc.is_cuda()) {
    c10::cuda::CUDAGuard guard(s.acc.device().index());
    s.d2h_done.block(current_stream(s.acc));  // GPU-side wait
  }
#endif
}

namespace {

#ifdef LSPO_WITH_CUDA
// Host `src` -> device `dst` (same dtype, contiguous) on the H2D stream after the compute stream's
// work so far; the compute stream then waits for the copy (GPU-side).
void upload(CoreSlot& s, cuda::Stream& h2d, const torch::Tensor& src, const torch::Tensor& dst) {
  c10::cuda::CUDAGuard guard(dst.device().index());
  cudaStream_t cur = current_stream(dst);
  ensure_event(s.compute_ready);
  s.compute_ready.record(cur);
  s.compute_ready.block(h2d.get());
  LSPO_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), src.nbytes(), cudaMemcpyHostToDevice, h2d.get()));
  record_on(dst, h2d.get());
  ensure_event(s.h2d_done);
  s.h2d_done.record(h2d.get());
  s.h2d_pending = true;
  s.h2d_done.block(cur);
}
#endif

}  // namespace

void OptimizerCore::Impl::finish(CoreSlot& s) { apply_result(s, engine->out_buffer(s.eslot)); }

void OptimizerCore::Impl::apply_result(CoreSlot& s, const torch::Tensor& out) {
  torch::Tensor p = part(s, s.param);  // data parallel: a split slot writes its range
  const double t0 = engine->now_us();
  if (s.projected) {
    torch::Tensor u = out.view({s.P.d, s.Q.d});
    if (p.is_cuda()) {
#ifdef LSPO_WITH_CUDA
      torch::Tensor ud = torch::empty({s.P.d, s.Q.d}, p.options().dtype(torch::kFloat));  // caching allocator
      upload(s, h2d, u, ud);
      u = ud;
#endif
    }
    const GroupHyper& h = hyper(s);
    if (h.weight_decay != 0.0) p.mul_(1.0 - h.lr * h.weight_decay);
    torch::Tensor w = p;
    apply_(w, s.P, s.Q, u, s.scale);
    if (!p.is_cuda()) engine->add_event("apply", s.name, 0, t0, engine->now_us());
    s.acc = torch::Tensor();  // freed between steps
    s.acc_count = 0;
  } else {
    if (p.is_cuda()) {
#ifdef LSPO_WITH_CUDA
      if (p.is_contiguous()) {
        upload(s, h2d, out, p);
        torch::autograd::impl::bump_version(p);  // an in-place change autograd must know about
      } else {
        torch::Tensor tmp = torch::empty({p.numel()}, p.options());
        upload(s, h2d, out, tmp);
        p.copy_(tmp.view(p.sizes()));
      }
#endif
    } else {
      p.copy_(out.view(p.sizes()));
      engine->add_event("h2d", s.name, 3, t0, engine->now_us());
    }
    s.param_version = p._version();
  }
  s.inflight = torch::Tensor();
}

}  // namespace lspo
