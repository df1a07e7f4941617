// Embedding lookup on the CPU: a gather of rows forward, a scatter-add of rows backward.
//
// Forward is a parallel row copy (memcpy moves a row at the machine's copy speed) after a
// check of every id, so no row outside the table is ever read. Backward splits the table's
// columns among threads rather than its rows: each thread adds its slice of every gradient row
// in the order of the ids, so repeated ids never contend (no locks, no atomics), the work is
// balanced whatever the ids are, and the sum's order is fixed: the result is bitwise
// reproducible, which is what deterministic mode asks for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstring>
#include <type_traits>

#include "fastlm.h"

namespace fastlm {
namespace {

// Raise IndexError naming the first id outside [0, num_rows).
template <typename I>
void check_ids(const I* ids, int64_t n, int64_t num_rows) {
  std::atomic<int64_t> first_bad{n};
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (ids[i] < 0 || ids[i] >= num_rows) {
        int64_t cur = first_bad.load();
        while (i < cur && !first_bad.compare_exchange_weak(cur, i)) {
        }
        return;
      }
    }
  });
  const int64_t i = first_bad.load();
  TORCH_CHECK_INDEX(i == n, "embedding: id ", static_cast<int64_t>(ids[i]),
                    " is out of range for an embedding table of ", num_rows, " rows (at position ", i, ")");
}

template <typename I>
void check_ids(const at::Tensor& ids, int64_t num_rows) {
  check_ids<I>(ids.data_ptr<I>(), ids.numel(), num_rows);
}

void check_ids_any(const at::Tensor& ids, int64_t num_rows) {
  if (ids.scalar_type() == at::kInt) {
    check_ids<int32_t>(ids, num_rows);
  } else {
    check_ids<int64_t>(ids, num_rows);
  }
}

void check_args(const at::Tensor& ids, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "embedding: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.is_contiguous(), "embedding: ids must be contiguous");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "embedding: ", name,
              " must be a contiguous 2-D tensor");
}

// Rows per parallel task: about 64 KiB of copying each.
int64_t grain(int64_t row_bytes) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, row_bytes)); }

template <typename T>
using AccT = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T, typename I>
void tok_pos_kernel(const I* ids, const T* tok, const T* pos, T* out, int64_t b, int64_t t,
                    int64_t d) {
  at::parallel_for(0, b * t, grain(d * sizeof(T)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* a = tok + static_cast<int64_t>(ids[r]) * d;
      const T* p = pos + (r % t) * d;
      T* o = out + r * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) o[j] = static_cast<T>(static_cast<AccT<T>>(a[j]) + static_cast<AccT<T>>(p[j]));
    }
  });
}

// acc[ids[i], cols] += dout[i, cols] for the thread's column slice, ids in order.
template <typename T, typename A, typename I>
void scatter_add_kernel(const T* dout, const I* ids, A* acc, int64_t n, int64_t d, int64_t padding_idx) {
  constexpr int64_t kCols = 64;  // a 256-byte slice per task at float32: whole cache lines
  const int64_t nblocks = (d + kCols - 1) / kCols;
  at::parallel_for(0, nblocks, 1, [&](int64_t bbegin, int64_t bend) {
    const int64_t c0 = bbegin * kCols, c1 = std::min(d, bend * kCols);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = ids[i];
      if (v == padding_idx) continue;
      const T* src = dout + i * d;
      A* dst = acc + v * d;
#pragma omp simd
      for (int64_t j = c0; j < c1; ++j) dst[j] += static_cast<A>(src[j]);
    }
  });
}

}  // namespace

at::Tensor embedding_fwd_cpu(const at::Tensor& ids, const at::Tensor& weight) {
  check_args(ids, weight, "weight");
  const int64_t n = ids.numel(), d = weight.size(1);
  check_ids_any(ids, weight.size(0));
  auto out = at::empty({n, d}, weight.options());
  if (n == 0 || d == 0) return out;
  const int64_t row_bytes = d * weight.element_size();
  const char* w = static_cast<const char*>(weight.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "embedding_fwd_cpu", [&] {
    const index_t* id = ids.data_ptr<index_t>();
    at::parallel_for(0, n, grain(row_bytes), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        std::memcpy(o + i * row_bytes, w + static_cast<int64_t>(id[i]) * row_bytes, row_bytes);
    });
  });
  return out;
}

at::Tensor tok_pos_embedding_fwd_cpu(const at::Tensor& ids, const at::Tensor& tok, const at::Tensor& pos,
                                     int64_t start_pos) {
  check_args(ids, tok, "tok");
  check_args(ids, pos, "pos");
  TORCH_CHECK(ids.dim() == 2, "tok_pos_embedding: ids must be 2-D (batch, time)");
  TORCH_CHECK(tok.size(1) == pos.size(1) && tok.scalar_type() == pos.scalar_type(),
              "tok_pos_embedding: tok and pos must share width and dtype");
  const int64_t b = ids.size(0), t = ids.size(1), d = tok.size(1);
  TORCH_CHECK(start_pos >= 0 && start_pos + t <= pos.size(0), "tok_pos_embedding: start_pos ", start_pos,
              " + ", t, " positions exceeds the position table's ", pos.size(0), " rows");
  check_ids_any(ids, tok.size(0));
  auto out = at::empty({b, t, d}, tok.options());
  if (b * t == 0 || d == 0) return out;
  const auto pos_from = pos.narrow(0, start_pos, t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tok.scalar_type(), "tok_pos_fwd_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "tok_pos_fwd_cpu", [&] {
      tok_pos_kernel<T, index_t>(ids.data_ptr<index_t>(), tok.data_ptr<T>(), pos_from.data_ptr<T>(),
                                 out.data_ptr<T>(), b, t, d);
    });
  });
  return out;
}

at::Tensor embedding_bwd_cpu(const at::Tensor& dout, const at::Tensor& ids, int64_t num_weights,
                             int64_t padding_idx, bool /*deterministic: always, see top*/) {
  TORCH_CHECK(dout.dim() == 2 && dout.is_contiguous() && dout.size(0) == ids.numel(),
              "embedding_bwd: dout must be a contiguous (len(ids), D) tensor");
  const int64_t n = dout.size(0), d = dout.size(1);
  TORCH_CHECK(padding_idx >= -1 && padding_idx < num_weights, "embedding_bwd: padding_idx out of range");
  check_ids_any(ids, num_weights);  // never write outside the table, whoever calls this
  const bool wide = dout.scalar_type() == at::kFloat || dout.scalar_type() == at::kDouble;
  // float32 and float64 accumulate in place; 16-bit gradients in a float32 table, cast at the end.
  auto acc = at::zeros({num_weights, d}, dout.options().dtype(wide ? dout.scalar_type() : at::kFloat));
  if (n == 0 || d == 0) return wide ? acc : acc.to(dout.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dout.scalar_type(), "embedding_bwd_cpu", [&] {
    using T = scalar_t;
    using A = AccT<T>;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "embedding_bwd_cpu", [&] {
      scatter_add_kernel<T, A, index_t>(dout.data_ptr<T>(), ids.data_ptr<index_t>(), acc.data_ptr<A>(), n, d,
                                        padding_idx);
    });
  });
  return wide ? acc : acc.to(dout.scalar_type());
}

}  // namespace fastlm
