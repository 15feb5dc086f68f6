#include "lspo/common.h"

namespace lspo {
namespace detail {
void throw_error(const char* file, int line, const char* expr, const std::string& msg) {
  std::ostringstream os;
  os << "lspo: " << msg << " (check `" << expr << "` failed at " << file << ":" << line << ")";
  throw Error(os.str());
}
}  // namespace detail

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "unknown";
}
}  // namespace lspo
