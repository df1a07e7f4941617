// The integer-dot quantized linear on the CPU (quant_dot.cpp drives it; the kernels live in one
// file per instruction set, each compiled with function-level target attributes so that the
// build stays -mavx2 and a machine without the wider instructions never runs them).
//
// Activations are quantized once per call to int8 in blocks of 32 along K (d = absmax / 127,
// q = round(x / d)); weights stay packed; a block's products are summed in int32 and scaled once.
// No ATen in this header: the kernel files include little but it and <immintrin.h>.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace fastlm::qdot {

constexpr int64_t kBlock = 32;  // k per activation block

// Blocks of 32 k of x are stored in "kernel order". int8: natural order. int4: the blocks are
// taken in super-blocks of S (S = 2 for 256-bit kernels, 4 for 512-bit; the blocks left over at
// the end of K form super-blocks of one), and a super-block holds the even-k halves of its
// blocks first, then the odd-k halves: x[b0, 0::2], x[b1, 0::2], .., x[b0, 1::2], x[b1, 1::2], ..
// (16 values each). A load of S x 16 packed bytes then meets the low nibbles (even k) with the
// first half and the high nibbles (odd k) with the second, with no shuffle of the weights.
//
// R rows at once (R = 8: int4 on the 256-bit kernels, and the 512-bit kernels' last 8; R = 16:
// the 512-bit kernels): "row-interleaved" order. A group of R rows from row m0 starts at
// q8 + m0 * K; each block of it is 32 R bytes in 4 steps of 8 k, a step holding the even half of
// the R rows (4 bytes each, row after row), then the odd half. int4: the even half is k 0, 2, 4, 6
// of the step, the odd half k 1, 3, 5, 7, so that a 4-byte broadcast of the packed weights (8 k:
// the low nibbles even, the high odd) meets the same 4 k of every row of the group in one
// instruction. int8: natural order (k 0..3, then 4..7).
struct Act {
  const int8_t* q;       // (M, K) quantized x, kernel order
  const float* d;        // (M, K / 32) block scales; kernels widen them to their int32 lanes in
                         // registers (a per-lane copy in memory would be 8x the bytes of q for
                         // int8 and push x out of L1 once K passes ~8K)
  const float* corr;     // int4: (M, groups) sum over a group's blocks of d * sum(q); int8: (M) the
                         // same over all blocks times 128 (the 512-bit kernel's offset)
  const int8_t* q8;      // the first rows, in groups of R row-interleaved (above), or null
  const float* d8;       // their block scales, a group's from m0 * K / 32 on, a block's R rows together
  const int32_t* s8;     // their block sums of q, likewise
};

enum class ScaleType : int { f32 = 0, bf16 = 1, f16 = 2 };

// Scale (or zero) i of a tensor of type t, as float (bf16: the top half of a float32). Every kernel
// file's target includes F16C, so this inlines into each.
__attribute__((target("f16c"))) inline float to_float(const void* p, int64_t i, ScaleType t) {
  if (t == ScaleType::f32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (t == ScaleType::f16) return _cvtsh_ss(h);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

struct Problem {
  Act a;
  const uint8_t* w;      // packed weights, row_bytes per row
  const void* scales;    // (N, groups) in scale_type
  const void* zeros;     // (N, groups) in scale_type, or null (int4: implicit 8)
  const float* bias;     // (N) or null
  float* y;              // (M, N)
  int64_t m, n, k, group, groups, row_bytes;
  int bits;
  ScaleType scale_type;
};

// Rows [n0, n1) of y for rows [m0, m0 + mb) of x, mb in 1..4, or mb = R (8 or 16: the group of
// Act::q8 from m0). Each kernel file defines one.
using RowsFn = void (*)(const Problem&, int64_t n0, int64_t n1, int64_t m0, int mb);

enum class Isa : int { avx2 = 1, avx512_vnni = 2, avx_vnni = 3 };

void rows_avx2(const Problem&, int64_t, int64_t, int64_t, int);
void rows_avxvnni(const Problem&, int64_t, int64_t, int64_t, int);
void rows_avx512(const Problem&, int64_t, int64_t, int64_t, int);
void rows_avx512_il(const Problem&, int64_t, int64_t, int64_t, int);  // mb = R (quant_dot_avx512_il.cpp)

// Super-block width (blocks) of the int4 kernel order for each instruction set.
inline int super_blocks(Isa isa) { return isa == Isa::avx512_vnni ? 4 : 2; }

// Rows [n0, n1) of W, NB at a time: many(n, stride) takes rows n, n + stride, .., one(n) a row
// left over. SPREAD (for one row of x) takes the NB rows from the NB parts of the range, so that
// the thread reads NB memory streams at once: one core's read bandwidth grows with the streams in
// flight (a plain read loop on an Intel Xeon: 4 streams ~25% over 1). Otherwise adjacent rows,
// which share each load of x.
template <int NB, bool SPREAD, typename One, typename Many>
inline void walk_rows(int64_t n0, int64_t n1, One one, Many many) {
  int64_t n = n0;
  if constexpr (SPREAD && NB > 1) {
    const int64_t stride = (n1 - n0) / NB;
    for (int64_t i = 0; i < stride; ++i) many(n0 + i, stride);
    n = n0 + NB * stride;
  }
  for (; n + NB <= n1; n += NB) many(n, int64_t{1});
  for (; n < n1; ++n) one(n);
}

}  // namespace fastlm::qdot
