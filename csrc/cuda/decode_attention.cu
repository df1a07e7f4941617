// Decode attention on CUDA: fastlm::decode_attention_cuda (contract: fastlm.h). Compiled
// (nvcc -arch=sm_90), not yet run on a GPU.
//
// Flash-decoding: the cache of each sequence is cut into chunks, each chunk's partial softmax state
// (m, l, unnormalised acc) goes to a float32 workspace, and a second kernel merges the chunks. A
// block serves up to 8 query rows of one key/value head (a GQA group times the new tokens), so the
// cache is read once per group. Scores are in base 2, as in attention.cu: x = q.k * scale * log2(e),
// p = exp2(x - max); a row with no visible key is written as 0.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "cuda/attention_common.cuh"
#include "cuda/common.cuh"
#include "fastlm.h"

namespace fastlm {
namespace {

using cuda::aligned16;
using cuda::ceil_div;
using cuda::check_qkv;
using cuda::dispatch_float;
using cuda::head_offset;
using cuda::Pack;
using cuda::set_smem;

constexpr int kDecRows = 8;      // query rows per block (a warp each in the softmax step)
constexpr int kDecKeys = 32;     // keys per shared-memory tile
constexpr int kDecThreads = 256;

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const void* seqlens;
  bool seqlens64;
  float* part_acc;  // (B * Hq * Tn, n_chunks, D): unnormalised sum of p * v per chunk
  float* part_ml;   // (B * Hq * Tn, n_chunks, 2): running max (base 2) and sum of p per chunk
  int Hq, Hk, Tn, Tmax, D, chunk, n_chunks, row_groups;
  float scale_log2;
};

// Valid cache length of sequence b, clamped into [0, Tmax] so that a bad value never reads
// outside the cache.
__device__ __forceinline__ int seq_len(const DecodeParams& p, int b) {
  const int64_t n = p.seqlens64 ? static_cast<const int64_t*>(p.seqlens)[b]
                                : static_cast<const int32_t*>(p.seqlens)[b];
  return static_cast<int>(n < 0 ? 0 : (n > p.Tmax ? p.Tmax : n));
}

// Row stride of the K tile in floats. In the score step lane j reads row j: with 16-byte reads
// (VEC > 1, so 4 | D) a stride of 4 mod 32 puts the 8 rows of a quarter-warp in distinct groups
// of 4 banks; with scalar reads an odd stride puts the 32 rows in distinct banks.
__host__ __device__ constexpr int decode_k_stride(int D, int vec) {
  return vec > 1 ? (D + 31) / 32 * 32 + 4 : (D | 1);
}

constexpr int decode_smem_floats(int D, int vec) {
  return kDecRows * D + kDecKeys * decode_k_stride(D, vec) + kDecKeys * D + kDecRows * kDecKeys + kDecRows +
         kDecRows * kDecThreads;
}

// grid (B * Hk * row_groups, n_chunks). Row rr of a key/value head's G * Tn query rows is query
// head hk * G + rr / Tn, new token rr % Tn, at position len - Tn + rr % Tn.
template <typename T, int VEC>
__global__ void __launch_bounds__(kDecThreads) decode_partial_kernel(const DecodeParams p) {
  extern __shared__ __align__(16) float fsm[];
  const int D = p.D, LDK = decode_k_stride(D, VEC);
  float* sQ = fsm;                           // kDecRows x D, times scale * log2(e)
  float* sK = sQ + kDecRows * D;             // kDecKeys x LDK
  float* sV = sK + kDecKeys * LDK;           // kDecKeys x D
  float* sP = sV + kDecKeys * D;             // kDecRows x kDecKeys: scores, then p
  float* sAlpha = sP + kDecRows * kDecKeys;  // kDecRows
  float* sRed = sAlpha + kDecRows;           // kDecRows x kDecThreads

  const int G = p.Hq / p.Hk;
  const int rg = blockIdx.x % p.row_groups, hk = (blockIdx.x / p.row_groups) % p.Hk;
  const int b = blockIdx.x / p.row_groups / p.Hk, c = blockIdx.y;
  const int len = seq_len(p, b);
  const int k_begin = c * p.chunk, k_end = min(k_begin + p.chunk, len);
  if (k_begin >= k_end) return;  // the combine kernel reads only chunks below len
  const int rows = min(kDecRows, G * p.Tn - rg * kDecRows);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  auto row_index = [&](int r) {  // row of (B * Hq * Tn)
    const int rr = rg * kDecRows + r;
    return (static_cast<int64_t>(b) * p.Hq + hk * G + rr / p.Tn) * p.Tn + rr % p.Tn;
  };

  for (int e = tid; e < kDecRows * D; e += kDecThreads) {
    const int r = e / D, d = e % D;
    sQ[e] = r < rows ? static_cast<float>(static_cast<const T*>(p.q)[row_index(r) * D + d]) * p.scale_log2 : 0.f;
  }
  // Causal position of this thread's score row (warp = row in the score and softmax steps).
  const int pos = len - p.Tn + (rg * kDecRows + warp) % p.Tn;
  float row_max = -INFINITY, row_sum = 0.f;  // of row `warp`, the same in every lane
  // Output step: thread owns column d of key group grp (keys grp, grp + KG, ... of a tile).
  const int KG = kDecThreads / D, grp = tid / D, dcol = tid % D;
  const bool out_lane = grp < KG;
  float acc[kDecRows];
#pragma unroll
  for (int r = 0; r < kDecRows; ++r) acc[r] = 0.f;

  const int64_t kv_off = head_offset(b, hk, p.Hk, p.Tmax, D);
  const T* kc = static_cast<const T*>(p.k) + kv_off;
  const T* vc = static_cast<const T*>(p.v) + kv_off;
  const int cpr = D / VEC;  // VEC divides D
  for (int j0 = k_begin; j0 < k_end; j0 += kDecKeys) {
    const int nk = min(kDecKeys, k_end - j0);
    __syncthreads();  // the previous tile's readers are done (and sQ is written)
    // Consecutive threads take consecutive VEC-element pieces of a row: coalesced loads, and
    // conflict-free (VEC == 1) or at most 2-way (float4) shared stores.
    for (int e = tid; e < kDecKeys * cpr; e += kDecThreads) {
      const int jj = e / cpr, d0 = (e % cpr) * VEC;
      float kf[VEC], vf[VEC];
      if (jj < nk) {
        const Pack<T, VEC> kp = *reinterpret_cast<const Pack<T, VEC>*>(kc + static_cast<int64_t>(j0 + jj) * D + d0);
        const Pack<T, VEC> vp = *reinterpret_cast<const Pack<T, VEC>*>(vc + static_cast<int64_t>(j0 + jj) * D + d0);
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
          kf[u] = static_cast<float>(kp.v[u]);
          vf[u] = static_cast<float>(vp.v[u]);
        }
      } else {
#pragma unroll
        for (int u = 0; u < VEC; ++u) kf[u] = vf[u] = 0.f;
      }
      if constexpr (VEC > 1) {
#pragma unroll
        for (int u = 0; u < VEC; u += 4) {
          *reinterpret_cast<float4*>(sK + jj * LDK + d0 + u) = make_float4(kf[u], kf[u + 1], kf[u + 2], kf[u + 3]);
          *reinterpret_cast<float4*>(sV + jj * D + d0 + u) = make_float4(vf[u], vf[u + 1], vf[u + 2], vf[u + 3]);
        }
      } else {
        sK[jj * LDK + d0] = kf[0];
        sV[jj * D + d0] = vf[0];
      }
    }
    __syncthreads();
    if (warp < rows) {  // score of row `warp` against key `lane`
      const float* qr = sQ + warp * D;  // the same address in every lane: a broadcast
      const float* kr = sK + lane * LDK;
      float s = 0.f;
      if constexpr (VEC > 1) {
        for (int d = 0; d < D; d += 4) {
          const float4 a = *reinterpret_cast<const float4*>(qr + d);
          const float4 k4 = *reinterpret_cast<const float4*>(kr + d);
          s += a.x * k4.x + a.y * k4.y + a.z * k4.z + a.w * k4.w;
        }
      } else {
        for (int d = 0; d < D; ++d) s += qr[d] * kr[d];
      }
      const int j = j0 + lane;
      s = lane < nk && j <= pos ? s : -INFINITY;
      float mx = fmaxf(row_max, s);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(row_max - base);
      const float pr = exp2f(s - base);
      float sum = pr;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      row_sum = row_sum * alpha + sum;
      row_max = mx;
      sP[warp * kDecKeys + lane] = pr;
      if (lane == 0) sAlpha[warp] = alpha;
    }
    __syncthreads();
    if (out_lane) {
#pragma unroll
      for (int r = 0; r < kDecRows; ++r)
        if (r < rows) acc[r] *= sAlpha[r];
      for (int jj = grp; jj < nk; jj += KG) {
        const float vv = sV[jj * D + dcol];
#pragma unroll
        for (int r = 0; r < kDecRows; ++r)
          if (r < rows) acc[r] += sP[r * kDecKeys + jj] * vv;
      }
    }
  }

  // Sum the key groups' accumulators and write the chunk's partial state.
  if (out_lane) {
#pragma unroll
    for (int r = 0; r < kDecRows; ++r)
      if (r < rows) sRed[(r * KG + grp) * D + dcol] = acc[r];
  }
  __syncthreads();
  for (int e = tid; e < rows * D; e += kDecThreads) {
    const int r = e / D, d = e % D;
    float s = 0.f;
    for (int q = 0; q < KG; ++q) s += sRed[(r * KG + q) * D + d];
    p.part_acc[(row_index(r) * p.n_chunks + c) * D + d] = s;
  }
  if (warp < rows && lane == 0) {
    float* ml = p.part_ml + (row_index(warp) * p.n_chunks + c) * 2;
    ml[0] = row_max;
    ml[1] = row_sum;
  }
}

// One block per query row: out = sum_c acc_c 2^(m_c - M) / sum_c l_c 2^(m_c - M), M = max_c m_c.
template <typename T>
__global__ void decode_combine_kernel(const DecodeParams p, T* out) {
  const int64_t row = blockIdx.x;
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Hq) * p.Tn));
  const int len = seq_len(p, b);
  const int used = min(p.n_chunks, (len + p.chunk - 1) / p.chunk);
  const float* ml = p.part_ml + row * p.n_chunks * 2;
  float M = -INFINITY;
  for (int c = 0; c < used; ++c) M = fmaxf(M, ml[2 * c]);
  float L = 0.f;
  if (M != -INFINITY)
    for (int c = 0; c < used; ++c) L += ml[2 * c + 1] * exp2f(ml[2 * c] - M);
  const float inv = L > 0.f ? 1.f / L : 0.f;
  const float* acc = p.part_acc + row * p.n_chunks * p.D;
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
    float o = 0.f;
    if (inv > 0.f)
      for (int c = 0; c < used; ++c) o += acc[static_cast<int64_t>(c) * p.D + d] * exp2f(ml[2 * c] - M);
    out[row * p.D + d] = static_cast<T>(o * inv);
  }
}

}  // namespace

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& cache_seqlens, double scale) {
  constexpr const char* op = "decode_attention";
  check_qkv(q, k_cache, v_cache, op, "k_cache", "v_cache");
  const int64_t B = q.size(0), Hq = q.size(1), Tn = q.size(2), Hk = k_cache.size(1), Tmax = k_cache.size(2);
  const int D = static_cast<int>(q.size(3));
  TORCH_CHECK(cache_seqlens.device() == q.device(), op, " (cuda): cache_seqlens is on ",
              cache_seqlens.device(), " but q is on ", q.device());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong, op,
              " (cuda): cache_seqlens must be int32 or int64, got ", cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B && cache_seqlens.is_contiguous(), op,
              " (cuda): cache_seqlens must be a contiguous 1-D tensor of ", B, " lengths, got shape ",
              cache_seqlens.sizes());
  TORCH_CHECK(Tn <= Tmax, op, " (cuda): q holds ", Tn, " new tokens but the cache only ", Tmax, " positions");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty_like(q);
  if (out.numel() == 0) return out;
  // Lengths stay on the device (reading them here would stall the stream); the kernels clamp
  // them into [0, Tmax], and fastlm/ops validates them for callers that want the check.

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  const int64_t G = Hq / Hk;
  const int64_t row_groups = ceil_div(G * Tn, kDecRows);
  const int64_t blocks = B * Hk * row_groups;
  TORCH_CHECK(blocks <= INT_MAX && B * Hq * Tn <= INT_MAX, op, " (cuda): too many sequences and heads");
  // Enough chunks for about two blocks per SM, each at least one key tile.
  const int64_t splits = std::clamp<int64_t>(ceil_div(2 * sms, blocks), 1, ceil_div(Tmax, kDecKeys));
  const int64_t chunk = ceil_div(ceil_div(Tmax, splits), kDecKeys) * kDecKeys;
  const int64_t n_chunks = ceil_div(Tmax, chunk);
  TORCH_CHECK(n_chunks <= 65535, op, " (cuda): cache too long");

  const auto f32 = q.options().dtype(at::kFloat);
  auto part_acc = at::empty({B * Hq * Tn, n_chunks, static_cast<int64_t>(D)}, f32);
  auto part_ml = at::empty({B * Hq * Tn, n_chunks, 2}, f32);
  DecodeParams p{};
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.seqlens = cache_seqlens.data_ptr();
  p.seqlens64 = cache_seqlens.scalar_type() == at::kLong;
  p.part_acc = part_acc.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();
  p.Hq = static_cast<int>(Hq);
  p.Hk = static_cast<int>(Hk);
  p.Tn = static_cast<int>(Tn);
  p.Tmax = static_cast<int>(Tmax);
  p.D = D;
  p.chunk = static_cast<int>(chunk);
  p.n_chunks = static_cast<int>(n_chunks);
  p.row_groups = static_cast<int>(row_groups);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = D % kVec == 0 && aligned16(k_cache) && aligned16(v_cache);
    auto kernel = vec ? decode_partial_kernel<T, kVec> : decode_partial_kernel<T, 1>;
    const size_t bytes = decode_smem_floats(D, vec ? kVec : 1) * sizeof(float);
    set_smem(kernel, bytes, q, op);
    kernel<<<dim3(static_cast<unsigned int>(blocks), static_cast<unsigned int>(n_chunks)), kDecThreads, bytes,
             stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    decode_combine_kernel<T><<<static_cast<unsigned int>(B * Hq * Tn), 128, 0, stream>>>(p, out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace fastlm
