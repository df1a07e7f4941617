// Layer norm and RMS norm on CUDA: fastlm::norm_fwd_cuda and norm_bwd_cuda (contract: fastlm.h).
//
// Both directions are memory-bound, so the aim is to read every input byte once and write every
// output byte once. A group of threads owns a row: one to a few warps, several groups to a block,
// for short rows; the whole block for long ones. Forward keeps the row in registers from the
// statistics to the write. Backward gives each thread the same columns of every row its block
// visits (grid-stride over rows), so the thread's dweight/dbias sums stay in registers until the
// end; each block then writes one float32 partial row, and a second kernel adds the partial rows
// column by column in a fixed order: deterministic, no atomics.
//
// Loads and stores are 16 bytes wide when N and every pointer allow it, else one element wide.
// Rows too long for registers (N > 16384 forward, N > 8192 backward) go to slower kernels that
// sweep the row two or three times (the repeats mostly hit L2); backward then sums dweight/dbias
// in a separate pass over the columns.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"
#include "checks.h"
#include "fastlm.h"

namespace fastlm {
namespace {

using cuda::dispatch_float;
using cuda::load;
using cuda::Pack;
using cuda::store;

constexpr int kMaxBlock = 1024;
// Row elements each thread holds as floats. Forward holds one float per element; backward four
// (xhat, dy*w, and the dweight and dbias sums). __launch_bounds__(1024) leaves 64 registers a
// thread; with these budgets ptxas -v reports no spills but 4 bytes in one float backward kernel.
constexpr int kFwdElems = 16;
constexpr int kBwdElems = 8;

template <int VEC>
__device__ __forceinline__ void fill(float (&v)[VEC], float value) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = value;
}

// Sums K values over the `group` threads of a row (a multiple of 32 that divides blockDim.x).
// Every thread of the group gets the same bits, so all of them normalise with the same mean and
// rstd. smem is [K][32]; the caller must not pass the same buffer again before another barrier.
template <int K>
__device__ __forceinline__ void group_sum(float (&v)[K], float (*smem)[32], int group) {
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  if (group == 32) return;
  if ((threadIdx.x & 31) == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k][threadIdx.x >> 5] = v[k];
  __syncthreads();
  const int first = (threadIdx.x / group) * (group >> 5);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.f;
    for (int w = 0; w < (group >> 5); ++w) s += smem[k][first + w];
    v[k] = s;
  }
}

// ---- forward ----------------------------------------------------------------------------------

template <typename T>
struct FwdArgs {
  const T* x;
  const T* res;  // null: no residual
  const T* w;    // null: no weight
  const T* b;    // null: no bias
  T* y;
  T* h;          // written with a residual
  float* mean;   // written for layer norm
  float* rstd;
  int64_t M, N;
  float eps;
  bool rms;
};

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// Thread t of a group holds packs t, t + group, ... (ITEMS of them): consecutive threads touch
// consecutive 16-byte chunks, so every access is coalesced.
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxBlock) fwd_rows_kernel(const FwdArgs<T> a, const int group) {
  __shared__ float s_red[2][1][32];
  const int t = threadIdx.x % group;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  const bool active = row < a.M;  // a group past the last row still joins the barriers
  const int64_t off = active ? row * a.N : 0;
  const int n = static_cast<int>(a.N);  // <= ITEMS * 1024 * VEC here
  const float inv_n = 1.f / static_cast<float>(n);

  float v[ITEMS][VEC];
  float sum[1] = {0.f};
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int col = (i * group + t) * VEC;
    if (active && col < n) {
      load(a.x + off + col, v[i]);
      if (a.res != nullptr) {
        float r[VEC];
        load(a.res + off + col, r);
        // Normalise h as stored, rounded to T, so y matches norm(x + residual) done unfused.
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = round_to<T>(v[i][j] + r[j]);
        store(a.h + off + col, v[i]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum[0] += a.rms ? v[i][j] * v[i][j] : v[i][j];
    } else {
      fill(v[i], 0.f);
    }
  }
  group_sum(sum, s_red[0], group);

  float mean = 0.f, rstd;
  if (a.rms) {
    rstd = rsqrtf(sum[0] * inv_n + a.eps);
  } else {
    // A second pass over the registers: sum((x - mean)^2) does not cancel catastrophically the
    // way E[x^2] - mean^2 does when |mean| >> std.
    mean = sum[0] * inv_n;
    float sq[1] = {0.f};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (i * group + t) * VEC;
      if (active && col < n) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = v[i][j] - mean;
          sq[0] += d * d;
        }
      }
    }
    group_sum(sq, s_red[1], group);
    rstd = rsqrtf(sq[0] * inv_n + a.eps);
  }
  if (!active) return;  // no barrier follows
  if (t == 0) {
    if (!a.rms) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int col = (i * group + t) * VEC;
    if (col < n) {
      float w[VEC], b[VEC];
      if (a.w != nullptr) load(a.w + col, w); else fill(w, 1.f);
      if (a.b != nullptr) load(a.b + col, b); else fill(b, 0.f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = (v[i][j] - mean) * rstd * w[j] + b[j];
      store(a.y + off + col, v[i]);
    }
  }
}

// One block per row, for rows that do not fit in registers: sweep 1 reads x (and the residual,
// writing h), sweep 2 the squared deviations, sweep 3 the output. Each thread re-reads only the
// addresses it read or wrote itself, so no barrier is needed between sweeps.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxBlock) fwd_long_rows_kernel(const FwdArgs<T> a) {
  __shared__ float s_red[2][1][32];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * a.N;
  const int64_t start = static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const T* src = (a.res != nullptr ? a.h : a.x) + off;
  const float inv_n = 1.f / static_cast<float>(a.N);

  float sum[1] = {0.f};
  for (int64_t col = start; col < a.N; col += step) {
    float v[VEC];
    load(a.x + off + col, v);
    if (a.res != nullptr) {
      float r[VEC];
      load(a.res + off + col, r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = round_to<T>(v[j] + r[j]);
      store(a.h + off + col, v);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum[0] += a.rms ? v[j] * v[j] : v[j];
  }
  group_sum(sum, s_red[0], blockDim.x);

  float mean = 0.f, rstd;
  if (a.rms) {
    rstd = rsqrtf(sum[0] * inv_n + a.eps);
  } else {
    mean = sum[0] * inv_n;
    float sq[1] = {0.f};
    for (int64_t col = start; col < a.N; col += step) {
      float v[VEC];
      load(src + col, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sq[0] += (v[j] - mean) * (v[j] - mean);
    }
    group_sum(sq, s_red[1], blockDim.x);
    rstd = rsqrtf(sq[0] * inv_n + a.eps);
  }
  if (threadIdx.x == 0) {
    if (!a.rms) a.mean[blockIdx.x] = mean;
    a.rstd[blockIdx.x] = rstd;
  }
  for (int64_t col = start; col < a.N; col += step) {
    float v[VEC], w[VEC], b[VEC];
    load(src + col, v);
    if (a.w != nullptr) load(a.w + col, w); else fill(w, 1.f);
    if (a.b != nullptr) load(a.b + col, b); else fill(b, 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = (v[j] - mean) * rstd * w[j] + b[j];
    store(a.y + off + col, v);
  }
}

// ---- backward ---------------------------------------------------------------------------------
// xhat = (x - mean) * rstd, g = dy * w:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh
// (RMS: no mean(g) term);  dweight = sum over rows of dy * xhat;  dbias = sum over rows of dy.

template <typename T>
struct BwdArgs {
  const T* dy;
  const T* x;
  const T* w;         // null: no weight
  const float* mean;  // unused for RMS norm
  const float* rstd;
  const T* dh;        // null: no gradient at h
  T* dx;
  float* dw_part;     // (parts, N) partial sums; null when not wanted
  float* db_part;
  int64_t M, N;
  bool rms;
};

// The block's row groups own the same columns: group 0 writes their sum, in group order.
template <int ITEMS, int VEC>
__device__ __forceinline__ void write_partial(const float (&acc)[ITEMS][VEC], float* part, int n,
                                              int group, float* s_col) {
  const int rows_per_block = blockDim.x / group, g = threadIdx.x / group, t = threadIdx.x % group;
  float* out = part + static_cast<int64_t>(blockIdx.x) * n;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float s = acc[i][j];
      if (rows_per_block > 1) {
        __syncthreads();  // the previous element's reads are done
        s_col[threadIdx.x] = s;
        __syncthreads();
        s = 0.f;
        for (int k = 0; k < rows_per_block; ++k) s += s_col[k * group + t];
      }
      const int col = (i * group + t) * VEC + j;
      if (g == 0 && col < n) out[col] = s;
    }
  }
}

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxBlock) bwd_rows_kernel(const BwdArgs<T> a, const int group) {
  __shared__ float s_red[2][2][32];  // alternates by iteration: one barrier per row suffices
  __shared__ float s_col[kMaxBlock];
  const int rows_per_block = blockDim.x / group;
  const int g = threadIdx.x / group, t = threadIdx.x % group;
  const int n = static_cast<int>(a.N);  // <= ITEMS * 1024 * VEC here
  const float inv_n = 1.f / static_cast<float>(n);

  float dw[ITEMS][VEC], db[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    fill(dw[i], 0.f);
    fill(db[i], 0.f);
  }
  int parity = 0;
  // Loop on the block's first row, so every thread runs the same iterations (barriers).
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block; first < a.M;
       first += static_cast<int64_t>(gridDim.x) * rows_per_block, parity ^= 1) {
    const int64_t row = first + g;
    const bool active = row < a.M;
    const int64_t off = active ? row * a.N : 0;
    const float mean = (active && !a.rms) ? a.mean[row] : 0.f;
    const float rstd = active ? a.rstd[row] : 0.f;
    float xh[ITEMS][VEC], gw[ITEMS][VEC];
    float sums[2] = {0.f, 0.f};  // sum(g * xhat), sum(g)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (i * group + t) * VEC;
      if (active && col < n) {
        float dy[VEC], w[VEC];
        load(a.x + off + col, xh[i]);
        load(a.dy + off + col, dy);
        if (a.w != nullptr) load(a.w + col, w); else fill(w, 1.f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xh[i][j] = (xh[i][j] - mean) * rstd;
          dw[i][j] += dy[j] * xh[i][j];
          db[i][j] += dy[j];
          gw[i][j] = dy[j] * w[j];
          sums[0] += gw[i][j] * xh[i][j];
          sums[1] += gw[i][j];
        }
      } else {
        fill(xh[i], 0.f);
        fill(gw[i], 0.f);
      }
    }
    group_sum(sums, s_red[parity], group);
    const float c1 = sums[0] * inv_n;
    const float c2 = a.rms ? 0.f : sums[1] * inv_n;
    if (active) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int col = (i * group + t) * VEC;
        if (col < n) {
          float d[VEC];
          if (a.dh != nullptr) load(a.dh + off + col, d); else fill(d, 0.f);
#pragma unroll
          for (int j = 0; j < VEC; ++j) d[j] += rstd * (gw[i][j] - c2 - xh[i][j] * c1);
          store(a.dx + off + col, d);
        }
      }
    }
  }
  if (a.dw_part != nullptr) write_partial(dw, a.dw_part, n, group, s_col);
  if (a.db_part != nullptr) write_partial(db, a.db_part, n, group, s_col);
}

// dx only, one block per row, for rows that do not fit in registers (two sweeps).
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxBlock) bwd_long_rows_kernel(const BwdArgs<T> a) {
  __shared__ float s_red[1][2][32];
  const int64_t row = blockIdx.x, off = row * a.N;
  const int64_t start = static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const float mean = a.rms ? 0.f : a.mean[row], rstd = a.rstd[row];
  const float inv_n = 1.f / static_cast<float>(a.N);

  float sums[2] = {0.f, 0.f};
  for (int64_t col = start; col < a.N; col += step) {
    float x[VEC], dy[VEC], w[VEC];
    load(a.x + off + col, x);
    load(a.dy + off + col, dy);
    if (a.w != nullptr) load(a.w + col, w); else fill(w, 1.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xh = (x[j] - mean) * rstd, g = dy[j] * w[j];
      sums[0] += g * xh;
      sums[1] += g;
    }
  }
  group_sum(sums, s_red[0], blockDim.x);
  const float c1 = sums[0] * inv_n;
  const float c2 = a.rms ? 0.f : sums[1] * inv_n;
  for (int64_t col = start; col < a.N; col += step) {
    float x[VEC], dy[VEC], w[VEC], d[VEC];
    load(a.x + off + col, x);
    load(a.dy + off + col, dy);
    if (a.w != nullptr) load(a.w + col, w); else fill(w, 1.f);
    if (a.dh != nullptr) load(a.dh + off + col, d); else fill(d, 0.f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) d[j] += rstd * (dy[j] * w[j] - c2 - (x[j] - mean) * rstd * c1);
    store(a.dx + off + col, d);
  }
}

// Adds the 16 threadIdx.y lanes of a (32, 16) block column by column, in a fixed order.
// Returns true on the lanes (threadIdx.y == 0) that hold the totals.
__device__ __forceinline__ bool sum_lanes(float& sw, float& sb) {
  __shared__ float s[2][16][32];
  s[0][threadIdx.y][threadIdx.x] = sw;
  s[1][threadIdx.y][threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y != 0) return false;
  sw = sb = 0.f;
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    sw += s[0][k][threadIdx.x];
    sb += s[1][k][threadIdx.x];
  }
  return true;
}

// dweight/dbias partials for long rows: block (32, 16) sums 32 columns over the rows
// blockIdx.y * 16 + threadIdx.y + k * 16 * gridDim.y, into partial row blockIdx.y.
template <typename T>
__global__ void dwdb_columns_kernel(const BwdArgs<T> a) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float sw = 0.f, sb = 0.f;
  if (col < a.N) {
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * 16 + threadIdx.y; row < a.M;
         row += static_cast<int64_t>(gridDim.y) * 16) {
      const float dy = static_cast<float>(a.dy[row * a.N + col]);
      const float mean = a.rms ? 0.f : a.mean[row];
      sw += dy * (static_cast<float>(a.x[row * a.N + col]) - mean) * a.rstd[row];
      sb += dy;
    }
  }
  if (sum_lanes(sw, sb) && col < a.N) {
    if (a.dw_part != nullptr) a.dw_part[blockIdx.y * a.N + col] = sw;
    if (a.db_part != nullptr) a.db_part[blockIdx.y * a.N + col] = sb;
  }
}

// Second stage: dweight[c] = sum over p of dw_part[p][c] (same for dbias), in p order.
template <typename T>
__global__ void sum_partials_kernel(const float* dw_part, const float* db_part, int64_t parts,
                                    int64_t n, T* dw, T* db) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float sw = 0.f, sb = 0.f;
  if (col < n) {
    for (int64_t p = threadIdx.y; p < parts; p += 16) {
      if (dw_part != nullptr) sw += dw_part[p * n + col];
      if (db_part != nullptr) sb += db_part[p * n + col];
    }
  }
  if (sum_lanes(sw, sb) && col < n) {
    if (dw != nullptr) dw[col] = static_cast<T>(sw);
    if (db != nullptr) db[col] = static_cast<T>(sb);
  }
}

// ---- host -------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned int grid_size(int64_t blocks) {
  TORCH_CHECK(blocks <= INT_MAX, "norm (cuda): too many rows (", blocks, " blocks)");
  return static_cast<unsigned int>(blocks);
}

// Packs per thread: the fewest that keep a row within 256 threads (more threads per row only add
// reduction work), else the most a thread may hold, if the row then fits in one block; 0 if not.
int pick_items(int64_t packs, int max_items) {
  for (int items = 1; items <= max_items; items *= 2)
    if (ceil_div(packs, items) <= 256) return items;
  return ceil_div(packs, max_items) <= kMaxBlock ? max_items : 0;
}

int threads_per_row(int64_t packs, int items) {
  return static_cast<int>(32 * ceil_div(ceil_div(packs, items), 32));
}

// Instantiates the kernel for ITEMS = 1, 2, 4, ... up to the budget; launches the one asked for.
template <typename T, int VEC, int ITEMS = 1>
void launch_fwd_rows(const FwdArgs<T>& a, int items, int group, cudaStream_t stream) {
  if constexpr (ITEMS < kFwdElems / VEC) {
    if (items > ITEMS) return launch_fwd_rows<T, VEC, ITEMS * 2>(a, items, group, stream);
  }
  // Short rows: several rows to a block, so that blocks are not tiny.
  const int rows_per_block = group < 128 ? 128 / group : 1;
  fwd_rows_kernel<T, VEC, ITEMS><<<grid_size(ceil_div(a.M, rows_per_block)),
                                   group * rows_per_block, 0, stream>>>(a, group);
}

template <typename T, int VEC, int ITEMS = 1>
void launch_bwd_rows(const BwdArgs<T>& a, int items, int group, int grid, int block,
                     cudaStream_t stream) {
  if constexpr (ITEMS < kBwdElems / VEC) {
    if (items > ITEMS) return launch_bwd_rows<T, VEC, ITEMS * 2>(a, items, group, grid, block, stream);
  }
  bwd_rows_kernel<T, VEC, ITEMS><<<grid, block, 0, stream>>>(a, group);
}

template <typename T, int VEC>
void run_fwd(const FwdArgs<T>& a, cudaStream_t stream) {
  const int64_t packs = a.N / VEC;  // VEC divides N
  const int items = pick_items(packs, kFwdElems / VEC);
  if (items == 0) {
    fwd_long_rows_kernel<T, VEC><<<grid_size(a.M), kMaxBlock, 0, stream>>>(a);
  } else {
    launch_fwd_rows<T, VEC>(a, items, threads_per_row(packs, items), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the row kernels with a.dw_part/a.db_part pointing at fresh partial buffers, then the
// partial sum into dw/db (either may be null).
template <typename T, int VEC>
void run_bwd(BwdArgs<T> a, const at::Tensor& x, T* dw, T* db, cudaStream_t stream) {
  const bool want_dw = dw != nullptr, want_db = db != nullptr;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t packs = a.N / VEC;  // VEC divides N
  const int items = pick_items(packs, kBwdElems / VEC);
  const auto part_opts = x.options().dtype(at::kFloat);
  at::Tensor dw_part, db_part;
  int64_t parts = 0;
  auto alloc_parts = [&](int64_t p) {
    parts = p;
    if (want_dw) dw_part = at::empty({p, a.N}, part_opts);
    if (want_db) db_part = at::empty({p, a.N}, part_opts);
    a.dw_part = want_dw ? dw_part.data_ptr<float>() : nullptr;
    a.db_part = want_db ? db_part.data_ptr<float>() : nullptr;
  };
  if (items != 0) {
    const int group = threads_per_row(packs, items);
    const int rows_per_block = group < 256 ? 256 / group : 1;
    const int block = group * rows_per_block;
    // About 1024 resident threads per SM (64 registers each) keep enough loads in flight; more
    // blocks would only add partial rows to write and sum.
    const int64_t grid = std::min<int64_t>(ceil_div(a.M, rows_per_block),
                                           static_cast<int64_t>(sms) * std::max(1, kMaxBlock / block));
    alloc_parts(grid);
    launch_bwd_rows<T, VEC>(a, items, group, static_cast<int>(grid), block, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    bwd_long_rows_kernel<T, VEC><<<grid_size(a.M), kMaxBlock, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (want_dw || want_db) {
      const int64_t tiles = ceil_div(a.N, 32);
      const int64_t splits =
          std::max<int64_t>(1, std::min<int64_t>({ceil_div(4 * sms, tiles), ceil_div(a.M, 16), 65535}));
      alloc_parts(splits);
      dwdb_columns_kernel<T><<<dim3(grid_size(tiles), static_cast<unsigned int>(splits)), dim3(32, 16), 0,
                               stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (want_dw || want_db) {
    sum_partials_kernel<T><<<grid_size(ceil_div(a.N, 32)), dim3(32, 16), 0, stream>>>(
        a.dw_part, a.db_part, parts, a.N, dw, db);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return present(t) ? t->data_ptr<T>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cuda(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    double eps, bool rms) {
  // fastlm/ops/norm.py validates arguments; this turns a broken contract into an exception
  // rather than an illegal memory access.
  check_norm_fwd(x, weight, bias, residual, at::kCUDA);
  const int64_t M = x.size(0), N = x.size(1);

  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_res = present(residual);
  auto y = at::empty_like(x);
  auto h = has_res ? at::empty_like(x) : at::empty({0}, x.options());
  const auto stat_opts = x.options().dtype(at::kFloat);
  auto mean = rms ? at::empty({0}, stat_opts) : at::empty({M}, stat_opts);
  auto rstd = at::empty({M}, stat_opts);
  if (M == 0) return {y, h, mean, rstd};
  if (N == 0) {  // statistics of nothing are 0/0, as on the CPU backend
    mean.fill_(NAN);
    rstd.fill_(NAN);
    return {y, h, mean, rstd};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "norm", [&](auto tag) {
    using T = decltype(tag);
    const FwdArgs<T> a{x.data_ptr<T>(), ptr_or_null<T>(residual), ptr_or_null<T>(weight),
                       ptr_or_null<T>(bias), y.data_ptr<T>(), has_res ? h.data_ptr<T>() : nullptr,
                       rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), M, N,
                       static_cast<float>(eps), rms};
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = N % kVec == 0 && aligned16(a.x) && aligned16(a.res) && aligned16(a.w) &&
                     aligned16(a.b) && aligned16(a.y) && aligned16(a.h);
    if (vec) run_fwd<T, kVec>(a, stream); else run_fwd<T, 1>(a, stream);
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const OptTensor& dh, bool rms, bool has_bias) {
  check_norm_bwd(dy, x, weight, mean, rstd, dh, rms, at::kCUDA);
  const int64_t M = x.size(0), N = x.size(1);

  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_w = present(weight);
  auto dx = at::empty_like(x);
  // Sums over no rows are zeros.
  auto dw = has_w ? (M == 0 ? at::zeros_like(*weight) : at::empty_like(*weight)) : at::empty({0}, x.options());
  auto db = has_bias ? (M == 0 ? at::zeros({N}, x.options()) : at::empty({N}, x.options()))
                     : at::empty({0}, x.options());
  if (M == 0 || N == 0) return {dx, dw, db};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "norm", [&](auto tag) {
    using T = decltype(tag);
    const BwdArgs<T> a{dy.data_ptr<T>(), x.data_ptr<T>(), ptr_or_null<T>(weight),
                       rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
                       ptr_or_null<T>(dh), dx.data_ptr<T>(), nullptr, nullptr, M, N, rms};
    T* dw_ptr = has_w ? dw.data_ptr<T>() : nullptr;
    T* db_ptr = has_bias ? db.data_ptr<T>() : nullptr;
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = N % kVec == 0 && aligned16(a.dy) && aligned16(a.x) && aligned16(a.w) &&
                     aligned16(a.dh) && aligned16(a.dx);
    if (vec) run_bwd<T, kVec>(a, x, dw_ptr, db_ptr, stream); else run_bwd<T, 1>(a, x, dw_ptr, db_ptr, stream);
  });
  return {dx, dw, db};
}

}  // namespace fastlm
