// python/src/tensor_checks.h -- the one place where the bindings turn torch tensors into raw
// pointers for lspo's torch-free kernels, and check them first. Every check names the function
// and the argument at fault and throws lspo::Error (lspo.LspoError in Python):
//   "adam_step: argument 'grad' must be a CPU tensor, got device cuda:0"
// Use: auto g = lspo::tensor_checks::Arg(grad, "adam_step", "grad")
//                  .device(c10::DeviceType::CPU).contiguous().dtype({DType::kFloat32, ...}).numel(n);
//      g.ptr(), g.lspo_dtype()
#pragma once
#include <torch/extension.h>

#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "lspo/common.h"

namespace lspo {
namespace tensor_checks {

// torch's user-facing dtype name ("torch.bfloat16").
inline std::string torch_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// lspo::DType of a torch dtype; false when lspo's kernels have no such element type.
inline bool to_lspo_dtype(at::ScalarType t, DType* out) {
  switch (t) {
    case at::kFloat: *out = DType::kFloat32; return true;
    case at::kBFloat16: *out = DType::kBFloat16; return true;
    case at::kHalf: *out = DType::kFloat16; return true;
    default: return false;
  }
}

inline std::string lspo_dtype_list(std::initializer_list<DType> allowed) {
  std::string s;
  size_t i = 0;
  for (DType d : allowed) {
    if (i) s += (i + 1 == allowed.size()) ? " or " : ", ";
    s += d == DType::kFloat32 ? "torch.float32" : d == DType::kBFloat16 ? "torch.bfloat16" : "torch.float16";
    ++i;
  }
  return s;
}

// One checked argument. Methods chain; each throws lspo::Error naming `fn` and `name`.
class Arg {
 public:
  Arg(const at::Tensor& t, const char* fn, const char* name) : t_(t), fn_(fn), name_(name) {
    LSPO_CHECK(t_.defined(), fn_, ": argument '", name_, "' is an undefined tensor");
    LSPO_CHECK(t_.layout() == at::kStrided, fn_, ": argument '", name_, "' must be a dense (strided) tensor, got layout ",
               t_.layout());
  }

  Arg& device(c10::DeviceType type) {
    LSPO_CHECK(t_.device().type() == type, fn_, ": argument '", name_, "' must be a ", c10::DeviceTypeName(type),
               " tensor, got device ", t_.device().str());
    return *this;
  }
  Arg& contiguous() {
    LSPO_CHECK(t_.is_contiguous(), fn_, ": argument '", name_, "' must be contiguous (got sizes ", t_.sizes(),
               ", strides ", t_.strides(), "); call .contiguous() first");
    return *this;
  }
  // The element type must be one of `allowed` (lspo kernel types).
  Arg& dtype(std::initializer_list<DType> allowed) {
    DType d;
    bool ok = to_lspo_dtype(t_.scalar_type(), &d);
    if (ok) {
      ok = false;
      for (DType a : allowed) ok = ok || a == d;
    }
    LSPO_CHECK(ok, fn_, ": argument '", name_, "' has dtype ", torch_dtype_name(t_.scalar_type()),
               ", expected ", lspo_dtype_list(allowed));
    dtype_ = d;
    return *this;
  }
  Arg& numel(int64_t n, const char* like) {
    LSPO_CHECK(t_.numel() == n, fn_, ": argument '", name_, "' has ", t_.numel(), " elements (sizes ", t_.sizes(),
               ") but '", like, "' has ", n);
    return *this;
  }
  Arg& sizes(at::IntArrayRef s, const char* like) {
    LSPO_CHECK(t_.sizes() == s, fn_, ": argument '", name_, "' has sizes ", t_.sizes(), " but '", like, "' has ", s);
    return *this;
  }
  const at::Tensor& tensor() const { return t_; }
  const char* name() const { return name_; }
  DType lspo_dtype() const { return dtype_; }
  int64_t numel() const { return t_.numel(); }
  void* ptr() const { return t_.numel() ? t_.data_ptr() : nullptr; }
  template <typename T>
  T* ptr_as() const { return static_cast<T*>(ptr()); }
  // Byte range [begin, end) of the elements.
  std::pair<const char*, const char*> byte_range() const {
    const char* b = static_cast<const char*>(ptr());
    return {b, b + t_.numel() * static_cast<int64_t>(t_.element_size())};
  }

 private:
  at::Tensor t_;
  const char* fn_;
  const char* name_;
  DType dtype_ = DType::kFloat32;
};

// The arguments' element ranges must not overlap (in-place kernels read and write them freely).
inline void check_no_overlap(const char* fn, std::initializer_list<const Arg*> args) {
  std::vector<const Arg*> v(args);
  for (size_t i = 0; i < v.size(); ++i)
    for (size_t j = i + 1; j < v.size(); ++j) {
      auto a = v[i]->byte_range(), b = v[j]->byte_range();
      bool overlap = a.first < b.second && b.first < a.second;
      LSPO_CHECK(!overlap, fn, ": arguments '", v[i]->name(), "' and '", v[j]->name(), "' share memory");
    }
}

}  // namespace tensor_checks
}  // namespace lspo
