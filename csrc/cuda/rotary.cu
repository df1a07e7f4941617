// Rotary position embedding on CUDA: fastlm::rotary_fwd_cuda and rotary_pos_fwd_cuda (contract:
// fastlm.h). Compiled (nvcc -arch=sm_90), not yet run on a GPU.
//
// One block per (batch, position): it puts the position's R cos/sin entries in shared memory
// (from the table, or for positions from a float64 angle reduced to [-pi, pi] and a float32
// sincosf, which --use_fast_math makes the intrinsic, accurate to about 4e-7 there), then its
// threads walk (head, pair) of q or k, so the angles are made once per position for every head. Consecutive threads take consecutive pairs: in the
// rotate-half layout the two channels of a pair are two coalesced streams R/2 apart, interleaved
// they are adjacent and move as one 2-element access. Pass-through channels (R..D) are copied by
// the same threads afterwards. Math as csrc/cpu/rotary.cpp:
//   forward   a' = a c_a - b s_a,   b' = b c_b + a s_b
//   backward  a' = a c_a + b s_b,   b' = b c_b - a s_a
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

#include "cuda/common.cuh"
#include "checks.h"
#include "fastlm.h"

namespace fastlm {
namespace {

using cuda::dispatch_float;

constexpr int kThreads = 256;

struct Heads {
  const void* src;
  void* dst;
  int64_t n, sb, sh, st;
};

struct Angles {
  const float* cos;        // (Bc, T, R) or null for positions
  const float* sin;
  const int64_t* positions;  // (Bp, T)
  const double* inv_freq;    // (R / 2)
  int64_t batch_stride;      // of the table or positions; 0 for batch 1
};

template <typename T>
__global__ void rotary_kernel(Heads hd, Angles an, int64_t t_len, int d, int r, bool interleaved,
                              bool backward) {
  extern __shared__ float cs[];  // cos then sin, R each
  const int64_t b = blockIdx.x / t_len, t = blockIdx.x % t_len;
  const int half = r / 2;
  if (an.cos != nullptr) {
    const int64_t row = b * an.batch_stride + t * r;
    for (int i = threadIdx.x; i < r; i += blockDim.x) {
      cs[i] = an.cos[row + i];
      cs[r + i] = an.sin[row + i];
    }
  } else {
    const double p = static_cast<double>(an.positions[b * an.batch_stride + t]);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      const double angle = p * an.inv_freq[i];
      const float red = static_cast<float>(angle - rint(angle * 0.15915494309189535) * 6.283185307179586);
      float s, c;
      sincosf(red, &s, &c);
      const int a = interleaved ? 2 * i : i, bb = interleaved ? 2 * i + 1 : i + half;
      cs[a] = cs[bb] = c;
      cs[r + a] = cs[r + bb] = s;
    }
  }
  __syncthreads();
  const float* c = cs;
  const float* s = cs + r;
  const T* src = static_cast<const T*>(hd.src) + b * hd.sb + t * hd.st;
  T* dst = static_cast<T*>(hd.dst) + (b * hd.n * t_len + t) * d;
  const int64_t head_step = t_len * d;
  for (int64_t idx = threadIdx.x; idx < hd.n * half; idx += blockDim.x) {
    const int64_t h = idx / half;
    const int i = static_cast<int>(idx % half);
    const int a = interleaved ? 2 * i : i, bb = interleaved ? 2 * i + 1 : i + half;
    const T* x = src + h * hd.sh;
    T* y = dst + h * head_step;
    const float xa = static_cast<float>(x[a]), xb = static_cast<float>(x[bb]);
    if (backward) {
      y[a] = static_cast<T>(xa * c[a] + xb * s[bb]);
      y[bb] = static_cast<T>(xb * c[bb] - xa * s[a]);
    } else {
      y[a] = static_cast<T>(xa * c[a] - xb * s[a]);
      y[bb] = static_cast<T>(xb * c[bb] + xa * s[bb]);
    }
  }
  const int rest = d - r;
  for (int64_t idx = threadIdx.x; idx < hd.n * rest; idx += blockDim.x) {
    const int64_t h = idx / rest;
    const int j = r + static_cast<int>(idx % rest);
    dst[h * head_step + j] = src[h * hd.sh + j];
  }
}

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& q, const at::Tensor& k, int r, const Angles& an,
                                       bool interleaved, bool backward) {
  const c10::cuda::CUDAGuard guard(q.device());
  auto qo = at::empty(q.sizes(), q.options());
  auto ko = at::empty(k.sizes(), k.options());
  const int64_t batch = q.size(0), t_len = q.size(2);
  const int d = static_cast<int>(q.size(3));
  if (batch == 0 || t_len == 0 || d == 0) return {qo, ko};
  TORCH_CHECK(batch * t_len <= INT32_MAX, "rotary (cuda): batch * time must fit the grid, got ", batch * t_len);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(q.scalar_type(), "rotary", [&](auto tag) {
    using T = decltype(tag);
    for (const auto& [x, y] : {std::pair{&q, &qo}, std::pair{&k, &ko}}) {
      if (x->size(1) == 0) continue;
      const Heads hd{x->data_ptr(), y->data_ptr(), x->size(1), x->stride(0), x->stride(1), x->stride(2)};
      rotary_kernel<T><<<static_cast<unsigned>(batch * t_len), kThreads, 2 * r * sizeof(float), stream>>>(
          hd, an, t_len, d, r, interleaved, backward);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {qo, ko};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                   const at::Tensor& sin, bool interleaved, bool backward) {
  check_rotary_qk("rotary_fwd", q, k, at::kCUDA);
  check_rotary_table(q, cos, sin, at::kCUDA);
  const int64_t r = cos.size(2);
  const Angles an{cos.data_ptr<float>(), sin.data_ptr<float>(), nullptr, nullptr,
                  cos.size(0) == 1 ? 0 : q.size(2) * r};
  return run(q, k, static_cast<int>(r), an, interleaved, backward);
}

std::tuple<at::Tensor, at::Tensor> rotary_pos_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& positions, double theta, int64_t rotary_dim,
                                                       bool interleaved, bool backward) {
  check_rotary_qk("rotary_pos_fwd", q, k, at::kCUDA);
  check_rotary_positions(q, positions, theta, rotary_dim, at::kCUDA);
  // theta ** (-2i / R) on the host side of the device: a tiny tensor, made by torch in float64.
  auto i = at::arange(rotary_dim / 2, q.options().dtype(at::kDouble));
  auto inv_freq = at::pow(theta, i * (-2.0 / static_cast<double>(rotary_dim > 0 ? rotary_dim : 1))).contiguous();
  const Angles an{nullptr, nullptr, positions.data_ptr<int64_t>(), inv_freq.data_ptr<double>(),
                  positions.size(0) == 1 ? 0 : q.size(2)};
  return run(q, k, static_cast<int>(rotary_dim), an, interleaved, backward);
}

}  // namespace fastlm
