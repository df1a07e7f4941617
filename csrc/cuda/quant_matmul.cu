// Weight-only quantized linear on CUDA: fastlm::quant_matmul_cuda (contract: fastlm.h),
// y = x dequant(W)^T + bias with int8 (per row) or int4 (per group) weights, float32 accumulate.
//
// Decoding (M <= kGemvMaxM rows of x) is bound by reading the weights, so the GEMV kernel reads
// every weight byte once, 16 bytes a load: a warp owns kRowsPerWarp rows of W, each lane takes
// 16-byte chunks of those rows (32 int4 or 16 int8 weights, never crossing an int4 group, since
// G is a multiple of 32), unpacks them in registers and multiply-adds them in float32 against all
// M rows of x (read from L1/L2: x is small and every warp reads it). When the row blocks alone
// leave SMs idle, K is split across blocks: each writes a float32 partial and a reduce kernel sums
// them in a fixed order (deterministic, no atomics).
//
// More rows (M > kGemvMaxM) go to a tiled GEMM: 64 x 64 output tiles, K in steps of 32; a step
// dequantizes the W tile into shared memory in x's dtype (rounded as the unfused dequantize-then-
// matmul rounds it) and multiplies on the tensor cores (WMMA 16x16x16, float32 accumulate) for
// float16/bfloat16, or on the CUDA cores for float32. Split-K as above when tiles are few.
//
// int8 keeps one scale per row: the integer values are exact in every float dtype, so the scale
// is applied once to each finished row sum. int4: W = (q - zero) * scale per group; the GEMV
// sums x * (q - zero) over a chunk and scales the chunk's sum.
//
// Vector paths need 16-byte aligned x and qweight and, for int8, K % 16 == 0 (int4 has K % 32 == 0
// by the contract); anything else takes element-wise loads (correct, slower).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "checks.h"
#include "fastlm.h"

namespace fastlm {
namespace {

using cuda::dispatch_float;
using cuda::Pack;

constexpr int kGemvMaxM = 8;
constexpr int kRowsPerWarp = 2;   // W rows a warp owns in the GEMV: x values loaded once serve both
constexpr int kGemvWarps = 4;
constexpr int kChunk = 16;        // bytes of one row a lane loads at a time
constexpr int kTileM = 64, kTileN = 64, kTileK = 32;  // GEMM tile; kTileK divides every int4 group
constexpr int kGemmThreads = 128;  // tensor-core GEMM: 4 warps, each a 32 x 32 quarter of the tile
constexpr int kSimtThreads = 256;  // float32 GEMM: each thread a 4 x 4 patch of the tile

template <typename T>
struct Args {
  const T* x;             // (M, K)
  const uint8_t* q;       // (N, K) int8 bytes or (N, K / 2) packed int4
  const float* scales;    // (N, K / G)
  const float* zeros;     // (N, K / G) or null: zero 8 (int4)
  const T* bias;          // (N) or null
  T* y;                   // (M, N)
  float* part;            // (splits, M, N) when split, else null
  int64_t M, N, K;
  int64_t k_split;        // columns of K per split (a multiple of the kernel's K step)
  int group;              // int4 group size; K for int8
};

// Exact integer -> float for 0 <= v < 2^23 without the slow I2F instruction: v in the mantissa of
// 2^23, minus 2^23.
__device__ __forceinline__ float u2f(uint32_t v) {
  return __uint_as_float(0x4B000000u | v) - 8388608.f;
}

// Weight i (0..ELEMS-1) of a 32-bit word, as float. int4: nibble i is element k0 + i (byte j holds
// 2j in its low and 2j + 1 in its high nibble, little-endian words put byte j at bits 8j).
// int8: byte i, signed (the xor maps -128..127 to 0..255, the subtraction maps it back).
template <int BITS>
__device__ __forceinline__ float weight(uint32_t word, int i) {
  if constexpr (BITS == 4) {
    return u2f((word >> (4 * i)) & 15u);
  } else {
    return u2f(((word >> (8 * i)) & 255u) ^ 128u) - 128.f;
  }
}

// One weight read element-wise (the unaligned fallback).
template <int BITS>
__device__ __forceinline__ float weight_at(const uint8_t* q, int64_t n, int64_t k, int64_t K) {
  if constexpr (BITS == 4) {
    const uint32_t b = q[n * (K / 2) + k / 2];
    return static_cast<float>((k & 1) ? (b >> 4) : (b & 15u));
  } else {
    return static_cast<float>(reinterpret_cast<const int8_t*>(q)[n * K + k]);
  }
}

// Zero point of (n, k): the given one, or the symmetric int4 offset 8 (int8 has none).
template <typename T, int BITS>
__device__ __forceinline__ float zero_at(const Args<T>& a, int64_t n, int64_t k) {
  if constexpr (BITS == 8) return 0.f;
  return a.zeros != nullptr ? a.zeros[n * (a.K / a.group) + k / a.group] : 8.f;
}

// CNT elements of T from p (16-byte aligned when CNT * sizeof(T) >= 16), as float, in loads of at
// most 16 bytes.
template <typename T, int CNT>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[CNT]) {
  constexpr int kPiece = CNT * sizeof(T) < 16 ? CNT : 16 / sizeof(T);
#pragma unroll
  for (int c = 0; c < CNT; c += kPiece) {
    const Pack<T, kPiece> pk = *reinterpret_cast<const Pack<T, kPiece>*>(p + c);
#pragma unroll
    for (int j = 0; j < kPiece; ++j) out[c + j] = static_cast<float>(pk.v[j]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The finished float32 value of y[m, n] (or of this split's partial): int8's row scale, then the
// bias and the cast, or the partial store.
template <typename T, int BITS>
__device__ __forceinline__ void write_out(const Args<T>& a, int64_t m, int64_t n, float v) {
  if constexpr (BITS == 8) v *= a.scales[n];
  if (a.part != nullptr) {
    a.part[(static_cast<int64_t>(blockIdx.z) * a.M + m) * a.N + n] = v;
  } else {
    if (a.bias != nullptr) v += static_cast<float>(a.bias[n]);
    a.y[m * a.N + n] = static_cast<T>(v);
  }
}

// ---- GEMV (M <= kGemvMaxM) --------------------------------------------------------------------
// Grid (row blocks, 1, splits); block kGemvWarps warps; warp w of block b owns rows
// (b * kGemvWarps + w) * kRowsPerWarp + r. MR >= M is the compile-time row count of x.
template <typename T, int BITS, int MR, bool VEC>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const Args<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32) * kRowsPerWarp;
  if (row0 >= a.N) return;  // no barrier in this kernel
  const int M = static_cast<int>(a.M);
  const int64_t K = a.K;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * a.k_split;
  const int64_t k_end = std::min(K, k_begin + a.k_split);

  float acc[MR][kRowsPerWarp];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[m][r] = 0.f;

  if constexpr (VEC) {
    constexpr int kPerByte = 8 / BITS;          // weights per byte
    constexpr int kPerChunk = kChunk * kPerByte;  // 32 (int4) or 16 (int8) columns
    constexpr int kPerWord = 4 * kPerByte;        // 8 or 4 columns per 32-bit word
    const int64_t row_bytes = K / kPerByte;
    // Lane l takes chunks l, l + 32, ... of [k_begin, k_end); k_begin and k_end are chunk-aligned
    // (k_split is a multiple of kPerChunk, and so is K: K % 32 == 0 for int4, % 16 for vector int8).
    for (int64_t k = k_begin + static_cast<int64_t>(lane) * kPerChunk; k < k_end; k += 32 * kPerChunk) {
      uint4 w[kRowsPerWarp];
      float s[kRowsPerWarp], z[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t n = std::min(row0 + r, a.N - 1);  // a missing last row repeats a real one
        w[r] = *reinterpret_cast<const uint4*>(a.q + n * row_bytes + k / kPerByte);
        if constexpr (BITS == 4) {
          const int64_t g = n * (K / a.group) + k / a.group;  // the chunk lies in one group
          s[r] = a.scales[g];
          z[r] = a.zeros != nullptr ? a.zeros[g] : 8.f;
        }
      }
      float part[MR][kRowsPerWarp];  // this chunk's sum of x * (q - zero)
#pragma unroll
      for (int m = 0; m < MR; ++m)
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) part[m][r] = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // the chunk's four 32-bit words
        float wf[kRowsPerWarp][kPerWord];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const uint32_t word = (&w[r].x)[j];
#pragma unroll
          for (int i = 0; i < kPerWord; ++i) wf[r][i] = BITS == 4 ? weight<BITS>(word, i) - z[r] : weight<BITS>(word, i);
        }
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          if (m < M) {
            float xv[kPerWord];
            load_floats<T, kPerWord>(a.x + m * K + k + j * kPerWord, xv);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
              for (int i = 0; i < kPerWord; ++i) part[m][r] = fmaf(xv[i], wf[r][i], part[m][r]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MR; ++m)
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[m][r] += BITS == 4 ? part[m][r] * s[r] : part[m][r];
    }
  } else {
    for (int64_t k = k_begin + lane; k < k_end; k += 32) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t n = std::min(row0 + r, a.N - 1);
        float wv = weight_at<BITS>(a.q, n, k, K) - zero_at<T, BITS>(a, n, k);
        if constexpr (BITS == 4) wv *= a.scales[n * (K / a.group) + k / a.group];
#pragma unroll
        for (int m = 0; m < MR; ++m)
          if (m < M) acc[m][r] = fmaf(static_cast<float>(a.x[m * K + k]), wv, acc[m][r]);
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float v = warp_sum(acc[m][r]);
      if (lane == 0 && m < M && row0 + r < a.N) write_out<T, BITS>(a, m, row0 + r, v);
    }
}

// ---- GEMM (M > kGemvMaxM) ---------------------------------------------------------------------
// Grid (N tiles, M tiles, splits). Each K step fills As[m][k] = x[m0 + m, k0 + k] and
// Bs[n][k] = dequant(W)[n0 + n, k0 + k] (int8: the raw integers), zero outside the matrices.

// Dequantized W[n, k0 + c * CNT ...] for CNT consecutive columns (CNT | kTileK, so they lie in one
// int4 group), zeros past N or K. int8 values are left unscaled.
template <typename T, int BITS, int CNT, bool VEC>
__device__ __forceinline__ void load_w(const Args<T>& a, int64_t n, int64_t k, int64_t k_end, float (&out)[CNT]) {
  if (n >= a.N || k >= k_end) {
#pragma unroll
    for (int i = 0; i < CNT; ++i) out[i] = 0.f;
    return;
  }
  float s = 1.f, z = 0.f;
  if constexpr (BITS == 4) {
    const int64_t g = n * (a.K / a.group) + k / a.group;
    s = a.scales[g];
    z = a.zeros != nullptr ? a.zeros[g] : 8.f;
  }
  if constexpr (VEC) {
    // CNT weights are CNT / 8 (int4) or CNT / 4 (int8) 32-bit words, 4- to 16-byte aligned.
    constexpr int kWords = CNT * BITS / 32;
    constexpr int kPerWord = 32 / BITS;
    const Pack<uint32_t, kWords> pk =
        *reinterpret_cast<const Pack<uint32_t, kWords>*>(a.q + n * (a.K * BITS / 8) + k * BITS / 8);
#pragma unroll
    for (int j = 0; j < kWords; ++j)
#pragma unroll
      for (int i = 0; i < kPerWord; ++i) out[j * kPerWord + i] = (weight<BITS>(pk.v[j], i) - z) * s;
  } else {
#pragma unroll
    for (int i = 0; i < CNT; ++i)
      out[i] = k + i < k_end ? (weight_at<BITS>(a.q, n, k + i, a.K) - z) * s : 0.f;
  }
}

// CNT elements of x[m, k ...] as float, zeros past M or k_end.
template <typename T, int CNT, bool VEC>
__device__ __forceinline__ void load_x(const Args<T>& a, int64_t m, int64_t k, int64_t k_end, float (&out)[CNT]) {
  if (VEC && m < a.M && k + CNT <= k_end) {
    load_floats<T, CNT>(a.x + m * a.K + k, out);
  } else {
#pragma unroll
    for (int i = 0; i < CNT; ++i) out[i] = (m < a.M && k + i < k_end) ? static_cast<float>(a.x[m * a.K + k + i]) : 0.f;
  }
}

template <typename T> struct WmmaType;
template <> struct WmmaType<at::Half> { using type = __half; };
template <> struct WmmaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T, int BITS, bool VEC>
__global__ void __launch_bounds__(kGemmThreads) gemm_tc_kernel(const Args<T> a) {
  namespace wmma = nvcuda::wmma;
  using W = typename WmmaType<T>::type;
  constexpr int kLd = kTileK + 8;  // row pitch in elements: a multiple of 8 (WMMA), off the bank stride
  __shared__ __align__(32) T As[kTileM][kLd];
  __shared__ __align__(32) T Bs[kTileN][kLd];
  __shared__ __align__(32) float Cs[kTileM][kTileN + 4];

  const int t = threadIdx.x, warp = t / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * a.k_split;
  const int64_t k_end = std::min(a.K, k_begin + a.k_split);
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // this warp's quarter of the tile

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    // x tile: 64 rows x 4 pieces of 8 columns; thread t fills pieces t and t + 128.
    for (int p = t; p < kTileM * 4; p += kGemmThreads) {
      const int r = p / 4, c = (p % 4) * 8;
      float v[8];
      load_x<T, 8, VEC>(a, m0 + r, k0 + c, k_end, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) As[r][c + i] = static_cast<T>(v[i]);
    }
    // W tile: 64 rows x 2 halves of 16 columns; thread t fills half t % 2 of row t / 2.
    {
      const int r = t / 2, c = (t % 2) * 16;
      float v[16];
      load_w<T, BITS, 16, VEC>(a, n0 + r, k0 + c, k_end, v);
#pragma unroll
      for (int i = 0; i < 16; ++i) Bs[r][c + i] = static_cast<T>(v[i]);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::col_major> fb[2];
      // B is K x N; Bs holds it column by column (Bs[n][k]), i.e. col_major with pitch kLd.
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const W*>(&As[wm + 16 * i][kk]), kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], reinterpret_cast<const W*>(&Bs[wn + 16 * j][kk]), kLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();  // the next step overwrites As and Bs
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[wm + 16 * i][wn + 16 * j], acc[i][j], kTileN + 4, wmma::mem_row_major);
  __syncthreads();
  for (int p = t; p < kTileM * kTileN; p += kGemmThreads) {
    const int r = p / kTileN, c = p % kTileN;  // consecutive threads: consecutive columns
    if (m0 + r < a.M && n0 + c < a.N) write_out<T, BITS>(a, m0 + r, n0 + c, Cs[r][c]);
  }
}

// float32 x: the same tiles on the CUDA cores. Tiles are stored k-major (As[k][m], Bs[k][n]) so
// that a thread's 4 rows and 4 columns of one k are contiguous; thread (ty, tx) = (t / 16, t % 16)
// computes rows ty * 4 .. +3 and columns tx * 4 .. +3.
template <int BITS, bool VEC>
__global__ void __launch_bounds__(kSimtThreads) gemm_f32_kernel(const Args<float> a) {
  __shared__ float As[kTileK][kTileM + 4];
  __shared__ float Bs[kTileK][kTileN + 4];
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * a.k_split;
  const int64_t k_end = std::min(a.K, k_begin + a.k_split);

  float acc[4][4] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    {  // x: 64 rows x 4 pieces of 8 columns, 256 pieces, one per thread
      const int r = t / 4, c = (t % 4) * 8;
      float v[8];
      load_x<float, 8, VEC>(a, m0 + r, k0 + c, k_end, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) As[c + i][r] = v[i];
    }
    {  // W: 64 rows x 4 pieces of 8 columns
      const int r = t / 4, c = (t % 4) * 8;
      float v[8];
      load_w<float, BITS, 8, VEC>(a, n0 + r, k0 + c, k_end, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) Bs[c + i][r] = v[i];
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      float xa[4], wb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        xa[i] = As[kk][ty * 4 + i];
        wb[i] = Bs[kk][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xa[i], wb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
      if (m < a.M && n < a.N) write_out<float, BITS>(a, m, n, acc[i][j]);
    }
}

// y[i] = sum over splits of part[s, i] (in split order) + bias[i % N].
template <typename T>
__global__ void reduce_kernel(const float* part, const T* bias, T* y, int64_t MN, int64_t N, int splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= MN) return;
  float v = 0.f;
  for (int s = 0; s < splits; ++s) v += part[s * MN + i];
  if (bias != nullptr) v += static_cast<float>(bias[i % N]);
  y[i] = static_cast<T>(v);
}

// ---- host -------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned int grid_dim(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= INT_MAX, "quant_matmul (cuda): too many ", what, " (", blocks, ")");
  return static_cast<unsigned int>(blocks);
}

// Splits of K so that about two blocks per SM run, none shorter than min_cols columns.
int64_t choose_splits(int64_t blocks, int64_t K, int64_t min_cols, int sms) {
  const int64_t want = ceil_div(2 * static_cast<int64_t>(sms), blocks);
  return std::max<int64_t>(1, std::min<int64_t>({want, K / min_cols, 32}));
}

template <typename T, int BITS, int MR, bool VEC>
void launch_gemv(const Args<T>& a, dim3 grid, cudaStream_t stream) {
  gemv_kernel<T, BITS, MR, VEC><<<grid, kGemvWarps * 32, 0, stream>>>(a);
}

template <typename T, int BITS, bool VEC>
void launch_gemv_m(const Args<T>& a, dim3 grid, cudaStream_t stream) {
  if (a.M <= 1) launch_gemv<T, BITS, 1, VEC>(a, grid, stream);
  else if (a.M <= 2) launch_gemv<T, BITS, 2, VEC>(a, grid, stream);
  else if (a.M <= 4) launch_gemv<T, BITS, 4, VEC>(a, grid, stream);
  else launch_gemv<T, BITS, kGemvMaxM, VEC>(a, grid, stream);
}

template <typename T, int BITS, bool VEC>
void launch_gemm(const Args<T>& a, dim3 grid, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    gemm_f32_kernel<BITS, VEC><<<grid, kSimtThreads, 0, stream>>>(a);
  } else {
    gemm_tc_kernel<T, BITS, VEC><<<grid, kGemmThreads, 0, stream>>>(a);
  }
}

template <typename T>
void run(Args<T> a, int bits, const at::Tensor& x, const at::Tensor& y) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const bool vec = aligned16(a.x) && aligned16(a.q) && (bits == 4 || a.K % 16 == 0);
  const bool gemv = a.M <= kGemvMaxM;

  // Output blocks without a split; `step`: every split starts on a multiple of it (a GEMV chunk,
  // keeping int4 chunks inside a group, or a GEMM K step); min_cols: the shortest split worth it
  // (one pass of a warp's 32 lanes; four GEMM steps).
  int64_t blocks, step, min_cols;
  if (gemv) {
    blocks = ceil_div(a.N, kGemvWarps * kRowsPerWarp);
    step = vec ? kChunk * (8 / bits) : 32;
    min_cols = 32 * step;
  } else {
    blocks = ceil_div(a.N, kTileN) * ceil_div(a.M, kTileM);
    step = kTileK;
    min_cols = 4 * kTileK;
  }
  int64_t splits = choose_splits(blocks, a.K, min_cols, sms);
  a.k_split = ceil_div(ceil_div(a.K, splits), step) * step;
  splits = ceil_div(a.K, a.k_split);  // none left empty
  TORCH_CHECK(splits <= 65535, "quant_matmul (cuda): K too large to split (", splits, " splits)");
  at::Tensor part;
  if (splits > 1) {
    part = at::empty({splits, a.M, a.N}, x.options().dtype(at::kFloat));
    a.part = part.data_ptr<float>();
  }

  auto dispatch = [&](auto bits_tag, auto vec_tag) {
    constexpr int B = decltype(bits_tag)::value;
    constexpr bool V = decltype(vec_tag)::value;
    if (gemv) {
      launch_gemv_m<T, B, V>(a, dim3(grid_dim(blocks, "row blocks"), 1, static_cast<unsigned>(splits)), stream);
    } else {
      const int64_t m_tiles = ceil_div(a.M, kTileM);
      TORCH_CHECK(m_tiles <= 65535, "quant_matmul (cuda): x has too many rows (", a.M, ")");
      launch_gemm<T, B, V>(a, dim3(grid_dim(ceil_div(a.N, kTileN), "column tiles"),
                                   static_cast<unsigned>(m_tiles), static_cast<unsigned>(splits)),
                           stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using I4 = std::integral_constant<int, 4>;
  using I8 = std::integral_constant<int, 8>;
  if (bits == 4) {
    if (vec) dispatch(I4{}, std::true_type{}); else dispatch(I4{}, std::false_type{});
  } else {
    if (vec) dispatch(I8{}, std::true_type{}); else dispatch(I8{}, std::false_type{});
  }

  if (splits > 1) {
    const int64_t mn = a.M * a.N;
    reduce_kernel<T><<<grid_dim(ceil_div(mn, 256), "outputs"), 256, 0, stream>>>(
        a.part, a.bias, y.data_ptr<T>(), mn, a.N, static_cast<int>(splits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_tensor(const at::Tensor& t, const at::Tensor& x, const char* name, at::IntArrayRef sizes,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.device() == x.device(), "quant_matmul (cuda): ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == dtype, "quant_matmul (cuda): ", name, " has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.sizes() == sizes, "quant_matmul (cuda): ", name, " has shape ", t.sizes(), ", expected ",
              sizes);
  TORCH_CHECK(t.is_contiguous(), "quant_matmul (cuda): ", name, " must be contiguous");
}

}  // namespace

at::Tensor quant_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const OptTensor& zeros, const OptTensor& bias, int64_t bits,
                             int64_t group_size) {
  TORCH_CHECK(x.is_cuda(), "quant_matmul (cuda): x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quant_matmul (cuda): x must be a contiguous 2-D tensor (M, K), got shape ",
              x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "quant_matmul (cuda): x must be float16, bfloat16 or float32, got ", dt);
  TORCH_CHECK(bits == 4 || bits == 8, "quant_matmul (cuda): bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.dim() == 2, "quant_matmul (cuda): qweight must be 2-D, got shape ", qweight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  if (bits == 8) {
    TORCH_CHECK(group_size == K, "quant_matmul (cuda): group_size must equal K = ", K, " for bits = 8, got ",
                group_size);
    TORCH_CHECK(!present(zeros), "quant_matmul (cuda): zeros must be absent for bits = 8 (symmetric)");
    check_tensor(qweight, x, "qweight", {N, K}, at::kChar);
  } else {
    TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
                "quant_matmul (cuda): group_size must be 32, 64 or 128 for bits = 4, got ", group_size);
    TORCH_CHECK(K % group_size == 0, "quant_matmul (cuda): K = ", K, " (x.size(1)) must be a multiple of group_size = ",
                group_size);
    check_tensor(qweight, x, "qweight", {N, K / 2}, at::kByte);
  }
  const int64_t groups = group_size > 0 ? K / group_size : 0;
  check_tensor(scales, x, "scales", {N, groups}, at::kFloat);
  if (present(zeros)) check_tensor(*zeros, x, "zeros", {N, groups}, at::kFloat);
  if (present(bias)) check_tensor(*bias, x, "bias", {N}, dt);
  TORCH_CHECK(K <= INT_MAX && N <= INT_MAX, "quant_matmul (cuda): K and N must be below 2^31, got K = ", K,
              ", N = ", N);

  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) {  // an empty sum
    if (present(bias)) y.copy_(bias->unsqueeze(0).expand({M, N})); else y.zero_();
    return y;
  }
  dispatch_float(dt, "quant_matmul", [&](auto tag) {
    using T = decltype(tag);
    Args<T> a{x.data_ptr<T>(), reinterpret_cast<const uint8_t*>(qweight.data_ptr()), scales.data_ptr<float>(),
              present(zeros) ? zeros->data_ptr<float>() : nullptr,
              present(bias) ? bias->data_ptr<T>() : nullptr, y.data_ptr<T>(), nullptr, M, N, K, 0,
              static_cast<int>(group_size)};
    run<T>(a, static_cast<int>(bits), x, y);
  });
  return y;
}

}  // namespace fastlm
