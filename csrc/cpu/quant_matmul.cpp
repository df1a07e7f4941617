// Weight-only quantized linear on the CPU: y = x dequant(W)^T + bias, for int8 weights per output
// channel and int4 weights in groups along K (layout: csrc/fastlm.h, fastlm/quant.py).
//
// Two paths, both AVX2 + FMA, accumulating in float32:
//
// GEMV (M <= 8, the decode step). The packed weights are read from memory exactly once, which is
// the whole cost: a 4096x4096 int4 matrix is 8 MiB against 64 MiB of float32. Threads take 64 KiB
// runs of rows from a shared counter and walk each run's rows one after another (a sequential
// stream), unpack 16 weights a step to float and multiply them into every row of x, which stays in
// L1. The group scale is applied to a group's partial sum rather than to every weight, and the
// zero point (8 for symmetric int4) to the sum of x over the group, once per group: the inner loop
// is load, unpack, convert, FMA.
//
// GEMM (M > 8, or layouts the GEMV cannot step through: K or group_size not a multiple of 16).
// A tile of whole weight rows (about 128 KiB of float32) is dequantized once into a buffer in L2
// and reused by up to 128 rows of x through a 3x4 register-blocked micro-kernel (3 rows of x, 4
// weight rows, 12 accumulators of 8 k-lanes, reduced at the end of each 512-wide k slice). Whole
// rows, because the packed bytes then stream from memory in order: dequantizing 16-row x 512-k
// tiles instead cost more than the arithmetic (latency-bound misses). The next tile's bytes are
// prefetched while a tile computes. From M = 256 on (gemm_blas), slabs of rows are dequantized the
// same way into L3 and multiplied by torch's BLAS instead, which is faster there.
//
// The int4 nibble order (even k in the low nibble) is undone on x instead of the weights: x is
// copied once per call into "kernel order", where within every 16-wide block of k the 8 even
// positions come first and the 8 odd ones after; an 8-byte load of packed weights then yields
// the low nibbles for the first half and the high nibbles for the second with one shift and one
// mask. A dot product does not care about the order as long as both sides share it. The same
// copy converts bf16/fp16 x to float once and pads K to a multiple of 16 with zeros.
//
// The int4 GEMV saves the shift: it multiplies the low nibble lo and the whole byte b = lo + 16 hi,
// against x rewritten per byte as (x_even - x_odd / 16, x_odd / 16). The products sum to
// x_even lo + x_odd hi, as before, at one extra rounding of x per even k; one vector op of six per
// 16 weights, measured 5-7% faster for a 4096 x 4096 GEMV from memory.
//
// This is the exact path: x stays float. quant_dot.cpp is the integer one (x quantized to int8
// per block, VNNI where the CPU has it), chosen per call by fastlm.ops.quant_linear(act_quant=).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu/pool.h"
#include "cpu/vec.h"
#include "fastlm.h"

namespace fastlm {
namespace {

constexpr int64_t kBlk = 16;  // k values per unpack step

struct Problem {
  const float* x;        // (M, Kp) in kernel order, zero padded
  const uint8_t* q;      // packed weights, row_bytes per row
  const float* scales;   // (N, groups)
  const float* zeros;    // (N, groups) or null
  const float* sumx;     // (M, groups) sums of x per group, for the GEMV's zero points
  const float* bias;     // (N) or null
  float* y;              // (M, N)
  int64_t m, n, k, kp, group, groups, row_bytes;
  int bits;
};

// k of position i in a 16-block of kernel order (relative to the block start).
inline int64_t block_k(int bits, int64_t i) { return bits == 4 ? (i < 8 ? 2 * i : 2 * (i - 8) + 1) : i; }

// The signed weight value (q minus the implicit offset: 8 for int4, 0 for int8) at (n, k).
inline int shifted_q(const Problem& p, int64_t n, int64_t k) {
  const uint8_t* row = p.q + n * p.row_bytes;
  if (p.bits == 8) return static_cast<int8_t>(row[k]);
  const uint8_t b = row[k >> 1];
  return ((k & 1) ? (b >> 4) : (b & 15)) - 8;
}

// Zero point on the shifted scale: W = (qs - zs) * scale.
inline float shifted_zero(const Problem& p, int64_t n, int64_t g) {
  return p.zeros ? p.zeros[n * p.groups + g] - (p.bits == 4 ? 8.f : 0.f) : 0.f;
}

// 16 consecutive packed weights of one row as two vectors of int32, in kernel order, as signed
// values (q - 8 for int4). The int4 GEMV unpacks its own way (whole bytes, see the top).
template <int BITS>
inline void load16(const uint8_t* row, int64_t blk, __m256i& lo, __m256i& hi) {
  if constexpr (BITS == 4) {
    const __m256i t = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + blk * 8)));
    lo = _mm256_and_si256(t, _mm256_set1_epi32(15));
    hi = _mm256_srli_epi32(t, 4);
    lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(8));
    hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(8));
  } else {
    const int8_t* p = reinterpret_cast<const int8_t*>(row + blk * 16);
    lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    hi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  }
}

template <int C>
inline __m256 tree_sum(const __m256* v) {
  if constexpr (C == 1) {
    return v[0];
  } else {
    return _mm256_add_ps(tree_sum<C / 2>(v), tree_sum<C - C / 2>(v + C / 2));
  }
}

// --- GEMV ---------------------------------------------------------------------------------------

// sum over groups g of scale_g * zero_g * sumx_g: the zero points' share of a row of the GEMV, taken
// once per row over all groups, eight at a time, instead of a scalar FMA in every group's epilogue.
inline float zero_correction(const float* sc, const float* zr, float zdef, const float* sumx, int64_t groups) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 z = zr ? _mm256_loadu_ps(zr + g) : _mm256_set1_ps(zdef);
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sc + g), z), _mm256_loadu_ps(sumx + g), acc);
  }
  float c = vec::hsum(acc);
  for (; g < groups; ++g) c = std::fma(sc[g] * (zr ? zr[g] : zdef), sumx[g], c);
  return c;
}

// Row n of y for all MB rows of x. Rows are taken one after another, so that each thread reads
// its share of the packed weights as one sequential stream (the hardware prefetcher's best case:
// interleaving several rows instead cut the bandwidth by a third here); independent accumulators
// come from U blocks of k in flight (U a divisor of the blocks per group) and, while MB is small,
// separate ones for the two halves of a block. Needs K and group_size multiples of 16.
// BPG, the 16-blocks per group, is a compile-time constant for the common group sizes (0: read it
// from p), so that a group's loop unrolls completely.
template <int BITS, int MB, int U, int BPG>
void gemv_row(const Problem& p, int64_t n) {
  constexpr int H = MB <= 4 ? 2 : 1;  // accumulators per block: the two halves, or one for both
  constexpr int64_t kBlkBytes = BITS == 4 ? 8 : 16;
  const int64_t bpg = BPG ? BPG : p.group / kBlk;
  const uint8_t* row = p.q + n * p.row_bytes;
  const float* sc = p.scales + n * p.groups;
  const float* zr = p.zeros ? p.zeros + n * p.groups : nullptr;
  const float zdef = BITS == 4 ? 8.f : 0.f;
  __m256 tot[MB];
  for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256 acc[U][MB][H];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MB; ++m)
        for (int h = 0; h < H; ++h) acc[u][m][h] = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; b += U) {
      // A software prefetch 2 KiB ahead, once per cache line, measured 5-15% faster than leaving
      // the stream to the hardware prefetcher alone.
      if (((b * kBlkBytes) & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + b * kBlkBytes) + 2048, _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        __m256i lo, hi;
        if constexpr (BITS == 4) {  // the low nibble and the whole byte (x in byte form)
          hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (b + u) * 8)));
          lo = _mm256_and_si256(hi, _mm256_set1_epi32(15));
        } else {
          load16<BITS>(row, b + u, lo, hi);  // int8: signed as stored
        }
        const __m256 w0 = _mm256_cvtepi32_ps(lo), w1 = _mm256_cvtepi32_ps(hi);
        const float* xb = p.x + (b + u) * kBlk;
        for (int m = 0; m < MB; ++m) {
          acc[u][m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb + m * p.kp), acc[u][m][0]);
          acc[u][m][H - 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + m * p.kp + 8), acc[u][m][H - 1]);
        }
      }
    }
    const __m256 vs = _mm256_set1_ps(sc[g]);
    for (int m = 0; m < MB; ++m) {
      // A pairwise sum: a chain of U * H - 1 dependent adds per group was the loop's bottleneck.
      __m256 v[U * H];
      for (int u = 0; u < U; ++u)
        for (int h = 0; h < H; ++h) v[u * H + h] = acc[u][m][h];
      tot[m] = _mm256_fmadd_ps(vs, tree_sum<U * H>(v), tot[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float v = vec::hsum(tot[m]);
    if (p.sumx) v -= zero_correction(sc, zr, zdef, p.sumx + m * p.groups, p.groups);
    if (p.bias) v += p.bias[n];
    p.y[m * p.n + n] = v;
  }
}

// Rows are handed out in chunks of about 64 KiB from a shared counter rather than split evenly in
// advance: a thread that wakes late (a millisecond is not rare on a busy VM, against a 1 ms call)
// then takes fewer chunks instead of finishing last with a full share, and one that has not woken
// by the time the last chunk is claimed is not waited for (cpu/pool.h).
struct GemvCtx {
  const Problem* p;
  int64_t rows;
};

template <int BITS, int MB, int U, int BPG>
void gemv_chunk(void* v, int64_t c) {
  const GemvCtx& cx = *static_cast<const GemvCtx*>(v);
  const Problem& p = *cx.p;
  for (int64_t n = c * cx.rows, e = std::min(p.n, n + cx.rows); n < e; ++n) gemv_row<BITS, MB, U, BPG>(p, n);
}

template <int BITS, int MB, int U, int BPG>
void gemv_bpg(const Problem& p) {
  const int64_t rows = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, p.row_bytes));
  const int64_t chunks = (p.n + rows - 1) / rows;
  // Alone below ~256 KiB of weights, where waking a thread costs more than it saves.
  const int64_t helpers = std::min<int64_t>(pool::helpers_for(chunks), std::max<int64_t>(1, chunks / 4) - 1);
  GemvCtx cx{&p, rows};
  pool::parallel_chunks(chunks, static_cast<int>(helpers), gemv_chunk<BITS, MB, U, BPG>, &cx);
}

template <int BITS, int MB, int U>
void gemv(const Problem& p) {
  switch (p.group / kBlk) {
    case 8: if constexpr (8 % U == 0) return gemv_bpg<BITS, MB, U, 8>(p); break;
    case 4: if constexpr (4 % U == 0) return gemv_bpg<BITS, MB, U, 4>(p); break;
    case 2: if constexpr (2 % U == 0) return gemv_bpg<BITS, MB, U, 2>(p); break;
  }
  gemv_bpg<BITS, MB, U, 0>(p);
}

// Blocks in flight: about eight accumulators, but no more blocks than a group has.
template <int BITS, int MB>
void gemv_unroll(const Problem& p) {
  const int64_t bpg = p.group / kBlk;
  if constexpr (MB == 1) {
    if (bpg % 4 == 0) return gemv<BITS, 1, 4>(p);
  }
  if constexpr (MB <= 2) {
    if (bpg % 2 == 0) return gemv<BITS, MB, 2>(p);
  }
  gemv<BITS, MB, 1>(p);
}

template <int BITS>
void gemv_any(const Problem& p) {
  switch (p.m) {
    case 1: return gemv_unroll<BITS, 1>(p);
    case 2: return gemv_unroll<BITS, 2>(p);
    case 3: return gemv_unroll<BITS, 3>(p);
    case 4: return gemv_unroll<BITS, 4>(p);
    case 5: return gemv_unroll<BITS, 5>(p);
    case 6: return gemv_unroll<BITS, 6>(p);
    case 7: return gemv_unroll<BITS, 7>(p);
    default: return gemv_unroll<BITS, 8>(p);
  }
}

// --- GEMM ---------------------------------------------------------------------------------------

constexpr int64_t kTileK = 512;     // k per micro-kernel pass: 3 rows of x and 4 of W, 14 KiB in L1
constexpr int64_t kChunkM = 128;    // rows of x per pass over W: a 128 x 512 slice of x is 256 KiB, in L2
constexpr int64_t kTileBytes = 128 << 10;  // the dequantized weight rows of one tile, in L2

// Weight rows per tile: whole rows (so that the packed bytes stream from memory in order) filling
// about kTileBytes of float32, a multiple of the micro-kernel's 4.
int64_t tile_rows(int64_t kp) { return std::clamp<int64_t>(kTileBytes / (kp * 4) / 4 * 4, 4, 32); }

// Rows n0 .. n0 + nt, k in [k0, k0 + len) of W in float, kernel order, into buf (nt, len).
template <int BITS>
void dequant_tile(const Problem& p, int64_t n0, int64_t nt, int64_t k0, int64_t len, float* buf) {
  for (int64_t r = 0; r < nt; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* row = p.q + n * p.row_bytes;
    float* out = buf + r * len;
    for (int64_t kb = k0; kb < k0 + len; kb += kBlk) {
      const int64_t g = kb / p.group;
      float* o = out + (kb - k0);
      if (kb + kBlk <= p.k && (kb + kBlk - 1) / p.group == g) {
        const float s = p.scales[n * p.groups + g];
        const __m256 vs = _mm256_set1_ps(s), vc = _mm256_set1_ps(-shifted_zero(p, n, g) * s);
        __m256i lo, hi;
        load16<BITS>(row, kb / kBlk, lo, hi);
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), vs, vc));
        _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), vs, vc));
        continue;
      }
      // A block that straddles groups or the end of K: one element at a time.
      for (int64_t i = 0; i < kBlk; ++i) {
        const int64_t k = kb + block_k(BITS, i);
        if (k >= p.k) {
          o[i] = 0.f;
          continue;
        }
        const int64_t gk = k / p.group;
        const float s = p.scales[n * p.groups + gk];
        o[i] = std::fma(static_cast<float>(shifted_q(p, n, k)), s, -shifted_zero(p, n, gk) * s);
      }
    }
  }
}

// Sums of the 8 lanes of each of a0..a3, as one 4-lane vector.
inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// y[MB, NB] += x[MB, len] w[NB, len]^T, len a multiple of 8.
template <int MB, int NB>
void micro(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* y, int64_t ldy) {
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < len; k += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
    for (int j = 0; j < NB; ++j) {
      const __m256 wv = _mm256_loadu_ps(w + j * ldw + k);
      for (int m = 0; m < MB; ++m) acc[m][j] = _mm256_fmadd_ps(xv[m], wv, acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float* yr = y + m * ldy;
    if constexpr (NB == 4) {
      _mm_storeu_ps(yr, _mm_add_ps(_mm_loadu_ps(yr), reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3])));
    } else {
      for (int j = 0; j < NB; ++j) yr[j] += vec::hsum(acc[m][j]);
    }
  }
}

template <int MB>
void micro_row(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* y, int64_t ldy,
               int64_t nt) {
  int64_t j = 0;
  for (; j + 4 <= nt; j += 4) micro<MB, 4>(x, ldx, w + j * ldw, ldw, len, y + j, ldy);
  switch (nt - j) {
    case 3: micro<MB, 3>(x, ldx, w + j * ldw, ldw, len, y + j, ldy); break;
    case 2: micro<MB, 2>(x, ldx, w + j * ldw, ldw, len, y + j, ldy); break;
    case 1: micro<MB, 1>(x, ldx, w + j * ldw, ldw, len, y + j, ldy); break;
    default: break;
  }
}

template <int BITS>
void gemm(const Problem& p) {
  // y starts as the bias and the k slices add into it.
  for (int64_t m = 0; m < p.m; ++m) {
    float* yr = p.y + m * p.n;
    if (p.bias) {
      std::copy(p.bias, p.bias + p.n, yr);
    } else {
      std::fill(yr, yr + p.n, 0.f);
    }
  }
  const int64_t nt_max = tile_rows(p.kp);
  const int64_t tiles = (p.n + nt_max - 1) / nt_max;
  for (int64_t m0 = 0; m0 < p.m; m0 += kChunkM) {
    const int64_t mc = std::min(kChunkM, p.m - m0);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(nt_max * p.kp);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * nt_max, nt = std::min(nt_max, p.n - n0);
        dequant_tile<BITS>(p, n0, nt, 0, p.kp, buf.data());
        // While this tile computes, the next one's packed bytes are fetched into L2, a share per
        // k slice, so that its dequantization does not wait on memory.
        const char* next = reinterpret_cast<const char*>(p.q + (n0 + nt) * p.row_bytes);
        const int64_t next_bytes = t + 1 < end ? std::min(nt_max, p.n - n0 - nt) * p.row_bytes : 0;
        const int64_t slices = (p.kp + kTileK - 1) / kTileK;
        const int64_t share = (next_bytes / slices + 63) / 64 * 64;
        for (int64_t k0 = 0, i = 0; k0 < p.kp; k0 += kTileK, ++i) {
          for (int64_t off = i * share; off < std::min(next_bytes, (i + 1) * share); off += 64)
            _mm_prefetch(next + off, _MM_HINT_T1);
          const int64_t len = std::min(kTileK, p.kp - k0);
          const float* x0 = p.x + m0 * p.kp + k0;
          const float* w0 = buf.data() + k0;
          float* y0 = p.y + m0 * p.n + n0;
          int64_t m = 0;
          for (; m + 3 <= mc; m += 3) micro_row<3>(x0 + m * p.kp, p.kp, w0, p.kp, len, y0 + m * p.n, p.n, nt);
          if (mc - m == 2) micro_row<2>(x0 + m * p.kp, p.kp, w0, p.kp, len, y0 + m * p.n, p.n, nt);
          if (mc - m == 1) micro_row<1>(x0 + m * p.kp, p.kp, w0, p.kp, len, y0 + m * p.n, p.n, nt);
        }
      }
    });
  }
}

// For M >= kBlasM: slabs of whole weight rows dequantized once into float (kernel order, like x)
// and multiplied by torch's BLAS, whose kernels use the widest vectors the CPU has. A slab is
// 8 MiB of float32, so that on the hosts measured it is still in L3 when the multiply reads it.
// Measured on an AMD EPYC Zen 3 (AVX2), 2 threads, 4096 x 1536 and 1536 x 4096, int4 g32 and int8:
// M = 512 took 37.9-43.1 ms this way against 47.6-57.8 with the tiles above (the dense float32
// matmul 36-41 ms); M = 128 12.2-16.3 against 11.9-15.1.
constexpr int64_t kBlasM = 256;
constexpr int64_t kSlabBytes = 8 << 20;

template <int BITS>
void gemm_blas(const Problem& p, const at::Tensor& xk, const at::Tensor& bias, at::Tensor& y) {
  const int64_t nt_max = tile_rows(p.kp);
  const int64_t slab = std::max<int64_t>(nt_max, kSlabBytes / (p.kp * 4) / nt_max * nt_max);
  at::Tensor w = at::empty({std::min(slab, p.n), p.kp}, xk.options());
  float* wb = w.data_ptr<float>();
  for (int64_t s0 = 0; s0 < p.n; s0 += slab) {
    const int64_t ns = std::min(slab, p.n - s0), tiles = (ns + nt_max - 1) / nt_max;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * nt_max;
        dequant_tile<BITS>(p, s0 + n0, std::min(nt_max, ns - n0), 0, p.kp, wb + n0 * p.kp);
      }
    });
    // A column slice of y is a row-major matrix with leading dimension N: BLAS writes it in place.
    at::Tensor ys = y.narrow(1, s0, ns);
    const at::Tensor wt = w.narrow(0, 0, ns).t();
    if (bias.defined()) {
      at::addmm_out(ys, bias.narrow(0, s0, ns).unsqueeze(0), xk, wt);
    } else {
      at::mm_out(ys, xk, wt);
    }
  }
}

// --- the entry point ----------------------------------------------------------------------------

// x (M, K) of any float type into (M, Kp) float32, kernel order, zero padded (in byte form when
// `bytes`: the int4 GEMV's); and, when sumx is given, the sums of x over each group (M, K / group),
// accumulated in double. Plain loops rather than ATen ops: at decode sizes this runs once per layer
// per token, and the code and data it touches are cold after the rest of the model ran, so less of
// both is faster.
template <typename T>
void to_kernel_order(const T* x, int64_t m, int64_t k, int64_t kp, int bits, bool bytes, float* out,
                     int64_t group, float* sumx) {
  // Rows in parallel only for the GEMM's sizes; the GEMV's few rows take microseconds.
  const auto rows = [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i) {
      const T* xr = x + i * k;
      float* o = out + i * kp;
      for (int64_t kb = 0; kb < kp; kb += kBlk) {
        if (bits == 4 && kb + kBlk <= k) {
          for (int64_t j = 0; j < kBlk / 2; ++j) {
            const float even = static_cast<float>(xr[kb + 2 * j]), odd = static_cast<float>(xr[kb + 2 * j + 1]);
            o[kb + j] = bytes ? even - odd * (1.f / 16) : even;
            o[kb + kBlk / 2 + j] = bytes ? odd * (1.f / 16) : odd;
          }
        } else {
          for (int64_t j = 0; j < kBlk; ++j) {
            const int64_t kk = kb + block_k(bits, j);
            o[kb + j] = kk < k ? static_cast<float>(xr[kk]) : 0.f;
          }
        }
      }
      if (sumx) {
        for (int64_t g = 0; g < k / group; ++g) {
          // Four partial sums: one chain of dependent double adds took longer than the copy above.
          double acc[4] = {0.0, 0.0, 0.0, 0.0};
          int64_t kk = g * group;
          for (; kk + 4 <= (g + 1) * group; kk += 4)
            for (int j = 0; j < 4; ++j) acc[j] += static_cast<double>(xr[kk + j]);
          for (; kk < (g + 1) * group; ++kk) acc[0] += static_cast<double>(xr[kk]);
          sumx[i * (k / group) + g] = static_cast<float>((acc[0] + acc[1]) + (acc[2] + acc[3]));
        }
      }
    }
  };
  if (m > 8) {
    at::parallel_for(0, m, 1, rows);
  } else {
    rows(0, m);
  }
}

}  // namespace

at::Tensor quant_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const OptTensor& zeros, const OptTensor& bias, int64_t bits,
                            int64_t group_size) {
  TORCH_CHECK(bits == 4 || bits == 8, "quant_matmul: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quant_matmul: x must be a contiguous 2-D tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "quant_matmul: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "quant_matmul: qweight must be a contiguous 2-D tensor");
  TORCH_CHECK(qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "quant_matmul: qweight must be ",
              bits == 8 ? "int8" : "uint8", " for ", bits, "-bit weights, got ", qweight.scalar_type());
  const int64_t n = qweight.size(0);
  TORCH_CHECK(qweight.size(1) * (bits == 4 ? 2 : 1) == k, "quant_matmul: qweight has ", qweight.size(1),
              " columns, which does not match K = ", k, " for ", bits, "-bit weights");
  TORCH_CHECK(group_size > 0 && k % group_size == 0, "quant_matmul: group_size ", group_size,
              " must divide K = ", k);
  const int64_t groups = k / group_size;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == n * groups,
              "quant_matmul: scales must be contiguous float32 of shape (", n, ", ", groups, ")");
  const bool has_zeros = zeros && zeros->defined();
  if (has_zeros) {
    TORCH_CHECK(zeros->scalar_type() == at::kFloat && zeros->is_contiguous() && zeros->numel() == n * groups,
                "quant_matmul: zeros must be contiguous float32 of shape (", n, ", ", groups, ")");
  }
  const bool has_bias = bias && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == x.scalar_type(),
                "quant_matmul: bias must be of shape (", n, ") and x's dtype");
  }
  for (const at::Tensor* t : {&qweight, &scales}) {
    TORCH_CHECK(t->device() == x.device(), "quant_matmul: all tensors must be on x's device");
  }

  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return y.to(x.scalar_type());

  const int64_t kp = (k + kBlk - 1) / kBlk * kBlk;
  const bool gemv_ok = m <= 8 && k % kBlk == 0 && group_size % kBlk == 0;
  // The GEMV multiplies the stored values as they are and applies the zero points per group, on
  // the sums of x over each group.
  const bool need_sumx = gemv_ok && (bits == 4 || has_zeros);
  // One buffer for x in kernel order (M, Kp) and the group sums (M, groups).
  at::Tensor work = at::empty({m * kp + (need_sumx ? m * groups : 0)}, y.options());
  float* xk = work.data_ptr<float>();
  float* sumx = need_sumx ? xk + m * kp : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quant_matmul_cpu", [&] {
    to_kernel_order(x.data_ptr<scalar_t>(), m, k, kp, static_cast<int>(bits), gemv_ok && bits == 4, xk,
                    group_size, sumx);
  });
  at::Tensor bias_f = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();

  Problem p{xk,
            static_cast<const uint8_t*>(qweight.data_ptr()),
            scales.data_ptr<float>(),
            has_zeros ? zeros->data_ptr<float>() : nullptr,
            sumx,
            has_bias ? bias_f.data_ptr<float>() : nullptr,
            y.data_ptr<float>(),
            m, n, k, kp, group_size, groups, qweight.size(1), static_cast<int>(bits)};
  if (!gemv_ok && m >= kBlasM) {
    const at::Tensor xk2 = work.narrow(0, 0, m * kp).view({m, kp});
    bits == 4 ? gemm_blas<4>(p, xk2, bias_f, y) : gemm_blas<8>(p, xk2, bias_f, y);
  } else if (bits == 4) {
    gemv_ok ? gemv_any<4>(p) : gemm<4>(p);
  } else {
    gemv_ok ? gemv_any<8>(p) : gemm<8>(p);
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace fastlm
