// Pieces every CUDA kernel file uses: a vector of elements moved as one memory access (and its
// load to / store from float), and the dtype switch from a tensor's ScalarType to the C++ type its
// kernels are instantiated for.
#pragma once

#include <ATen/ATen.h>

namespace fastlm::cuda {

// VEC elements of T, aligned so that a load or store of the whole is one 2- to 16-byte access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC elements of T at p (aligned for a Pack) to float, one access; and back, rounding to T.
template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<float>(pk.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = static_cast<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// Calls f(T{}) with T the C++ type of dt, one of the dtypes the CUDA backend supports.
template <typename F>
void dispatch_float(at::ScalarType dt, const char* op, F&& f) {
  switch (dt) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, " (cuda): unsupported dtype ", dt);
  }
}

}  // namespace fastlm::cuda
