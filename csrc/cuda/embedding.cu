// Embedding lookup on CUDA: fastlm::embedding_fwd_cuda, tok_pos_embedding_fwd_cuda and
// embedding_bwd_cuda (contract: fastlm.h).
//
// Forward is a gather, so the aim is copy bandwidth. A group of threads copies one output row,
// several groups share a block when rows are short, and each thread moves the widest chunk
// (16 bytes down to 2) that the row length and the pointers allow, several chunks in flight at a
// time. An id outside the table is never used as an address: its row is skipped and its position
// recorded (the smallest wins). The host never reads that record back: a decode step must not wait
// for the device (and a CUDA graph cannot). The first thread to record a bad id prints it, and
// at::_assert_async turns the record into a device-side assert, as torch's own gather reports a bad
// index; the error surfaces at the next synchronisation.
//
// Backward adds gradient rows into the table's gradient. By default with float32 atomics into a
// zeroed table, four floats per instruction on Hopper. Deterministic mode sorts the ids stably (so
// equal ids keep their original order) and sums each id's rows in that order without atomics. A
// frequent id (natural text is Zipfian) must not leave one thread summing thousands of rows, so
// the sorted positions are cut into chunks of at most 32: a chunk sums each of its runs of equal
// ids, writing a run that lies inside it straight to the gradient and parking a run that crosses
// a chunk edge in a float32 buffer; a second kernel adds the parked pieces of each crossing id in
// chunk order. The order of every sum depends only on the ids, so the result is bitwise
// reproducible.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/common.cuh"
#include "checks.h"
#include "fastlm.h"

namespace fastlm {
namespace {

using cuda::dispatch_float;
using cuda::Pack;

constexpr int kBlock = 256;
// Loads a thread issues before its first store: a gather is latency-bound unless many are in flight.
constexpr int kUnroll = 4;

// Work comes in items (output rows, gradient rows, chunks of sorted ids). A group of `group`
// threads owns an item and strides over its units (the 2- to 16-byte pieces of a row).
struct Lane {
  int64_t item;
  int t;
};

__device__ __forceinline__ Lane lane(int group) {
  return {static_cast<int64_t>(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group,
          static_cast<int>(threadIdx.x % group)};
}

// The smallest bad position wins. Only the first thread to record one (it finds the initial n)
// prints, so a batch full of bad ids prints one line, naming one of them.
__device__ __forceinline__ void record_bad(int64_t* first_bad, int64_t pos, int64_t n, int64_t id, int64_t rows) {
  const long long was = atomicMin(reinterpret_cast<long long*>(first_bad), static_cast<long long>(pos));
  if (was == n)
    printf("fastlm embedding (cuda): id %lld at position %lld is out of range for an embedding table of %lld "
           "rows\n", static_cast<long long>(id), static_cast<long long>(pos), static_cast<long long>(rows));
}

// Packs move through an integer type of their size, addressed as Pack pointers: nvcc otherwise
// splits a pack of c10::Half or c10::BFloat16 into 2-byte accesses, and a store to a T* row
// address into element-wide ones. Every load here reads memory that no thread of the same kernel
// writes, so all of them may take the read-only path (__ldg).
template <int BYTES> struct RawOf;
template <> struct RawOf<16> { using type = uint4; };
template <> struct RawOf<8> { using type = uint2; };
template <> struct RawOf<4> { using type = unsigned int; };
template <> struct RawOf<2> { using type = unsigned short; };

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const Pack<T, VEC>* p) {
  using R = typename RawOf<sizeof(Pack<T, VEC>)>::type;
  const R r = __ldg(reinterpret_cast<const R*>(p));
  Pack<T, VEC> v;
  memcpy(&v, &r, sizeof(v));
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ void add_to(float (&acc)[VEC], const Pack<T, VEC>& p) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] += static_cast<float>(p.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(Pack<T, VEC>* p, const float (&acc)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = static_cast<T>(acc[j]);
  using R = typename RawOf<sizeof(pk)>::type;
  R r;
  memcpy(&r, &pk, sizeof(r));
  *reinterpret_cast<R*>(p) = r;
}

// ---- forward ----------------------------------------------------------------------------------

// P is an opaque 2- to 16-byte chunk: a copy needs no arithmetic, so one kernel serves every dtype.
template <typename P, typename I>
__global__ void __launch_bounds__(kBlock)
    gather_kernel(const I* __restrict__ ids, const P* __restrict__ table, P* __restrict__ out,
                  int64_t n, int64_t rows, int units, int group, int64_t* __restrict__ first_bad) {
  const Lane l = lane(group);
  if (l.item >= n) return;
  const int64_t id = static_cast<int64_t>(ids[l.item]);
  if (id < 0 || id >= rows) {
    if (l.t == 0) record_bad(first_bad, l.item, n, id, rows);
    return;
  }
  const P* src = table + id * units;
  P* dst = out + l.item * units;
  for (int base = l.t; base < units; base += group * kUnroll) {
    P v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      if (base + k * group < units) v[k] = src[base + k * group];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      if (base + k * group < units) dst[base + k * group] = v[k];
  }
}

// pos already points at row start_pos; row r of the output is (b, r % steps).
template <typename T, int VEC, typename I>
__global__ void __launch_bounds__(kBlock)
    tok_pos_kernel(const I* __restrict__ ids, const T* __restrict__ tok, const T* __restrict__ pos,
                   T* __restrict__ out, int64_t n, int64_t steps, int64_t rows, int units, int group,
                   int64_t* __restrict__ first_bad) {
  using Pk = Pack<T, VEC>;
  const Lane l = lane(group);
  if (l.item >= n) return;
  const int64_t id = static_cast<int64_t>(ids[l.item]);
  if (id < 0 || id >= rows) {
    if (l.t == 0) record_bad(first_bad, l.item, n, id, rows);
    return;
  }
  const Pk* a = reinterpret_cast<const Pk*>(tok) + id * units;
  const Pk* b = reinterpret_cast<const Pk*>(pos) + (l.item % steps) * units;
  Pk* dst = reinterpret_cast<Pk*>(out) + l.item * units;
  constexpr int kPairs = kUnroll / 2;  // two loads a unit: as many bytes in flight as the gather
  for (int base = l.t; base < units; base += group * kPairs) {
    Pk va[kPairs], vb[kPairs];
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      if (base + k * group < units) {
        va[k] = load(a + base + k * group);
        vb[k] = load(b + base + k * group);
      }
    }
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      if (base + k * group < units) {
        float s[VEC] = {};
        add_to(s, va[k]);
        add_to(s, vb[k]);  // both terms in float32, rounded once on the store
        store(dst + base + k * group, s);
      }
    }
  }
}

// ---- backward: atomics ------------------------------------------------------------------------

template <int VEC>
__device__ __forceinline__ void atomic_add(float* p, const float (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = VEC == 4;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
    // One vector reduction instead of four; p is 16-byte aligned (4 divides D, fresh buffer).
    atomicAdd(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(p + j, v[j]);
  }
}

template <typename T, int VEC, typename I>
__global__ void __launch_bounds__(kBlock)
    scatter_add_kernel(const T* __restrict__ dout, const I* __restrict__ ids, float* __restrict__ acc,
                       int64_t n, int64_t rows, int units, int group, int64_t padding_idx) {
  using Pk = Pack<T, VEC>;
  const Lane l = lane(group);
  if (l.item >= n) return;
  const int64_t id = static_cast<int64_t>(ids[l.item]);
  if (id < 0 || id >= rows || id == padding_idx) return;
  const Pk* src = reinterpret_cast<const Pk*>(dout) + l.item * units;
  float* dst = acc + id * units * VEC;
#pragma unroll 4
  for (int u = l.t; u < units; u += group) {
    float v[VEC] = {};
    add_to(v, load(src + u));
    atomic_add(dst + u * VEC, v);
  }
}

// ---- backward: deterministic ------------------------------------------------------------------

template <typename T>
struct RunArgs {
  const T* dout;
  const int64_t* sorted;  // the ids, sorted stably
  const int64_t* order;   // order[j]: the dout row of sorted[j]
  T* out;                 // zeroed (rows, D)
  float* head;            // (chunks, D): chunk k's first run, when it began in an earlier chunk
  float* tail;            // (chunks, D): chunk k's last run, when it begins there and goes on
  int64_t n, rows, padding_idx, chunks, chunk;
  int units, group;
};

__device__ __forceinline__ bool live(int64_t id, int64_t rows, int64_t padding_idx) {
  return id >= 0 && id < rows && id != padding_idx;
}

// One group per chunk of sorted positions: sums each run of equal ids within the chunk. A run's
// rows are added in sorted order, which the unrolled loop keeps (only the loads run ahead).
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) chunk_runs_kernel(const RunArgs<T> a) {
  using Pk = Pack<T, VEC>;
  using Pf = Pack<float, VEC>;
  const Lane l = lane(a.group);
  if (l.item >= a.chunks) return;
  const int64_t c0 = l.item * a.chunk, c1 = min(c0 + a.chunk, a.n);
  const bool from_before = c0 > 0 && a.sorted[c0 - 1] == a.sorted[c0];
  const bool into_next = c1 < a.n && a.sorted[c1] == a.sorted[c1 - 1];
  const Pk* rows = reinterpret_cast<const Pk*>(a.dout);
  int64_t last;
  for (int64_t first = c0; first < c1; first = last) {
    const int64_t id = a.sorted[first];
    for (last = first + 1; last < c1 && a.sorted[last] == id; ++last) {
    }
    if (!live(id, a.rows, a.padding_idx)) continue;
    // A run that crosses a chunk edge is parked for join_runs_kernel; any other is final.
    float* park = first == c0 && from_before ? a.head : last == c1 && into_next ? a.tail : nullptr;
    for (int u = l.t; u < a.units; u += a.group) {
      float acc[VEC] = {};
#pragma unroll 4
      for (int64_t j = first; j < last; ++j) add_to(acc, load(rows + a.order[j] * a.units + u));
      if (park != nullptr) {
        store(reinterpret_cast<Pf*>(park) + l.item * a.units + u, acc);
      } else {
        store(reinterpret_cast<Pk*>(a.out) + id * a.units + u, acc);
      }
    }
  }
}

// One group per chunk; the chunk where a crossing run begins adds its pieces, in chunk order.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) join_runs_kernel(const RunArgs<T> a) {
  using Pk = Pack<T, VEC>;
  using Pf = Pack<float, VEC>;
  const Lane l = lane(a.group);
  if (l.item >= a.chunks) return;
  const int64_t c0 = l.item * a.chunk, c1 = min(c0 + a.chunk, a.n);
  const int64_t id = a.sorted[c1 - 1];
  if (c1 >= a.n || a.sorted[c1] != id) return;    // the last run ends in this chunk
  if (c0 > 0 && a.sorted[c0 - 1] == id) return;  // it began in an earlier chunk
  if (!live(id, a.rows, a.padding_idx)) return;
  const Pf* head = reinterpret_cast<const Pf*>(a.head);
  const Pf* tail = reinterpret_cast<const Pf*>(a.tail);
  for (int u = l.t; u < a.units; u += a.group) {
    float acc[VEC] = {};
    add_to(acc, load(tail + l.item * a.units + u));
    for (int64_t k = l.item + 1;; ++k) {  // chunk k begins with this id
      add_to(acc, load(head + k * a.units + u));
      const int64_t next = (k + 1) * a.chunk;
      if (next >= a.n || a.sorted[next] != id) break;
    }
    store(reinterpret_cast<Pk*>(a.out) + id * a.units + u, acc);
  }
}

// ---- host -------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

struct Plan {
  int group, block;
  unsigned int grid;
};

// Threads per item: enough for each to hold `per_thread` units (loads in flight), as a power of
// two up to 32 (several items then share a warp) or whole warps up to 256; rows too long for that
// are spread evenly over the fewest warps that cover them in as few rounds as 256 threads need.
Plan plan(int64_t items, int64_t units, int per_thread, const char* op) {
  const int64_t threads = ceil_div(units, per_thread);
  int group = 1;
  if (threads <= 32) {
    while (group < threads) group *= 2;
  } else if (threads <= kBlock) {
    group = static_cast<int>(32 * ceil_div(threads, 32));
  } else {
    group = static_cast<int>(32 * ceil_div(ceil_div(units, ceil_div(units, kBlock)), 32));
  }
  const int per_block = std::max(1, kBlock / group);
  const int64_t blocks = ceil_div(items, per_block);
  TORCH_CHECK(blocks <= INT_MAX, op, " (cuda): too many rows (", items, ")");
  return {group, group * per_block, static_cast<unsigned int>(std::max<int64_t>(blocks, 1))};
}

template <typename F>
void dispatch_index(at::ScalarType dt, F&& f) {
  if (dt == at::kInt) f(int32_t{}); else f(int64_t{});
}

// fastlm/ops/embedding.py validates arguments; these checks turn a broken contract into an
// exception rather than an illegal memory access. Wording follows csrc/cpu/embedding.cpp.
void check_ids(const at::Tensor& ids) {
  TORCH_CHECK(ids.is_cuda(), "embedding (cuda): ids must be a CUDA tensor, got ", ids.device());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "embedding: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.is_contiguous(), "embedding: ids must be contiguous");
}

void check_table(const at::Tensor& w, const at::Tensor& ids, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "embedding: ", name, " must be a contiguous 2-D tensor");
  TORCH_CHECK(w.device() == ids.device(), "embedding (cuda): ", name, " is on ", w.device(),
              " but ids are on ", ids.device());
  const auto dt = w.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "embedding (cuda): the cuda backend supports float16, bfloat16 and float32; ", name,
              " has dtype ", dt);
  TORCH_CHECK(w.size(1) * w.element_size() <= INT_MAX, "embedding (cuda): ", name,
              " rows wider than ", INT_MAX, " bytes are not supported");
}

// A device int64 the kernels lower to the first bad position; n means none.
at::Tensor no_bad_yet(const at::Tensor& ids) {
  return at::full({1}, ids.numel(), ids.options().dtype(at::kLong));
}

void assert_no_bad(const at::Tensor& first_bad, const at::Tensor& ids, int64_t rows) {
  at::_assert_async(first_bad.ge(ids.numel()),
                    "embedding (cuda): an id is out of range for an embedding table of " + std::to_string(rows) +
                        " rows (the kernel printed which)");
}

template <typename P, typename I>
void launch_gather(const at::Tensor& ids, const at::Tensor& w, const at::Tensor& out, int64_t* first_bad,
                   cudaStream_t stream) {
  const int64_t n = ids.numel();
  const int units = static_cast<int>(w.size(1) * w.element_size() / static_cast<int64_t>(sizeof(P)));
  const Plan p = plan(n, units, kUnroll, "embedding");
  gather_kernel<P, I><<<p.grid, p.block, 0, stream>>>(ids.data_ptr<I>(), static_cast<const P*>(w.data_ptr()),
                                                      static_cast<P*>(out.data_ptr()), n, w.size(0), units,
                                                      p.group, first_bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, typename I>
void launch_tok_pos(const at::Tensor& ids, const at::Tensor& tok, const T* pos, const at::Tensor& out,
                    int64_t* first_bad, cudaStream_t stream) {
  const int64_t n = ids.numel();
  const int units = static_cast<int>(tok.size(1) / VEC);
  const Plan p = plan(n, units, kUnroll / 2, "tok_pos_embedding");
  tok_pos_kernel<T, VEC, I><<<p.grid, p.block, 0, stream>>>(ids.data_ptr<I>(), tok.data_ptr<T>(), pos,
                                                            out.data_ptr<T>(), n, ids.size(1), tok.size(0),
                                                            units, p.group, first_bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, typename I>
void launch_scatter_add(const at::Tensor& dout, const at::Tensor& ids, const at::Tensor& acc,
                        int64_t padding_idx, cudaStream_t stream) {
  const int64_t n = ids.numel();
  const int units = static_cast<int>(dout.size(1) / VEC);
  const Plan p = plan(n, units, kUnroll, "embedding_bwd");
  scatter_add_kernel<T, VEC, I><<<p.grid, p.block, 0, stream>>>(dout.data_ptr<T>(), ids.data_ptr<I>(),
                                                                acc.data_ptr<float>(), n, acc.size(0), units,
                                                                p.group, padding_idx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Positions per chunk: 32 bounds a thread's serial work; short inputs get smaller chunks so that
// about 2048 of them still spread over the GPU. It depends on n alone, as the sums' order must.
int64_t pick_chunk(int64_t n) {
  int64_t c = 4;
  while (c < 32 && n / (2 * c) >= 2048) c *= 2;
  return c;
}

template <typename T, int VEC>
void run_deterministic(const at::Tensor& dout, const at::Tensor& ids, const at::Tensor& out,
                       int64_t padding_idx, cudaStream_t stream) {
  const int64_t n = ids.numel(), d = dout.size(1);
  // Stable, so rows of one id keep their original order: the sums' order depends on the ids alone.
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(ids.reshape(-1).to(at::kLong), std::optional<bool>(true), 0, false);
  const int64_t chunk = pick_chunk(n), chunks = ceil_div(n, chunk);
  const auto parked = at::empty({2, chunks, d}, dout.options().dtype(at::kFloat));
  const int units = static_cast<int>(d / VEC);
  const Plan p = plan(chunks, units, 1, "embedding_bwd");  // the run loop supplies the ILP
  const RunArgs<T> a{dout.data_ptr<T>(), sorted.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                     out.data_ptr<T>(), parked[0].data_ptr<float>(), parked[1].data_ptr<float>(),
                     n, out.size(0), padding_idx, chunks, chunk, units, p.group};
  chunk_runs_kernel<T, VEC><<<p.grid, p.block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  join_runs_kernel<T, VEC><<<p.grid, p.block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor embedding_fwd_cuda(const at::Tensor& ids, const at::Tensor& weight) {
  check_ids(ids);
  check_table(weight, ids, "weight");
  const c10::cuda::CUDAGuard guard(ids.device());
  const int64_t n = ids.numel(), d = weight.size(1);
  auto out = at::empty({n, d}, weight.options());
  if (n == 0) return out;
  // Launched even when d == 0: the ids must still be checked.
  const auto first_bad = no_bad_yet(ids);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t row_bytes = d * weight.element_size();
  int width = 2;  // every supported dtype is at least 2 bytes wide, and so aligned
  for (int w = 16; w > 2; w /= 2) {
    if (row_bytes % w == 0 && aligned(weight.data_ptr(), w) && aligned(out.data_ptr(), w)) {
      width = w;
      break;
    }
  }
  int64_t* bad = first_bad.data_ptr<int64_t>();
  dispatch_index(ids.scalar_type(), [&](auto tag) {
    using I = decltype(tag);
    switch (width) {
      case 16: launch_gather<uint4, I>(ids, weight, out, bad, stream); break;
      case 8: launch_gather<uint2, I>(ids, weight, out, bad, stream); break;
      case 4: launch_gather<uint32_t, I>(ids, weight, out, bad, stream); break;
      default: launch_gather<uint16_t, I>(ids, weight, out, bad, stream); break;
    }
  });
  assert_no_bad(first_bad, ids, weight.size(0));
  return out;
}

at::Tensor tok_pos_embedding_fwd_cuda(const at::Tensor& ids, const at::Tensor& tok, const at::Tensor& pos,
                                      int64_t start_pos) {
  check_ids(ids);
  check_table(tok, ids, "tok");
  check_table(pos, ids, "pos");
  check_tok_pos(ids, tok, pos, start_pos);
  const int64_t b = ids.size(0), t = ids.size(1), d = tok.size(1);
  const c10::cuda::CUDAGuard guard(ids.device());
  auto out = at::empty({b, t, d}, tok.options());
  if (b * t == 0) return out;
  const auto first_bad = no_bad_yet(ids);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t* bad = first_bad.data_ptr<int64_t>();
  dispatch_float(tok.scalar_type(), "embedding", [&](auto ttag) {
    using T = decltype(ttag);
    constexpr int kVec = 16 / sizeof(T);
    const T* pos_from = pos.data_ptr<T>() + start_pos * d;
    const bool vec = d % kVec == 0 && aligned(tok.data_ptr(), 16) && aligned(pos_from, 16) &&
                     aligned(out.data_ptr(), 16);
    dispatch_index(ids.scalar_type(), [&](auto itag) {
      using I = decltype(itag);
      if (vec) {
        launch_tok_pos<T, kVec, I>(ids, tok, pos_from, out, bad, stream);
      } else {
        launch_tok_pos<T, 1, I>(ids, tok, pos_from, out, bad, stream);
      }
    });
  });
  assert_no_bad(first_bad, ids, tok.size(0));
  return out;
}

at::Tensor embedding_bwd_cuda(const at::Tensor& dout, const at::Tensor& ids, int64_t num_weights,
                              int64_t padding_idx, bool deterministic) {
  check_ids(ids);
  TORCH_CHECK(dout.dim() == 2 && dout.is_contiguous() && dout.size(0) == ids.numel(),
              "embedding_bwd: dout must be a contiguous (len(ids), D) tensor");
  TORCH_CHECK(dout.device() == ids.device(), "embedding_bwd (cuda): dout is on ", dout.device(),
              " but ids are on ", ids.device());
  const auto dt = dout.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "embedding_bwd (cuda): the cuda backend supports float16, bfloat16 and float32; dout has dtype ", dt);
  TORCH_CHECK(num_weights >= 0, "embedding_bwd: num_weights must be >= 0, got ", num_weights);
  TORCH_CHECK(padding_idx >= -1 && padding_idx < num_weights, "embedding_bwd: padding_idx out of range");
  TORCH_CHECK(dout.size(1) <= INT_MAX / 4, "embedding_bwd (cuda): rows wider than ", INT_MAX / 4,
              " are not supported");
  const c10::cuda::CUDAGuard guard(ids.device());
  const int64_t n = ids.numel(), d = dout.size(1);
  if (n == 0 || d == 0) return at::zeros({num_weights, d}, dout.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Four floats a thread when D and dout allow: a 16-byte atomic or store, 8- or 16-byte loads.
  const bool vec = d % 4 == 0 && aligned(dout.data_ptr(), 4 * dout.element_size());

  if (deterministic) {
    // Rows no id reaches stay zero; every other row is written exactly once, in dout's dtype.
    auto out = at::zeros({num_weights, d}, dout.options());
    dispatch_float(dt, "embedding", [&](auto tag) {
      using T = decltype(tag);
      if (vec) run_deterministic<T, 4>(dout, ids, out, padding_idx, stream);
      else run_deterministic<T, 1>(dout, ids, out, padding_idx, stream);
    });
    return out;
  }

  auto acc = at::zeros({num_weights, d}, dout.options().dtype(at::kFloat));
  dispatch_float(dt, "embedding", [&](auto ttag) {
    using T = decltype(ttag);
    dispatch_index(ids.scalar_type(), [&](auto itag) {
      using I = decltype(itag);
      if (vec) launch_scatter_add<T, 4, I>(dout, ids, acc, padding_idx, stream);
      else launch_scatter_add<T, 1, I>(dout, ids, acc, padding_idx, stream);
    });
  });
  return dt == at::kFloat ? acc : acc.to(dt);
}

}  // namespace fastlm
