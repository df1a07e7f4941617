// Embedding lookup on the CPU: a gather of rows forward, a scatter-add of rows backward.
//
// Forward is a parallel row copy (memcpy moves a row at the machine's copy speed) after a
// check of every id, so no row outside the table is ever read. Backward groups the gradient rows
// by id with a counting sort (O(n + V), tiny beside the table), then threads split the table's
// rows: each row is written once, either zeros or its sum, so the dense gradient costs one write
// of the table instead of a zero-fill plus read-modify-writes, repeated ids never contend (no
// locks, no atomics), and each sum runs in the ids' order: the result is bitwise reproducible,
// which is all that deterministic mode asks for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"
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

// Gradient rows grouped by id: a counting sort of the positions, stable, so each id's rows are
// summed in the order they appear. Returns (starts (V + 1), order (n)); padding_idx is left out.
template <typename I>
void group_by_id(const I* ids, int64_t n, int64_t num_rows, int64_t padding_idx, std::vector<int64_t>& starts,
                 std::vector<int64_t>& order) {
  starts.assign(num_rows + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] != padding_idx) ++starts[ids[i] + 1];
  for (int64_t v = 0; v < num_rows; ++v) starts[v + 1] += starts[v];
  order.resize(starts[num_rows]);
  std::vector<int64_t> cursor(starts.begin(), starts.end() - 1);
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] != padding_idx) order[cursor[ids[i]]++] = i;
}

// Every row of dweight is written exactly once, by one thread: zeros where no id points, else the
// sum of its gradient rows, accumulated in A and rounded once.
template <typename T, typename A>
void gather_sum_kernel(const T* dout, const int64_t* starts, const int64_t* order, T* dw, int64_t num_rows,
                       int64_t d) {
  at::parallel_for(0, num_rows, grain(d * sizeof(T)), [&](int64_t begin, int64_t end) {
    std::vector<A> acc(d);
    for (int64_t v = begin; v < end; ++v) {
      T* row = dw + v * d;
      const int64_t k0 = starts[v], k1 = starts[v + 1];
      if (k0 == k1) {
        std::memset(static_cast<void*>(row), 0, d * sizeof(T));
        continue;
      }
      const T* first = dout + order[k0] * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) acc[j] = static_cast<A>(first[j]);
      for (int64_t k = k0 + 1; k < k1; ++k) {
        const T* src = dout + order[k] * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<A>(src[j]);
      }
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) row[j] = static_cast<T>(acc[j]);
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
  check_tok_pos(ids, tok, pos, start_pos);
  const int64_t b = ids.size(0), t = ids.size(1), d = tok.size(1);
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
  auto dw = at::empty({num_weights, d}, dout.options());
  if (num_weights == 0 || d == 0) return dw;
  std::vector<int64_t> starts, order;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "embedding_bwd_cpu", [&] {
    group_by_id<index_t>(ids.data_ptr<index_t>(), n, num_weights, padding_idx, starts, order);
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dout.scalar_type(), "embedding_bwd_cpu", [&] {
    gather_sum_kernel<scalar_t, AccT<scalar_t>>(dout.data_ptr<scalar_t>(), starts.data(), order.data(),
                                                dw.data_ptr<scalar_t>(), num_weights, d);
  });
  return dw;
}

}  // namespace fastlm
