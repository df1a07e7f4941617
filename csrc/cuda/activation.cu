// Bias + GELU on CUDA: fastlm::bias_gelu_fwd_cuda and bias_gelu_bwd_cuda (contract: fastlm.h);
// SiLU times gate (silu_mul_fwd_cuda / _bwd_cuda) at the end of the file.
// Compiled (nvcc -arch=sm_90), not yet run on a GPU.
//
// Memory-bound elementwise work: every input byte read once, every output byte written once, in
// 16-byte accesses when N and the pointers allow it. Forward: a grid-stride loop over packs of the
// flattened (M, N) tensor; a pack never straddles two rows since the pack width divides N.
// Backward: block (32, 8) over a strip of 32 packs of columns; the 8 thread rows step down the
// rows, each thread keeping its columns' dbias sums in registers. The block adds its 8 thread rows
// in shared memory, in a fixed order, and writes one float32 partial row; a second kernel sums
// the partial rows column by column. Deterministic, no atomics.
// The math follows csrc/cpu/activation.cpp: tanh GELU as v * s, s = 1 / (1 + exp(-2u)), so that
// gelu' = s + v * 2u' * e * s^2 from one exponential; exact GELU as v * Phi(v) from erfcf. Extremes
// saturate as there: -0 for every v below about -10, NaN at -inf.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "cuda/common.cuh"
#include "checks.h"
#include "fastlm.h"

namespace fastlm {
namespace {

using cuda::dispatch_float;
using cuda::load;
using cuda::Pack;
using cuda::store;

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr float kRsqrt2 = 0.7071067811865476f;
constexpr float kRsqrt2Pi = 0.3989422804014327f;

// |2u(9.5)| = 76.3: the tanh GELU's derivative runs on v clamped to +-9.5, where it is already 0
// or 1 to float precision, so that e stays finite and e * s * s never meets inf * 0.
constexpr float kTanhClamp = 9.5f;

template <bool TANH>
__device__ __forceinline__ float gelu(float v) {
  if constexpr (TANH) {
    // e unclamped: it overflows to inf below v of about -10, so v / (1 + e) is -0 there (a finite
    // cap on e leaves v / e finite and wrong for huge |v|) and NaN at -inf, as torch's.
    const float e = __expf(-2.f * kSqrt2OverPi * v * (1.f + kCubic * v * v));
    return v / (1.f + e);
  } else {
    // erfc keeps the left tail relatively accurate, where 1 + erf would cancel.
    return v * 0.5f * erfcf(-v * kRsqrt2);
  }
}

template <bool TANH>
__device__ __forceinline__ float gelu_grad(float v) {
  if constexpr (TANH) {
    // (v - v): NaN for +-inf and NaN, as torch's gelu' is there; 0 otherwise.
    const float c = fminf(fmaxf(v, -kTanhClamp), kTanhClamp);
    const float e = __expf(-2.f * kSqrt2OverPi * c * (1.f + kCubic * c * c));
    const float s = 1.f / (1.f + e);
    return s + c * (2.f * kSqrt2OverPi * (1.f + 3.f * kCubic * c * c)) * (e * s * s) + (v - v);
  } else {
    return 0.5f * erfcf(-v * kRsqrt2) + v * __expf(-0.5f * v * v) * kRsqrt2Pi;
  }
}

template <typename T, int VEC, bool TANH>
__global__ void fwd_kernel(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y,
                           int64_t packs, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t i = p * VEC;
    float v[VEC];
    load(x + i, v);
    if (b != nullptr) {
      float bv[VEC];
      load(b + i % n, bv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] += bv[j];
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = gelu<TANH>(v[j]);
    store(y + i, v);
  }
}

constexpr int kBwdX = 32, kBwdY = 8;

// Block (32, 8): thread (tx, ty) owns columns [c, c + VEC), c = (blockIdx.x * 32 + tx) * VEC,
// of rows blockIdx.y * 8 + ty, stepping by gridDim.y * 8.
template <typename T, int VEC, bool TANH>
__global__ void __launch_bounds__(kBwdX * kBwdY) bwd_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ dx,
    float* __restrict__ db_part, int64_t m, int64_t n) {
  __shared__ float s_db[kBwdY][kBwdX * VEC];
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kBwdX + threadIdx.x) * VEC;
  const bool active = col < n;
  float bv[VEC], acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) bv[j] = acc[j] = 0.f;
  if (active && b != nullptr) load(b + col, bv);
  if (active) {
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kBwdY + threadIdx.y; row < m;
         row += static_cast<int64_t>(gridDim.y) * kBwdY) {
      const int64_t off = row * n + col;
      float v[VEC], g[VEC];
      load(x + off, v);
      load(dy + off, g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        g[j] *= gelu_grad<TANH>(v[j] + bv[j]);
        acc[j] += g[j];
      }
      store(dx + off, g);
    }
  }
  if (db_part == nullptr) return;  // uniform across the block: no barrier is skipped by some only
#pragma unroll
  for (int j = 0; j < VEC; ++j) s_db[threadIdx.y][threadIdx.x * VEC + j] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < kBwdY; ++k) s += s_db[k][threadIdx.x * VEC + j];
      db_part[static_cast<int64_t>(blockIdx.y) * n + col + j] = s;
    }
  }
}

// db[c] = sum over p of part[p][c], in p order.
__global__ void sum_partials_kernel(const float* __restrict__ part, int64_t parts, int64_t n, float* __restrict__ db) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float s = 0.f;
  for (int64_t p = 0; p < parts; ++p) s += part[p * n + col];
  db[col] = s;
}

// ---- host -------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return present(t) ? t->data_ptr<T>() : nullptr;
}

int sm_count(const at::Tensor& x) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  return sms;
}

template <typename T, int VEC>
void run_fwd(const T* x, const T* b, T* y, int64_t m, int64_t n, bool tanh, int sms, cudaStream_t stream) {
  const int64_t packs = m * n / VEC;
  constexpr int kBlock = 256;
  // Enough resident blocks to fill every SM; the grid-stride loop covers the rest.
  const int64_t grid = std::min<int64_t>(ceil_div(packs, kBlock), static_cast<int64_t>(sms) * 8);
  if (tanh) {
    fwd_kernel<T, VEC, true><<<static_cast<unsigned int>(grid), kBlock, 0, stream>>>(x, b, y, packs, n);
  } else {
    fwd_kernel<T, VEC, false><<<static_cast<unsigned int>(grid), kBlock, 0, stream>>>(x, b, y, packs, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void run_bwd(const T* dy, const T* x, const T* b, T* dx, float* db, int64_t m, int64_t n, bool tanh, int sms,
             const at::Tensor& like, cudaStream_t stream) {
  const int64_t strips = ceil_div(n, static_cast<int64_t>(kBwdX) * VEC);
  TORCH_CHECK(strips <= INT_MAX, "bias_gelu (cuda): rows too long");
  // Without dbias, one block per 8 rows; with it, a few blocks per SM, so that the partial rows
  // stay few. Either way at most 65535 row blocks (the grid's y limit); blocks loop over the rest.
  const int64_t want = db == nullptr ? ceil_div(m, kBwdY) : ceil_div(4 * static_cast<int64_t>(sms), strips);
  const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>({want, ceil_div(m, kBwdY), 65535}));
  at::Tensor part;
  float* part_ptr = nullptr;
  if (db != nullptr) {
    part = at::empty({row_blocks, n}, like.options().dtype(at::kFloat));
    part_ptr = part.data_ptr<float>();
  }
  const dim3 grid(static_cast<unsigned int>(strips), static_cast<unsigned int>(row_blocks));
  const dim3 block(kBwdX, kBwdY);
  if (tanh) {
    bwd_kernel<T, VEC, true><<<grid, block, 0, stream>>>(dy, x, b, dx, part_ptr, m, n);
  } else {
    bwd_kernel<T, VEC, false><<<grid, block, 0, stream>>>(dy, x, b, dx, part_ptr, m, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (db != nullptr) {
    sum_partials_kernel<<<static_cast<unsigned int>(ceil_div(n, 256)), 256, 0, stream>>>(part_ptr, row_blocks, n,
                                                                                         db);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x, const OptTensor& bias, bool tanh) {
  // fastlm/ops/activation.py validates arguments; this turns a broken contract into an
  // exception rather than an illegal memory access.
  check_bias_gelu("bias_gelu_fwd", x, bias, nullptr, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), n = x.size(1);
  auto y = at::empty_like(x);
  if (m == 0 || n == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x);
  dispatch_float(x.scalar_type(), "bias_gelu", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* bp = ptr_or_null<T>(bias);
    T* yp = y.data_ptr<T>();
    constexpr int kVec = 16 / sizeof(T);
    if (n % kVec == 0 && aligned16(xp) && aligned16(bp) && aligned16(yp)) {
      run_fwd<T, kVec>(xp, bp, yp, m, n, tanh, sms, stream);
    } else {
      run_fwd<T, 1>(xp, bp, yp, m, n, tanh, sms, stream);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                      const OptTensor& bias, bool tanh, bool need_dbias) {
  check_bias_gelu("bias_gelu_bwd", x, bias, &dy, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), n = x.size(1);
  auto dx = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  // A sum over no rows is zeros.
  auto db = need_dbias ? (m == 0 ? at::zeros({n}, f32) : at::empty({n}, f32)) : at::empty({0}, f32);
  if (m == 0 || n == 0) return {dx, db};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x);
  dispatch_float(x.scalar_type(), "bias_gelu", [&](auto tag) {
    using T = decltype(tag);
    const T* gp = dy.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const T* bp = ptr_or_null<T>(bias);
    T* dxp = dx.data_ptr<T>();
    float* dbp = need_dbias ? db.data_ptr<float>() : nullptr;
    constexpr int kVec = 16 / sizeof(T);
    if (n % kVec == 0 && aligned16(gp) && aligned16(xp) && aligned16(bp) && aligned16(dxp)) {
      run_bwd<T, kVec>(gp, xp, bp, dxp, dbp, m, n, tanh, sms, x, stream);
    } else {
      run_bwd<T, 1>(gp, xp, bp, dxp, dbp, m, n, tanh, sms, x, stream);
    }
  });
  return {dx, db};
}

}  // namespace fastlm

// ---- SiLU times gate ---------------------------------------------------------------------------
// silu_mul_fwd_cuda / silu_mul_bwd_cuda (contract: fastlm.h). Compiled (nvcc -arch=sm_90), not yet
// run on a GPU. The formulas and their extremes are csrc/cpu/activation.cpp's: silu(g) = g / (1 + e),
// e = exp(-g) unclamped, so -0 below about -88 and NaN at -inf as torch's; 1 - s taken as e * s
// for g > 0, where 1 - s would cancel. Block rows of 256 threads walk a row in packs of 16 bytes
// when every pointer, the width and every row stride allow it (the halves of a fused gate_up
// projection do for even widths), one element at a time otherwise; blockIdx.y steps over rows.
// Contiguous inputs are walked as one long row, so short rows fill the blocks too.
namespace fastlm {
namespace {

struct SiluRows {
  int64_t m, n, gs, us, ds;  // rows, columns, row strides of gate, up and dy (in elements)
};

__device__ __forceinline__ float silu_f(float g) { return g / (1.f + __expf(-g)); }

template <typename T, int VEC>
__global__ void silu_mul_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y,
                                    SiluRows r) {
  const int64_t packs = r.n / VEC, step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.y; row < r.m; row += gridDim.y) {
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += step) {
      const int64_t c = p * VEC;
      float gv[VEC], uv[VEC];
      load(g + row * r.gs + c, gv);
      load(u + row * r.us + c, uv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) gv[j] = silu_f(gv[j]) * uv[j];
      store(y + row * r.n + c, gv);
    }
  }
}

template <typename T, int VEC>
__global__ void silu_mul_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ g, const T* __restrict__ u,
                                    T* __restrict__ dg, T* __restrict__ du, SiluRows r) {
  const int64_t packs = r.n / VEC, step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.y; row < r.m; row += gridDim.y) {
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += step) {
      const int64_t c = p * VEC;
      float gv[VEC], uv[VEC], d[VEC];
      load(g + row * r.gs + c, gv);
      load(u + row * r.us + c, uv);
      load(dy + row * r.ds + c, d);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float e = __expf(-gv[j]);
        const float s = 1.f / (1.f + e);
        const float one_minus_s = gv[j] > 0.f ? e * s : 1.f - s;
        const float dsilu = s * (1.f + gv[j] * one_minus_s);
        uv[j] = d[j] * uv[j] * dsilu;  // dgate
        d[j] = d[j] * (gv[j] * s);     // dup
      }
      store(dg + row * r.n + c, uv);
      store(du + row * r.n + c, d);
    }
  }
}

SiluRows silu_rows(const at::Tensor& gate, const at::Tensor& up, const at::Tensor* dy) {
  const int64_t m = gate.size(0), n = gate.size(1);
  auto stride = [&](const at::Tensor& t) { return m <= 1 ? n : t.stride(0); };
  SiluRows r{m, n, stride(gate), stride(up), dy ? stride(*dy) : n};
  if (r.gs == n && r.us == n && r.ds == n) r = SiluRows{1, m * n, m * n, m * n, m * n};
  return r;
}

// Packs of VEC fit when the width and every row stride are multiples of VEC and the pointers align.
template <int VEC>
bool packs_fit(const SiluRows& r, std::initializer_list<const void*> ptrs) {
  if (r.n % VEC || r.gs % VEC || r.us % VEC || r.ds % VEC) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

// (grid, block): 256 threads along a row; enough blocks across rows and along them to fill the SMs.
std::pair<dim3, dim3> silu_grid(const SiluRows& r, int vec, int sms) {
  constexpr int64_t kBlock = 256;
  const int64_t rows = std::min<int64_t>(r.m, 65535);
  const int64_t along = ceil_div(r.n / vec, kBlock);
  const int64_t x = std::max<int64_t>(1, std::min<int64_t>(along, ceil_div(8 * static_cast<int64_t>(sms), rows)));
  return {dim3(static_cast<unsigned int>(std::min<int64_t>(x, INT_MAX)), static_cast<unsigned int>(rows)),
          dim3(static_cast<unsigned int>(kBlock))};
}

}  // namespace

at::Tensor silu_mul_fwd_cuda(const at::Tensor& gate, const at::Tensor& up) {
  check_silu_mul("silu_mul_fwd", gate, up, nullptr, at::kCUDA);
  const c10::cuda::CUDAGuard guard(gate.device());
  auto y = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const SiluRows r = silu_rows(gate, up, nullptr);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(gate);
  dispatch_float(gate.scalar_type(), "silu_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* gp = gate.data_ptr<T>();
    const T* up_ = up.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    constexpr int kVec = 16 / sizeof(T);
    if (packs_fit<kVec>(r, {gp, up_, yp})) {
      const auto [grid, block] = silu_grid(r, kVec, sms);
      silu_mul_fwd_kernel<T, kVec><<<grid, block, 0, stream>>>(gp, up_, yp, r);
    } else {
      const auto [grid, block] = silu_grid(r, 1, sms);
      silu_mul_fwd_kernel<T, 1><<<grid, block, 0, stream>>>(gp, up_, yp, r);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_bwd_cuda(const at::Tensor& dy, const at::Tensor& gate,
                                                     const at::Tensor& up) {
  check_silu_mul("silu_mul_bwd", gate, up, &dy, at::kCUDA);
  const c10::cuda::CUDAGuard guard(gate.device());
  const auto opts = gate.options().memory_format(at::MemoryFormat::Contiguous);
  auto dg = at::empty(gate.sizes(), opts), du = at::empty(gate.sizes(), opts);
  if (dg.numel() == 0) return {dg, du};
  const SiluRows r = silu_rows(gate, up, &dy);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(gate);
  dispatch_float(gate.scalar_type(), "silu_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* dyp = dy.data_ptr<T>();
    const T* gp = gate.data_ptr<T>();
    const T* up_ = up.data_ptr<T>();
    T* dgp = dg.data_ptr<T>();
    T* dup = du.data_ptr<T>();
    constexpr int kVec = 16 / sizeof(T);
    if (packs_fit<kVec>(r, {dyp, gp, up_, dgp, dup})) {
      const auto [grid, block] = silu_grid(r, kVec, sms);
      silu_mul_bwd_kernel<T, kVec><<<grid, block, 0, stream>>>(dyp, gp, up_, dgp, dup, r);
    } else {
      const auto [grid, block] = silu_grid(r, 1, sms);
      silu_mul_bwd_kernel<T, 1><<<grid, block, 0, stream>>>(dyp, gp, up_, dgp, dup, r);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dg, du};
}

}  // namespace fastlm
