// Attention on CUDA: fastlm::attention_fwd_cuda and attention_bwd_cuda (contract: fastlm.h);
// decoding against a KV cache is in decode_attention.cu. Compiled (nvcc -arch=sm_90), not yet run
// on a GPU.
//
// Forward (FlashAttention-2 scheme): one block of 4 warps per (64 query rows, head, batch); each
// warp owns 16 rows. Key/value tiles are staged in shared memory with cp.async, the next tile
// loading while the current one is used; S = Q K^T and O += P V run on tensor cores
// (mma.sync m16n8k16, fragments loaded with ldmatrix), and the softmax is online, in registers,
// in base 2 (log2(e) folded into the scale, so every exponential is one exp2f). Causal blocks
// stop at the diagonal and run heaviest-first. The head dim is padded to one of 32, 64, 96, 128,
// 160, 192, 256 with zero-filled columns.
// Backward: a preprocess kernel for delta = rowsum(dout * out); then one block per 64 keys, each
// warp owning 16 of them, that walks the query blocks of every query head of its GQA group and
// keeps dK and dV in registers (so they are summed over the group for free). dQ needs a sum over
// key blocks, so each block adds its share into a float32 buffer with atomics.
//
// float32 (and float16/bfloat16 when the head dim is not a multiple of 8 or a pointer is not
// 16-byte aligned) takes a plain SIMT tiled path with the same structure; so does the backward
// for head dims over 128, whose dK/dV accumulators would not fit in registers.
//
// Scores are kept in base 2: x = (q.k * scale + mask) * log2(e), so p = exp2(x - max) and
// lse = (max + log2(l)) * ln(2). A row whose every key is masked has max = -inf; it is computed
// with the max replaced by 0 (so no inf - inf), gives l = 0, and is written as 0 with lse = -inf.
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
#include "checks.h"
#include "fastlm.h"

namespace fastlm {
namespace {

using cuda::aligned16;
using cuda::ceil_div;
using cuda::check_dtype;
using cuda::check_qkv;
using cuda::check_same;
using cuda::dispatch_float;
using cuda::head_offset;
using cuda::Pack;
using cuda::set_smem;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- tensor-core and async-copy primitives (sm_80 PTX, which sm_90 runs) ----------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that skips the registers. With pred false it writes 16 zero bytes
// and reads nothing (src-size 0), so src need only be some valid address.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(pred ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and lane l receives
// element (l / 4, 2 (l % 4) + {0, 1}) of each matrix in r[i] (.trans: of its transpose).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row-major): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
//                         a[3] = A[g+8][2t+8..]
//   B (16x8, k by n):     b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C (16x8, float):      c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// So the C fragments of two adjacent n-tiles are, packed to 16 bits, the A fragment of the 16x16
// block they form: that is how P goes from one mma's output to the next one's input.
template <typename T>
struct Mma;

template <>
struct Mma<at::Half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);  // lo at the lower address
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<at::BFloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Shared-memory addresses that each lane hands to ldmatrix, for a tile stored row-major with
// `ld` elements per row (derivations in the comment above Mma):
// A operand, rows r0..r0+15 x cols c0..c0+15 of a row-major [m][k] tile.
__device__ __forceinline__ int a_offset(int lane, int r0, int c0, int ld) {
  return (r0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8;
}
// A operand from a tile stored transposed ([k][m]): k rows k0.., m columns m0.. (use .trans).
__device__ __forceinline__ int at_offset(int lane, int k0, int m0, int ld) {
  return (k0 + (lane >> 4) * 8 + (lane & 7)) * ld + m0 + ((lane >> 3) & 1) * 8;
}
// B operands of two n-tiles (n0..n0+7 in r[0..1], n0+8..n0+15 in r[2..3]) over k0..k0+15, from a
// tile stored [n][k] (no .trans) ...
__device__ __forceinline__ int bn_offset(int lane, int n0, int k0, int ld) {
  return (n0 + (lane >> 4) * 8 + (lane & 7)) * ld + k0 + ((lane >> 3) & 1) * 8;
}
// ... or stored [k][n] (use .trans).
__device__ __forceinline__ int bk_offset(int lane, int k0, int n0, int ld) {
  return (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * ld + n0 + (lane >> 4) * 8;
}

// ---- shared arguments ------------------------------------------------------------------------

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const float* mask;  // null: none; else element (b, h, i, j) at b*msb + h*msh + i*msi + j*msj
  int64_t msb, msh, msi, msj;
  int Hq, Hk, Tq, Tk, D;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e)
  bool causal;
  void* out;         // forward
  float* lse;        // forward output / backward input
  const void* dout;  // backward
  const float* delta;
  float* dq;         // float32 (B, Hq, Tq, D), zeroed, accumulated with atomics
  void* dk;
  void* dv;
};

__device__ __forceinline__ float mask_at(const AttnParams& p, int b, int h, int i, int j) {
  return p.mask[b * p.msb + h * p.msh + i * p.msi + j * p.msj];
}

// Whether key j is visible to query i, for in-range i and j.
__device__ __forceinline__ bool visible(const AttnParams& p, int i, int j) {
  return j < p.Tk && !(p.causal && j > i);
}

// lse in the base-2 form the backward uses; a fully masked row (-inf) becomes +inf so that
// exp2(x - lse) is 0 for every key instead of NaN.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// ---- tensor-core forward ---------------------------------------------------------------------

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kFwdBM = 16 * kWarps;  // query rows per block
constexpr int kBwdBN = 16 * kWarps;  // keys per backward block

// Copies rows row0.. of a (rows_valid, D) matrix of 16-bit elements into a ROWS x DP tile (row
// stride DP + 8), 16 bytes per cp.async; rows past rows_valid and columns past D become zeros.
template <int ROWS, int DP>
__device__ __forceinline__ void load_rows(uint16_t* s, const uint16_t* g, int row0, int rows_valid,
                                          int D) {
  constexpr int kLD = DP + 8, kChunks = DP / 8;
#pragma unroll 4
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = row0 + r < rows_valid && col < D;
    cp_async16(s + r * kLD + col, ok ? g + static_cast<int64_t>(row0 + r) * D + col : g, ok);
  }
}

// Writes a warp's 16 x DP tile (staged in shared memory, row stride DP + 8) to rows row0.. of a
// (rows_valid, D) matrix, 16 bytes per store.
template <int DP>
__device__ __forceinline__ void store_rows16(uint16_t* g, const uint16_t* s, int row0, int rows_valid,
                                             int D, int lane) {
  constexpr int kLD = DP + 8, kChunks = DP / 8;
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    if (row0 + r < rows_valid && col < D)
      *reinterpret_cast<uint4*>(g + static_cast<int64_t>(row0 + r) * D + col) =
          *reinterpret_cast<const uint4*>(s + r * kLD + col);
  }
}

// Shared memory: Q (BM rows), then K and V with two buffers each (BN rows); row stride DP + 8
// elements, which shifts consecutive rows by 16 bytes so the 8 row addresses of one ldmatrix
// fall in distinct banks.
template <int DP, int BN>
constexpr int fwd_smem_bytes() {
  return (kFwdBM + 4 * BN) * (DP + 8) * 2;
}

template <typename T, int DP, int BN>
__global__ void __launch_bounds__(kThreads) fwd_mma_kernel(const AttnParams p) {
  constexpr int kLD = DP + 8;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kFwdBM * kLD;  // [2][BN][kLD]
  uint16_t* sV = sK + 2 * BN * kLD;  // [2][BN][kLD]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kFwdBM;  // causal: longest rows first
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (p.Hq / p.Hk);
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + head_offset(b, h, p.Hq, p.Tq, p.D);
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + head_offset(b, hk, p.Hk, p.Tk, p.D);
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + head_offset(b, hk, p.Hk, p.Tk, p.D);
  // Causal rows m0..m0+BM-1 see no key at or past m0 + BM.
  const int kv_end = p.causal ? min(p.Tk, m0 + kFwdBM) : p.Tk;
  const int n_tiles = (kv_end + BN - 1) / BN;

  load_rows<kFwdBM, DP>(sQ, q, m0, p.Tq, p.D);
  load_rows<BN, DP>(sK, k, 0, p.Tk, p.D);
  load_rows<BN, DP>(sV, v, 0, p.Tk, p.D);
  cp_async_commit();

  float o[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of the warp's slice
  float row_sum[2] = {0.f, 0.f};              // this thread's columns only; summed at the end
  const int row_lo = m0 + warp * 16 + g;      // query index of fragment rows g and g + 8

  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1, n0 = t * BN;
    if (t + 1 < n_tiles) {  // the other buffer was released by the barrier ending step t - 1
      load_rows<BN, DP>(sK + (buf ^ 1) * BN * kLD, k, n0 + BN, p.Tk, p.D);
      load_rows<BN, DP>(sV + (buf ^ 1) * BN * kLD, v, n0 + BN, p.Tk, p.D);
    }
    cp_async_commit();  // possibly empty, so that "all but the newest group" is always tile t
    cp_async_wait<1>();
    __syncthreads();
    const uint16_t* sKb = sK + buf * BN * kLD;
    const uint16_t* sVb = sV + buf * BN * kLD;

    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, sQ + a_offset(lane, warp * 16, kk * 16, kLD));
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t bb[4];
        ldsm_x4(bb, sKb + bn_offset(lane, nn * 16, kk * 16, kLD));
        Mma<T>::mma(s[2 * nn], a, bb[0], bb[1]);
        Mma<T>::mma(s[2 * nn + 1], a, bb[2], bb[3]);
      }
    }

    // Scale to base 2, add the mask, hide keys past Tk and (causal) past the diagonal. Only the
    // last tile and tiles crossing this warp's diagonal need the bounds test.
    const bool edge = n0 + BN > p.Tk || (p.causal && n0 + BN - 1 > m0 + warp * 16);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = row_lo + (e >> 1) * 8, j = n0 + nt * 8 + t4 * 2 + (e & 1);
        float x = s[nt][e] * p.scale_log2;
        if (p.mask != nullptr && i < p.Tq && j < p.Tk) x += mask_at(p, b, h, i, j) * kLog2e;
        if (edge && !visible(p, i, j)) x = -INFINITY;
        s[nt][e] = x;
      }
    }

    // Online softmax; the 4 threads of a quad share rows, hence the xor-1 and xor-2 shuffles.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(row_max[r] - base);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < DP / 8; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }

    // O += P V: P leaves the registers as A fragments, 16 keys at a time.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a[4] = {Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]), Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                             Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < DP / 16; ++dd) {
        uint32_t bb[4];
        ldsm_x4_trans(bb, sVb + bk_offset(lane, kk * 16, dd * 16, kLD));
        Mma<T>::mma(o[2 * dd], a, bb[0], bb[1]);
        Mma<T>::mma(o[2 * dd + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // this tile's buffers may be refilled
  }
  cp_async_wait<0>();

  // Normalise and write. Each warp read only its own 16 rows of sQ, so it stages its output there.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int i = row_lo + r * 8;
    if (t4 == 0 && i < p.Tq)
      p.lse[(static_cast<int64_t>(b) * p.Hq + h) * p.Tq + i] =
          l > 0.f ? (row_max[r] + __log2f(l)) * kLn2 : -INFINITY;
  }
  uint16_t* sO = sQ + warp * 16 * kLD;
#pragma unroll
  for (int dt = 0; dt < DP / 8; ++dt) {
    *reinterpret_cast<uint32_t*>(sO + g * kLD + dt * 8 + t4 * 2) =
        Mma<T>::pack(o[dt][0] * inv[0], o[dt][1] * inv[0]);
    *reinterpret_cast<uint32_t*>(sO + (g + 8) * kLD + dt * 8 + t4 * 2) =
        Mma<T>::pack(o[dt][2] * inv[1], o[dt][3] * inv[1]);
  }
  __syncwarp();
  uint16_t* out = static_cast<uint16_t*>(p.out) + head_offset(b, h, p.Hq, p.Tq, p.D);
  store_rows16<DP>(out, sO, m0 + warp * 16, p.Tq, p.D, lane);
}

// ---- tensor-core backward --------------------------------------------------------------------

// Shared memory: K, V (BN rows), Q and dO with two buffers each (BM rows), all with row stride
// DP + 8; dS^T (BN x (BM + 8)); then float lse (base 2) and delta, two buffers each.
template <int DP, int BM>
constexpr int bwd_smem_bytes() {
  return (2 * kBwdBN + 4 * BM) * (DP + 8) * 2 + kBwdBN * (BM + 8) * 2 + 4 * BM * 4;
}

// Per warp (16 keys j) and query block (BM queries i), everything transposed so the key rows stay
// in the fragment rows:  S^T = K Q^T,  P^T = exp2(S^T * scale_log2 + mask - lse),
// dP^T = V dO^T,  dS^T = P^T (dP^T - delta),  dV += P^T dO,  dK += dS^T Q  (registers);
// then dQ += dS K over the whole block's keys, through dS^T in shared memory.
template <typename T, int DP, int BM>
__global__ void __launch_bounds__(kThreads) bwd_mma_kernel(const AttnParams p) {
  constexpr int kLD = DP + 8, kLDS = BM + 8, BN = kBwdBN;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sK = smem;
  uint16_t* sV = sK + BN * kLD;
  uint16_t* sQ = sV + BN * kLD;        // [2][BM][kLD]
  uint16_t* sdO = sQ + 2 * BM * kLD;   // [2][BM][kLD]
  uint16_t* sdS = sdO + 2 * BM * kLD;  // [BN][kLDS], dS^T
  float* sLse = reinterpret_cast<float*>(sdS + BN * kLDS);  // [2][BM]
  float* sDelta = sLse + 2 * BM;                            // [2][BM]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int n0 = blockIdx.x * BN, hk = blockIdx.y, b = blockIdx.z;
  const int G = p.Hq / p.Hk;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + head_offset(b, hk, p.Hk, p.Tk, p.D);
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + head_offset(b, hk, p.Hk, p.Tk, p.D);
  // Causal: keys n0.. are seen only by queries i >= n0.
  const int m_first = p.causal ? n0 / BM : 0;
  const int per_head = max(0, (p.Tq + BM - 1) / BM - m_first);
  const int iters = G * per_head;  // (query head, query block) pairs, head-major

  auto prefetch = [&](int it, int buf) {
    const int h = hk * G + it / per_head, m0 = (m_first + it % per_head) * BM;
    const int64_t off = head_offset(b, h, p.Hq, p.Tq, p.D);
    load_rows<BM, DP>(sQ + buf * BM * kLD, static_cast<const uint16_t*>(p.q) + off, m0, p.Tq, p.D);
    load_rows<BM, DP>(sdO + buf * BM * kLD, static_cast<const uint16_t*>(p.dout) + off, m0, p.Tq, p.D);
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq + m0 + i;
      const bool ok = m0 + i < p.Tq;
      sLse[buf * BM + i] = ok ? lse_log2(p.lse[row]) : INFINITY;  // +inf: P = 0
      sDelta[buf * BM + i] = ok ? p.delta[row] : 0.f;
    }
  };

  load_rows<BN, DP>(sK, k, n0, p.Tk, p.D);
  load_rows<BN, DP>(sV, v, n0, p.Tk, p.D);
  if (iters > 0) prefetch(0, 0);
  cp_async_commit();

  float dk[DP / 8][4], dv[DP / 8][4];
#pragma unroll
  for (int i = 0; i < DP / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const int j_lo = n0 + warp * 16 + g;  // key index of fragment rows g and g + 8

  for (int it = 0; it < iters; ++it) {
    const int buf = it & 1;
    const int h = hk * G + it / per_head, m0 = (m_first + it % per_head) * BM;
    // The other buffers were last read before the middle barrier of step it - 1.
    if (it + 1 < iters) prefetch(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint16_t* sQb = sQ + buf * BM * kLD;
    const uint16_t* sdOb = sdO + buf * BM * kLD;
    const float* lse2 = sLse + buf * BM;
    const float* delta = sDelta + buf * BM;

    float s[BM / 8][4], dp[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldsm_x4(ak, sK + a_offset(lane, warp * 16, kk * 16, kLD));
      ldsm_x4(av, sV + a_offset(lane, warp * 16, kk * 16, kLD));
#pragma unroll
      for (int nn = 0; nn < BM / 16; ++nn) {
        uint32_t bq[4], bo[4];
        ldsm_x4(bq, sQb + bn_offset(lane, nn * 16, kk * 16, kLD));
        ldsm_x4(bo, sdOb + bn_offset(lane, nn * 16, kk * 16, kLD));
        Mma<T>::mma(s[2 * nn], ak, bq[0], bq[1]);
        Mma<T>::mma(s[2 * nn + 1], ak, bq[2], bq[3]);
        Mma<T>::mma(dp[2 * nn], av, bo[0], bo[1]);
        Mma<T>::mma(dp[2 * nn + 1], av, bo[2], bo[3]);
      }
    }

#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int il = nt * 8 + t4 * 2 + (e & 1), i = m0 + il, j = j_lo + (e >> 1) * 8;
        float x = s[nt][e] * p.scale_log2;
        if (p.mask != nullptr && i < p.Tq && j < p.Tk) x += mask_at(p, b, h, i, j) * kLog2e;
        // Queries past Tq have lse2 = +inf, so their P is 0 already.
        const float pr = visible(p, i, j) ? exp2f(x - lse2[il]) : 0.f;
        s[nt][e] = pr;
        dp[nt][e] = pr * (dp[nt][e] - delta[il]);
      }
    }

#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const uint32_t ap[4] = {Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]), Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                              Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const uint32_t as[4] = {Mma<T>::pack(dp[2 * kk][0], dp[2 * kk][1]),
                              Mma<T>::pack(dp[2 * kk][2], dp[2 * kk][3]),
                              Mma<T>::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                              Mma<T>::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < DP / 16; ++dd) {
        uint32_t bo[4], bq[4];
        ldsm_x4_trans(bo, sdOb + bk_offset(lane, kk * 16, dd * 16, kLD));
        ldsm_x4_trans(bq, sQb + bk_offset(lane, kk * 16, dd * 16, kLD));
        Mma<T>::mma(dv[2 * dd], ap, bo[0], bo[1]);
        Mma<T>::mma(dv[2 * dd + 1], ap, bo[2], bo[3]);
        Mma<T>::mma(dk[2 * dd], as, bq[0], bq[1]);
        Mma<T>::mma(dk[2 * dd + 1], as, bq[2], bq[3]);
      }
    }

#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g) * kLDS + nt * 8 + t4 * 2) =
          Mma<T>::pack(dp[nt][0], dp[nt][1]);
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8) * kLDS + nt * 8 + t4 * 2) =
          Mma<T>::pack(dp[nt][2], dp[nt][3]);
    }
    __syncthreads();

    // dQ rows m0.. (BM x DP) = dS (BM x BN keys) K: 16 x 16 output units spread over the warps.
    float* dq = p.dq + head_offset(b, h, p.Hq, p.Tq, p.D);
    for (int u = warp; u < (BM / 16) * (DP / 16); u += kWarps) {
      const int mt = u % (BM / 16), dd = u / (BM / 16);
      if (dd * 16 >= p.D) continue;  // padding columns
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4], bk[4];
        ldsm_x4_trans(a, sdS + at_offset(lane, kk * 16, mt * 16, kLDS));
        ldsm_x4_trans(bk, sK + bk_offset(lane, kk * 16, dd * 16, kLD));
        Mma<T>::mma(acc[0], a, bk[0], bk[1]);
        Mma<T>::mma(acc[1], a, bk[2], bk[3]);
      }
#pragma unroll
      for (int nn = 0; nn < 2; ++nn)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = m0 + mt * 16 + g + (e >> 1) * 8, d = dd * 16 + nn * 8 + t4 * 2 + (e & 1);
          if (i < p.Tq && d < p.D) atomicAdd(dq + static_cast<int64_t>(i) * p.D + d, acc[nn][e] * p.scale);
        }
    }
    // No barrier here: the next step's prefetch writes only the other Q/dO/lse/delta buffers,
    // whose last readers finished before the barrier above, and it rewrites sdS only after its
    // own first barrier, which every warp reaches after finishing this dQ.
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with sK and sV (dQ reads all of sK)

  // Stage the warp's 16 rows of dK (times the scale) and dV in its own rows of sK and sV.
  uint16_t* sdK = sK + warp * 16 * kLD;
  uint16_t* sdV = sV + warp * 16 * kLD;
#pragma unroll
  for (int dt = 0; dt < DP / 8; ++dt) {
    const int c = dt * 8 + t4 * 2;
    *reinterpret_cast<uint32_t*>(sdK + g * kLD + c) = Mma<T>::pack(dk[dt][0] * p.scale, dk[dt][1] * p.scale);
    *reinterpret_cast<uint32_t*>(sdK + (g + 8) * kLD + c) =
        Mma<T>::pack(dk[dt][2] * p.scale, dk[dt][3] * p.scale);
    *reinterpret_cast<uint32_t*>(sdV + g * kLD + c) = Mma<T>::pack(dv[dt][0], dv[dt][1]);
    *reinterpret_cast<uint32_t*>(sdV + (g + 8) * kLD + c) = Mma<T>::pack(dv[dt][2], dv[dt][3]);
  }
  __syncwarp();
  const int64_t off = head_offset(b, hk, p.Hk, p.Tk, p.D);
  store_rows16<DP>(static_cast<uint16_t*>(p.dk) + off, sdK, n0 + warp * 16, p.Tk, p.D, lane);
  store_rows16<DP>(static_cast<uint16_t*>(p.dv) + off, sdV, n0 + warp * 16, p.Tk, p.D, lane);
}

// delta[row] = sum_d dout[row, d] * out[row, d], one warp per row.
template <typename T>
__global__ void bwd_delta_kernel(const T* dout, const T* out, float* delta, int64_t rows, int D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  float s = 0.f;
  for (int d = lane; d < D; d += 32)
    s += static_cast<float>(dout[row * D + d]) * static_cast<float>(out[row * D + d]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) delta[row] = s;
}

// ---- SIMT paths (float32; any head dim up to 256) ---------------------------------------------
// BT query rows and BT keys per tile, 128 threads; TPR threads share a row of the BT x BT score
// tile, each holding SPT of its scores. Tiles live in shared memory as float with odd row strides
// (D | 1), so threads walking different rows at the same column hit different banks.

template <int BT>
constexpr int simt_fwd_floats(int D) {
  return 2 * BT * (D + 1) + 2 * BT * D + BT * (BT + 1) + BT;
}
template <int BT>
constexpr int simt_bwd_floats(int D) {
  return 4 * BT * (D + 1) + 2 * BT * (BT + 1) + 2 * BT * D + 2 * BT;
}

// Fills a BT x D float tile (row stride ld) from rows row0.. of a (rows_valid, D) matrix, times
// mul; rows past rows_valid become zeros.
template <typename T, int BT>
__device__ __forceinline__ void load_tile_f(float* s, int ld, const T* g, int row0, int rows_valid,
                                            int D, float mul) {
  for (int e = threadIdx.x; e < BT * D; e += kThreads) {
    const int r = e / D, d = e % D;
    s[r * ld + d] = row0 + r < rows_valid ? static_cast<float>(g[static_cast<int64_t>(row0 + r) * D + d]) * mul : 0.f;
  }
}

template <typename T, int BT>
__global__ void __launch_bounds__(kThreads) fwd_simt_kernel(const AttnParams p) {
  constexpr int TPR = kThreads / BT, SPT = BT / TPR;
  extern __shared__ float fsm[];
  const int D = p.D, LDF = D | 1;
  float* sQ = fsm;               // BT x LDF, pre-scaled by scale * log2(e)
  float* sK = sQ + BT * LDF;     // BT x LDF
  float* sV = sK + BT * LDF;     // BT x D
  float* sO = sV + BT * D;       // BT x D, unnormalised output
  float* sP = sO + BT * D;       // BT x (BT + 1)
  float* sRow = sP + BT * (BT + 1);  // per row: alpha of the current tile, at the end 1 / l

  const int m0 = (gridDim.x - 1 - blockIdx.x) * BT;
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (p.Hq / p.Hk);
  const T* q = static_cast<const T*>(p.q) + head_offset(b, h, p.Hq, p.Tq, D);
  const T* k = static_cast<const T*>(p.k) + head_offset(b, hk, p.Hk, p.Tk, D);
  const T* v = static_cast<const T*>(p.v) + head_offset(b, hk, p.Hk, p.Tk, D);
  load_tile_f<T, BT>(sQ, LDF, q, m0, p.Tq, D, p.scale_log2);
  for (int e = threadIdx.x; e < BT * D; e += kThreads) sO[e] = 0.f;

  const int r = threadIdx.x / TPR, c0 = threadIdx.x % TPR, i = m0 + r;
  float row_max = -INFINITY, row_sum = 0.f;  // row_sum: this thread's columns only
  const int kv_end = p.causal ? min(p.Tk, m0 + BT) : p.Tk;
  for (int n0 = 0; n0 < kv_end; n0 += BT) {
    __syncthreads();  // the previous tile's readers are done
    load_tile_f<T, BT>(sK, LDF, k, n0, p.Tk, D, 1.f);
    load_tile_f<T, BT>(sV, D, v, n0, p.Tk, D, 1.f);
    __syncthreads();
    float s[SPT];
    float mx = row_max;
#pragma unroll
    for (int c = 0; c < SPT; ++c) {
      const int jl = c0 + c * TPR, j = n0 + jl;
      float acc = 0.f;
      for (int d = 0; d < D; ++d) acc += sQ[r * LDF + d] * sK[jl * LDF + d];
      if (p.mask != nullptr && i < p.Tq && j < p.Tk) acc += mask_at(p, b, h, i, j) * kLog2e;
      s[c] = visible(p, i, j) ? acc : -INFINITY;
      mx = fmaxf(mx, s[c]);
    }
#pragma unroll
    for (int o = 1; o < TPR; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float base = mx == -INFINITY ? 0.f : mx;
    const float alpha = exp2f(row_max - base);
    row_max = mx;
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < SPT; ++c) {
      const float pr = exp2f(s[c] - base);
      sP[r * (BT + 1) + c0 + c * TPR] = pr;
      sum += pr;
    }
    row_sum = row_sum * alpha + sum;
    if (c0 == 0) sRow[r] = alpha;
    __syncthreads();
    for (int e = threadIdx.x; e < BT * D; e += kThreads) {
      const int rr = e / D, d = e % D;
      float acc = sO[e] * sRow[rr];
      for (int jl = 0; jl < BT; ++jl) acc += sP[rr * (BT + 1) + jl] * sV[jl * D + d];
      sO[e] = acc;
    }
  }
#pragma unroll
  for (int o = 1; o < TPR; o <<= 1) row_sum += __shfl_xor_sync(0xffffffffu, row_sum, o);
  __syncthreads();  // sRow's last alphas are read
  if (c0 == 0) {
    sRow[r] = row_sum > 0.f ? 1.f / row_sum : 0.f;
    if (i < p.Tq)
      p.lse[(static_cast<int64_t>(b) * p.Hq + h) * p.Tq + i] =
          row_sum > 0.f ? (row_max + __log2f(row_sum)) * kLn2 : -INFINITY;
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + head_offset(b, h, p.Hq, p.Tq, D);
  for (int e = threadIdx.x; e < BT * D; e += kThreads) {
    const int rr = e / D, d = e % D;
    if (m0 + rr < p.Tq) out[static_cast<int64_t>(m0 + rr) * D + d] = static_cast<T>(sO[e] * sRow[rr]);
  }
}

// One block per BT keys of one key/value head; loops over the group's query heads and the query
// blocks, with dK and dV summed in shared memory and dQ added to the float32 buffer.
template <typename T, int BT>
__global__ void __launch_bounds__(kThreads) bwd_simt_kernel(const AttnParams p) {
  constexpr int TPR = kThreads / BT, SPT = BT / TPR;
  extern __shared__ float fsm[];
  const int D = p.D, LDF = D | 1;
  float* sK = fsm;                 // BT x LDF
  float* sV = sK + BT * LDF;       // BT x LDF
  float* sQ = sV + BT * LDF;       // BT x LDF
  float* sdO = sQ + BT * LDF;      // BT x LDF
  float* sP = sdO + BT * LDF;      // BT x (BT + 1), [query][key]
  float* sdS = sP + BT * (BT + 1); // BT x (BT + 1)
  float* sdK = sdS + BT * (BT + 1);  // BT x D
  float* sdV = sdK + BT * D;         // BT x D
  float* sLse = sdV + BT * D;        // BT, base 2
  float* sDelta = sLse + BT;         // BT

  const int n0 = blockIdx.x * BT, hk = blockIdx.y, b = blockIdx.z, G = p.Hq / p.Hk;
  const int64_t kv_off = head_offset(b, hk, p.Hk, p.Tk, D);
  load_tile_f<T, BT>(sK, LDF, static_cast<const T*>(p.k) + kv_off, n0, p.Tk, D, 1.f);
  load_tile_f<T, BT>(sV, LDF, static_cast<const T*>(p.v) + kv_off, n0, p.Tk, D, 1.f);
  for (int e = threadIdx.x; e < BT * D; e += kThreads) sdK[e] = sdV[e] = 0.f;

  const int r = threadIdx.x / TPR, c0 = threadIdx.x % TPR;
  const int m_first = p.causal ? n0 / BT : 0, m_blocks = (p.Tq + BT - 1) / BT;
  for (int hh = 0; hh < G; ++hh) {
    const int h = hk * G + hh;
    const int64_t q_off = head_offset(b, h, p.Hq, p.Tq, D);
    float* dq = p.dq + q_off;
    for (int mb = m_first; mb < m_blocks; ++mb) {
      const int m0 = mb * BT, i = m0 + r;
      __syncthreads();  // the previous step's readers are done
      load_tile_f<T, BT>(sQ, LDF, static_cast<const T*>(p.q) + q_off, m0, p.Tq, D, 1.f);
      load_tile_f<T, BT>(sdO, LDF, static_cast<const T*>(p.dout) + q_off, m0, p.Tq, D, 1.f);
      for (int il = threadIdx.x; il < BT; il += kThreads) {
        const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Tq + m0 + il;
        const bool ok = m0 + il < p.Tq;
        sLse[il] = ok ? lse_log2(p.lse[row]) : INFINITY;
        sDelta[il] = ok ? p.delta[row] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < SPT; ++c) {
        const int jl = c0 + c * TPR, j = n0 + jl;
        float s = 0.f, dpv = 0.f;
        for (int d = 0; d < D; ++d) {
          s += sQ[r * LDF + d] * sK[jl * LDF + d];
          dpv += sdO[r * LDF + d] * sV[jl * LDF + d];
        }
        float x = s * p.scale_log2;
        if (p.mask != nullptr && i < p.Tq && j < p.Tk) x += mask_at(p, b, h, i, j) * kLog2e;
        const float pr = visible(p, i, j) ? exp2f(x - sLse[r]) : 0.f;
        sP[r * (BT + 1) + jl] = pr;
        sdS[r * (BT + 1) + jl] = pr * (dpv - sDelta[r]);
      }
      __syncthreads();
      for (int e = threadIdx.x; e < BT * D; e += kThreads) {
        const int jl = e / D, d = e % D;
        float av = 0.f, ak = 0.f;
        for (int il = 0; il < BT; ++il) {
          av += sP[il * (BT + 1) + jl] * sdO[il * LDF + d];
          ak += sdS[il * (BT + 1) + jl] * sQ[il * LDF + d];
        }
        sdV[e] += av;
        sdK[e] += ak;
      }
      for (int e = threadIdx.x; e < BT * D; e += kThreads) {
        const int il = e / D, d = e % D;
        if (m0 + il >= p.Tq) continue;
        float acc = 0.f;
        for (int jl = 0; jl < BT; ++jl) acc += sdS[il * (BT + 1) + jl] * sK[jl * LDF + d];
        atomicAdd(dq + static_cast<int64_t>(m0 + il) * D + d, acc * p.scale);
      }
    }
  }
  __syncthreads();
  T* dk = static_cast<T*>(p.dk) + kv_off;
  T* dv = static_cast<T*>(p.dv) + kv_off;
  for (int e = threadIdx.x; e < BT * D; e += kThreads) {
    const int jl = e / D, d = e % D;
    if (n0 + jl < p.Tk) {
      dk[static_cast<int64_t>(n0 + jl) * D + d] = static_cast<T>(sdK[e] * p.scale);
      dv[static_cast<int64_t>(n0 + jl) * D + d] = static_cast<T>(sdV[e]);
    }
  }
}

// ---- host ------------------------------------------------------------------------------------

void check_mask(const OptTensor& mask, const at::Tensor& q, int64_t Tk, const char* op) {
  if (!present(mask)) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device() == q.device(), op, " (cuda): mask is on ", m.device(), " but q is on ", q.device());
  TORCH_CHECK(m.scalar_type() == at::kFloat, op, " (cuda): mask must be float32, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 4 && m.size(0) == q.size(0) && m.size(1) == q.size(1) && m.size(2) == q.size(2) &&
                  m.size(3) == Tk,
              op, " (cuda): mask must have shape (", q.size(0), ", ", q.size(1), ", ", q.size(2), ", ", Tk,
              ") (broadcast dims expanded), got ", m.sizes());
  TORCH_CHECK(m.stride(3) == 0 || m.stride(3) == 1, op, " (cuda): mask's last stride must be 0 or 1, got ",
              m.stride(3));
}

AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mask,
                       bool is_causal, double scale) {
  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  if (present(mask)) {
    p.mask = mask->data_ptr<float>();
    p.msb = mask->stride(0);
    p.msh = mask->stride(1);
    p.msi = mask->stride(2);
    p.msj = mask->stride(3);
  }
  p.Hq = static_cast<int>(q.size(1));
  p.Hk = static_cast<int>(k.size(1));
  p.Tq = static_cast<int>(q.size(2));
  p.Tk = static_cast<int>(k.size(2));
  p.D = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = is_causal;
  return p;
}

// The padded head dim of the tensor-core kernels: the smallest listed size >= D.
int padded_head_dim(int D) {
  for (int dp : {32, 64, 96, 128, 160, 192, 256})
    if (D <= dp) return dp;
  return 0;
}

// Tensor cores take 16-bit inputs whose rows are whole 16-byte chunks.
bool tensor_core_ok(std::initializer_list<const at::Tensor*> ts, int D) {
  if ((*ts.begin())->scalar_type() == at::kFloat || D % 8 != 0) return false;
  for (const at::Tensor* t : ts)
    if (!aligned16(*t)) return false;
  return true;
}

template <typename T, int DP, int BN>
void launch_fwd_mma(const AttnParams& p, int B, const at::Tensor& q, cudaStream_t stream) {
  constexpr int bytes = fwd_smem_bytes<DP, BN>();
  auto kernel = fwd_mma_kernel<T, DP, BN>;
  set_smem(kernel, bytes, q, "attention_fwd");
  kernel<<<dim3(ceil_div(p.Tq, kFwdBM), p.Hq, B), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void fwd_mma(const AttnParams& p, int B, const at::Tensor& q, cudaStream_t stream) {
  switch (padded_head_dim(p.D)) {
    case 32: return launch_fwd_mma<T, 32, 64>(p, B, q, stream);
    case 64: return launch_fwd_mma<T, 64, 64>(p, B, q, stream);
    case 96: return launch_fwd_mma<T, 96, 64>(p, B, q, stream);
    case 128: return launch_fwd_mma<T, 128, 64>(p, B, q, stream);
    case 160: return launch_fwd_mma<T, 160, 32>(p, B, q, stream);
    case 192: return launch_fwd_mma<T, 192, 32>(p, B, q, stream);
    default: return launch_fwd_mma<T, 256, 32>(p, B, q, stream);
  }
}

template <typename T, int DP, int BM>
void launch_bwd_mma(const AttnParams& p, int B, const at::Tensor& q, cudaStream_t stream) {
  constexpr int bytes = bwd_smem_bytes<DP, BM>();
  auto kernel = bwd_mma_kernel<T, DP, BM>;
  set_smem(kernel, bytes, q, "attention_bwd");
  kernel<<<dim3(ceil_div(p.Tk, kBwdBN), p.Hk, B), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Backward on tensor cores up to head dim 128 (dK and dV of 16 keys x DP per warp in registers);
// BM = 32 queries per step above 96, to stay clear of register spills.
template <typename T>
void bwd_mma(const AttnParams& p, int B, const at::Tensor& q, cudaStream_t stream) {
  switch (padded_head_dim(p.D)) {
    case 32: return launch_bwd_mma<T, 32, 64>(p, B, q, stream);
    case 64: return launch_bwd_mma<T, 64, 64>(p, B, q, stream);
    case 96: return launch_bwd_mma<T, 96, 64>(p, B, q, stream);
    default: return launch_bwd_mma<T, 128, 32>(p, B, q, stream);
  }
}

template <typename T, int BT>
void launch_fwd_simt(const AttnParams& p, int B, const at::Tensor& q, cudaStream_t stream) {
  const size_t bytes = simt_fwd_floats<BT>(p.D) * sizeof(float);
  auto kernel = fwd_simt_kernel<T, BT>;
  set_smem(kernel, bytes, q, "attention_fwd");
  kernel<<<dim3(ceil_div(p.Tq, BT), p.Hq, B), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BT>
void launch_bwd_simt(const AttnParams& p, int B, const at::Tensor& q, cudaStream_t stream) {
  const size_t bytes = simt_bwd_floats<BT>(p.D) * sizeof(float);
  auto kernel = bwd_simt_kernel<T, BT>;
  set_smem(kernel, bytes, q, "attention_bwd");
  kernel<<<dim3(ceil_div(p.Tk, BT), p.Hk, B), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const OptTensor& mask,
                                                      bool is_causal, double scale) {
  constexpr const char* op = "attention_fwd";
  check_qkv(q, k, v, op, "k", "v");
  check_mask(mask, q, k.size(2), op);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, Hq, Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (k.size(2) == 0) {  // no keys: every row is fully masked
    out.zero_();
    lse.fill_(-INFINITY);
    return {out, lse};
  }
  AttnParams p = make_params(q, k, v, mask, is_causal, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool tc = tensor_core_ok({&q, &k, &v}, p.D);
  dispatch_float(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      if (tc) return fwd_mma<T>(p, static_cast<int>(B), q, stream);
    }
    if (p.D <= 128) launch_fwd_simt<T, 32>(p, static_cast<int>(B), q, stream);
    else launch_fwd_simt<T, 16>(p, static_cast<int>(B), q, stream);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptTensor& mask, bool is_causal, double scale) {
  constexpr const char* op = "attention_bwd";
  check_qkv(q, k, v, op, "k", "v");
  check_mask(mask, q, k.size(2), op);
  check_same(dout, q, op, "dout", "q");
  check_same(out, q, op, "out", "q");
  TORCH_CHECK(dout.sizes() == q.sizes(), op, " (cuda): dout must have q's shape ", q.sizes(), ", got ",
              dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), op, " (cuda): out must have q's shape ", q.sizes(), ", got ",
              out.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2);
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == Tq,
              op, " (cuda): lse must be a contiguous float32 tensor of shape (", B, ", ", Hq, ", ", Tq,
              ") on q's device, got ", lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  const c10::cuda::CUDAGuard guard(q.device());
  if (q.numel() == 0 || k.numel() == 0)  // nothing flows: gradients of nothing are zeros
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v)};

  AttnParams p = make_params(q, k, v, mask, is_causal, scale);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = q.options().dtype(at::kFloat);
  auto delta = at::empty({B, Hq, Tq}, f32);
  auto dq = at::zeros(q.sizes(), f32);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const bool tc = tensor_core_ok({&q, &k, &v, &dout, &out}, p.D) && p.D <= 128;
  dispatch_float(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const int64_t rows = B * Hq * Tq;
    bwd_delta_kernel<T><<<ceil_div(rows, 8), 256, 0, stream>>>(dout.data_ptr<T>(), out.data_ptr<T>(),
                                                                delta.data_ptr<float>(), rows, p.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if constexpr (!std::is_same_v<T, float>) {
      if (tc) return bwd_mma<T>(p, static_cast<int>(B), q, stream);
    }
    if (p.D <= 128) launch_bwd_simt<T, 32>(p, static_cast<int>(B), q, stream);
    else launch_bwd_simt<T, 16>(p, static_cast<int>(B), q, stream);
  });
  return {q.scalar_type() == at::kFloat ? dq : dq.to(q.scalar_type()), dk, dv};
}

}  // namespace fastlm
