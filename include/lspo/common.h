// lspo/common.h -- error type, check macros and the element types lspo's kernels understand.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace lspo {

// Every error lspo raises. The message names the file, the line and the failed expression.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
[[noreturn]] void throw_error(const char* file, int line, const char* expr, const std::string& msg);

inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  append(os, args...);
  return os.str();
}
}  // namespace detail

// Element types of raw buffers at kernel boundaries.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
const char* dtype_name(DType t);
inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace lspo

// LSPO_CHECK(cond, message parts...): throws lspo::Error("file:line: check `cond` failed: msg").
#define LSPO_CHECK(cond, ...)                                                                   \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      ::lspo::detail::throw_error(__FILE__, __LINE__, #cond, ::lspo::detail::concat(__VA_ARGS__)); \
    }                                                                                           \
  } while (0)
