// lspo/torch_file.h -- plain values (dicts, lists, tuples, tensors, numbers, strings) as torch.save
// files that torch.load(path, weights_only=True) reads: the checkpoints of both optimizer faces and
// the projector files of the state directory.
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

namespace lspo {

// The bytes of torch.save's file format for a plain value, without the TorchScript type tags
// torch::pickle_save adds (torch.load(weights_only=True) refuses those).
std::vector<char> torch_file_bytes(const c10::IValue& value);

// Writes `value` to `path` atomically (a temporary file renamed into place: a crash leaves the old
// file or the new one, never half of one). `durable`: the temporary file is fsynced before the
// rename and the directory after it, so the new file survives a crash once this returns.
void save_torch_file(const c10::IValue& value, const std::string& path, bool durable = false);

// Reads such a file; lspo::Error "<who>: cannot open '<path>'" or "<who>: '<path>' is not a readable
// checkpoint (<reason>)".
c10::IValue load_torch_file(const std::string& path, const std::string& who);

}  // namespace lspo
