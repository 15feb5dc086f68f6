// src/projector_column_index.cpp -- host-side build of a projector's column index (see
// src/projector_kernels.h). Plain C++, compiled in every build so that it is tested without a GPU.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "projector_kernels.h"

namespace lspo::detail {

ColumnIndexHost build_column_index(const int32_t* idx, int64_t n, int64_t r, int64_t d, int64_t chunk) {
  LSPO_CHECK(n >= 0 && r >= 1 && d >= 1 && chunk >= 1, "build_column_index: need n >= 0, r >= 1, d >= 1, chunk >= 1 ",
             "(got n = ", n, ", r = ", r, ", d = ", d, ", chunk = ", chunk, ")");
  LSPO_CHECK(r <= d, "build_column_index: r = ", r, " nonzeros per row cannot exceed d = ", d);
  LSPO_CHECK(n <= std::numeric_limits<int32_t>::max() / r, "build_column_index: n * r = ", n, " * ", r,
             " does not fit 32-bit indices");
  LSPO_CHECK(d <= std::numeric_limits<int32_t>::max(), "build_column_index: d = ", d, " does not fit 32 bits");
  const int64_t nnz = n * r;
  ColumnIndexHost h;
  h.n = n;
  h.r = r;
  h.d = d;
  h.chunk = chunk;
  h.nchunks = (n + chunk - 1) / chunk;

  // Range check, duplicate check and the per-row column order (for cuSPARSE's sorted CSR).
  std::vector<int32_t> order(static_cast<size_t>(r));
  h.csr_pos.resize(size_t(nnz));
  for (int64_t j = 0; j < n; ++j) {
    const int32_t* row = idx + j * r;
    for (int64_t t = 0; t < r; ++t) {
      LSPO_CHECK(row[t] >= 0 && row[t] < d, "projector index ", row[t], " at row ", j, ", slot ", t,
                 " is outside [0, d = ", d, ")");
      order[size_t(t)] = int32_t(t);
    }
    std::sort(order.begin(), order.end(), [row](int32_t a, int32_t b) { return row[a] < row[b]; });
    for (int64_t t = 0; t < r; ++t) {
      const int32_t s = order[size_t(t)];
      LSPO_CHECK(t == 0 || row[order[size_t(t - 1)]] != row[s], "projector row ", j, " repeats column ", row[s]);
      if (s != t) h.rows_sorted = false;
      h.csr_pos[size_t(j * r + t)] = int32_t(j * r + s);
    }
  }
  if (h.rows_sorted) {
    h.csr_pos.clear();
  } else {
    h.csr_col.resize(size_t(nnz));
    for (int64_t q = 0; q < nnz; ++q) h.csr_col[size_t(q)] = idx[h.csr_pos[size_t(q)]];
  }

  // Counting sort by column; a column's entries keep ascending slot order, hence ascending row.
  h.colptr.assign(size_t(d + 1), 0);
  for (int64_t p = 0; p < nnz; ++p) ++h.colptr[size_t(idx[p]) + 1];
  for (int64_t c = 0; c < d; ++c) h.colptr[size_t(c + 1)] += h.colptr[size_t(c)];
  std::vector<int32_t> next(h.colptr.begin(), h.colptr.end() - 1);
  h.rows.resize(size_t(nnz));
  h.pos.resize(size_t(nnz));
  for (int64_t p = 0; p < nnz; ++p) {
    const int32_t q = next[size_t(idx[p])]++;
    h.rows[size_t(q)] = int32_t(p / r);
    h.pos[size_t(q)] = int32_t(p);
  }

  // Chunk boundaries inside every column.
  const int64_t stride = h.nchunks + 1;
  h.segptr.resize(size_t(d * stride));
  for (int64_t c = 0; c < d; ++c) {
    int32_t q = h.colptr[size_t(c)];
    const int32_t end = h.colptr[size_t(c + 1)];
    for (int64_t s = 0; s <= h.nchunks; ++s) {
      while (q < end && int64_t(h.rows[size_t(q)]) < s * chunk) ++q;
      h.segptr[size_t(c * stride + s)] = q;
    }
    h.segptr[size_t(c * stride + h.nchunks)] = end;
  }
  return h;
}

}  // namespace lspo::detail
