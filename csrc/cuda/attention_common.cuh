// What the attention kernels of attention.cu (training) and decode_attention.cu (flash-decoding)
// share: the head dim limit, the (B, H, T, D) head offset, and the host-side checks of q, k and v
// and of a kernel's shared memory, so that both give the same errors for the same bad input.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <climits>
#include <cstdint>

namespace fastlm::cuda {

constexpr int kMaxHeadDim = 256;

// Elements before row 0 of head h of batch b in a (B, H, T, D) tensor.
__device__ __forceinline__ int64_t head_offset(int b, int h, int H, int T, int D) {
  return (static_cast<int64_t>(b) * H + h) * T * D;
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Raises the kernel's dynamic shared memory limit when it needs more than the default 48 KB.
template <typename K>
void set_smem(K kernel, size_t bytes, const at::Tensor& t, const char* op) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, t.get_device()));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), op, " (cuda): needs ", bytes,
              " bytes of shared memory per block, the device allows ", optin);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op,
              " (cuda): the cuda backend supports float16, bfloat16 and float32; ", name,
              " has dtype ", dt);
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, " (cuda): ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, " (cuda): ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, " (cuda): ", name, " must be contiguous");
}

// q (B, Hq, Tq, D); k and v (B, Hk, Tk, D); Hq a multiple of Hk; D <= 256; sizes fit the
// kernels' int indices and grid limits.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op,
               const char* kname, const char* vname) {
  TORCH_CHECK(q.is_cuda(), op, " (cuda): q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4, op, " (cuda): q must be 4-D (B, Hq, Tq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, " (cuda): ", kname, " must be 4-D (B, Hk, Tk, D), got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, " (cuda): ", vname, " must have ", kname, "'s shape ",
              k.sizes(), ", got ", v.sizes());
  check_dtype(q, op, "q");
  TORCH_CHECK(q.is_contiguous(), op, " (cuda): q must be contiguous");
  check_same(k, q, op, kname, "q");
  check_same(v, q, op, vname, "q");
  TORCH_CHECK(k.size(0) == q.size(0), op, " (cuda): ", kname, " has batch ", k.size(0), " but q has ",
              q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), op, " (cuda): ", kname, " has head dim ", k.size(3),
              " but q has ", q.size(3));
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, " (cuda): q's ", q.size(1),
              " heads are not a multiple of ", kname, "'s ", k.size(1));
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, op,
              " (cuda): head dim must be between 1 and ", kMaxHeadDim, ", got ", q.size(3));
  TORCH_CHECK(q.size(2) <= INT_MAX / 2 && k.size(2) <= INT_MAX / 2, op,
              " (cuda): sequence too long for the cuda kernels");
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535, op,
              " (cuda): batch and head counts must be at most 65535, got ", q.size(0), " and ", q.size(1));
}

}  // namespace fastlm::cuda
