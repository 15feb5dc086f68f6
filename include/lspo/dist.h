// lspo/dist.h -- data parallelism for the optimizer core (lspo/optim_core.h): the collectives the
// core needs at the step boundary, as an interface a face implements on torch.distributed (c10d:
// gloo on CPU, NCCL on GPU; python/lspo/distributed.py). lspo has no transport of its own.
//
// With a Communicator set, every slot has an owner rank (balanced by host-state bytes, in
// registration order: the same on every rank). Per step (docs/distributed.md):
//   1. every rank checks that the same slots hold gradients (one small all-reduce);
//   2. the gradients are summed onto their owners (reduce; projected slots send the compressed S
//      [dP, dQ], dense ones the gradient, a refit step's projected slots their dense gradient, which
//      the owner's fit needs) and averaged there;
//   3. owners measure norms, the per-slot norms and the non-finite flags are all-reduced (a zero
//      from non-owners), so every rank sees the same global norm, clipping factor and skip;
//   4. owners refit and broadcast the projector values (and the refit record);
//   5. owners run Adam on their slots only (host state exists only for owned slots) and broadcast
//      the result -- the update u [dP, dQ] of a projected slot, the new weights of a dense one --
//      which every other rank applies to its copy of the weights.
// Ranks hold identical weights and projectors after every step (weights are broadcast from rank 0
// when the communicator is set). Speculation is off under data parallel (a local gradient is not the
// one Adam must see).
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace lspo {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t world_size() const = 0;
  // tensors[i] (contiguous) summed over every rank into tensors[i] on rank owners[i]; on the other
  // ranks tensors[i] is left unchanged. Every rank passes the same shapes, dtypes and owners in the
  // same order. `what` names the collective in errors.
  virtual void reduce_sum(const std::vector<torch::Tensor>& tensors, const std::vector<int64_t>& owners,
                          const std::string& what) = 0;
  // tensors[i] on every rank takes rank owners[i]'s values (in place).
  virtual void broadcast(const std::vector<torch::Tensor>& tensors, const std::vector<int64_t>& owners,
                         const std::string& what) = 0;
  // A small host tensor summed over every rank, in place, on every rank.
  virtual void all_reduce_sum(const torch::Tensor& t, const std::string& what) = 0;
};

// The owner of the next slot: the rank with the least load so far (the lowest rank on ties).
int64_t least_loaded(const std::vector<int64_t>& load);

}  // namespace lspo
