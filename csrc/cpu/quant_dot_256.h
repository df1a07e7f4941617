// The 256-bit integer-dot kernels, compiled twice: plain AVX2 (quant_dot_avx2.cpp, u8 x s8 products
// by vpmaddubsw + vpmaddwd) and AVX-VNNI (quant_dot_avxvnni.cpp, one vpdpbusd for both). The
// including file defines QD_TARGET (the function attribute), QD_VNNI (0 or 1) and QD_NAME.
//
// int8 weights are signed and vpmaddubsw wants one unsigned operand: the products are taken as
// |w| times x with w's sign moved onto x (vpsignb), so 2 x 127 x 127 fits the int16 pair sums.
// int4 weights are used as stored (0..15) and the implicit zero (8, or the stored zero points)
// is taken off once per row from the sums of the quantized x (Act::corr).
#include <immintrin.h>

#include "cpu/quant_dot.h"

namespace fastlm::qdot {
namespace {

QD_TARGET inline __m256i dot(__m256i acc, __m256i u, __m256i s) {
#if QD_VNNI
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// Two pairs summed in int16 first (15 x 127 x 4 fits), one widening for both.
QD_TARGET inline __m256i dot2(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
#if QD_VNNI
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
#else
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

// Eight scales (or zeros) from i on, widened to float.
QD_TARGET inline __m256 load8(const void* p, int64_t i, ScaleType t) {
  if (t == ScaleType::f32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if (t == ScaleType::f16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

QD_TARGET inline float hsum(__m256 v);

// sum over the row's groups of scale * zero * corr: what the stored (unsigned) int4 values add
// beyond the signed ones, taken off once per row.
QD_TARGET inline float zero_share(const Problem& p, int64_t g0, const float* corr) {
  // Four chains: one would wait on the FMA's latency every 8 groups.
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t g = 0;
  if (!p.zeros) {
    for (; g + 32 <= p.groups; g += 32) {
      for (int u = 0; u < 4; ++u) {
        const int64_t i = g + 8 * u;
        acc[u] = _mm256_fmadd_ps(load8(p.scales, g0 + i, p.scale_type), _mm256_loadu_ps(corr + i), acc[u]);
      }
    }
    for (; g + 8 <= p.groups; g += 8)
      acc[0] = _mm256_fmadd_ps(load8(p.scales, g0 + g, p.scale_type), _mm256_loadu_ps(corr + g), acc[0]);
    float c = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; g < p.groups; ++g) c += to_float(p.scales, g0 + g, p.scale_type) * corr[g];
    return 8.f * c;
  }
  for (; g + 8 <= p.groups; g += 8) {
    const __m256 sz = _mm256_mul_ps(load8(p.scales, g0 + g, p.scale_type), load8(p.zeros, g0 + g, p.scale_type));
    acc[(g / 8) & 3] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(corr + g), acc[(g / 8) & 3]);
  }
  float c = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; g < p.groups; ++g) {
    c += to_float(p.scales, g0 + g, p.scale_type) * to_float(p.zeros, g0 + g, p.scale_type) * corr[g];
  }
  return c;
}

QD_TARGET inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// v[0] in lanes 0-3, v[1] in lanes 4-7.
QD_TARGET inline __m256 widen2(__m128 v) {
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

// x's block scales d[0], d[1] in lanes 0-3 and 4-7 (int4: a 32-byte step is two blocks).
QD_TARGET inline __m256 widen2(const float* d) {
  return widen2(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(d))));
}

QD_TARGET inline void prefetch(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T0);
}

// NB weight rows n, n + stride, .. for MB rows of x from m0: each load of x serves NB rows. One row
// keeps two accumulators per x row (even and odd steps), so that the float adds of one step do not
// wait on the last; several rows keep one per (row, x row), four chains or more already, in 16
// registers.
template <int MB, int NB>
QD_TARGET void rows_int8_nb(const Problem& p, int64_t n, int64_t m0, int64_t stride) {
  constexpr int U = NB == 1 ? 2 : 1;
  const int64_t nb = p.k / kBlock;
  const uint8_t* row[NB];
  for (int r = 0; r < NB; ++r) row[r] = p.w + (n + r * stride) * p.row_bytes;
  __m256 acc[U][NB][MB];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < NB; ++r)
      for (int m = 0; m < MB; ++m) acc[u][r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i v[NB], av[NB];
    for (int r = 0; r < NB; ++r) {
      if ((b & 1) == 0) prefetch(row[r] + b * 32);
      v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + b * 32));
      av[r] = _mm256_abs_epi8(v[r]);
    }
    for (int m = 0; m < MB; ++m) {
      const int64_t mm = m0 + m;
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.a.q + mm * p.k + b * 32));
      const __m256 d = _mm256_set1_ps(p.a.d[mm * nb + b]);
      for (int r = 0; r < NB; ++r) {
        const __m256i i = dot(_mm256_setzero_si256(), av[r], _mm256_sign_epi8(x, v[r]));
        acc[b % U][r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), d, acc[b % U][r][m]);
      }
    }
  }
  for (int r = 0; r < NB; ++r) {
    const int64_t nr = n + r * stride;
    const float s = to_float(p.scales, nr, p.scale_type);
    for (int m = 0; m < MB; ++m) {
      __m256 t = acc[0][r][m];
      for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[u][r][m]);
      float v = s * hsum(t);
      if (p.bias) v += p.bias[nr];
      p.y[(m0 + m) * p.n + nr] = v;
    }
  }
}

// The scales of blocks b and b + 1 of a row, [b x 4 | b + 1 x 4], or one group's for both; two
// adjacent scales are one load and one permute.
QD_TARGET inline __m256 pair_scales(const Problem& p, int64_t g0, int64_t b, int64_t bpg) {
  if (bpg != 1) return _mm256_set1_ps(to_float(p.scales, g0 + b / bpg, p.scale_type));
  if (p.scale_type == ScaleType::f32) return widen2(static_cast<const float*>(p.scales) + g0 + b);
  int32_t two;
  __builtin_memcpy(&two, static_cast<const uint16_t*>(p.scales) + g0 + b, 4);
  const __m128i h = _mm_cvtsi32_si128(two);
  if (p.scale_type == ScaleType::f16) return widen2(_mm_cvtph_ps(h));
  return widen2(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
}

template <int MB, int NB>
QD_TARGET void rows_int4_nb(const Problem& p, int64_t n, int64_t m0, int64_t stride) {
  constexpr int U = NB == 1 ? 2 : 1;
  const int64_t nb = p.k / kBlock, pairs = nb / 2;
  const int64_t bpg = p.group / kBlock;  // blocks per group: 1, 2 or 4
  const __m256i low = _mm256_set1_epi8(15);
  const uint8_t* row[NB];
  int64_t g0[NB];
  for (int r = 0; r < NB; ++r) {
    row[r] = p.w + (n + r * stride) * p.row_bytes;
    g0[r] = (n + r * stride) * p.groups;
  }
  __m256 acc[U][NB][MB];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < NB; ++r)
      for (int m = 0; m < MB; ++m) acc[u][r][m] = _mm256_setzero_ps();
  for (int64_t j = 0; j < pairs; ++j) {
    const int64_t b = 2 * j;
    __m256i lo[NB], hi[NB];
    __m256 sw[NB];
    for (int r = 0; r < NB; ++r) {
      prefetch(row[r] + j * 32);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + j * 32));
      lo[r] = _mm256_and_si256(v, low);
      hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      sw[r] = pair_scales(p, g0[r], b, bpg);
    }
    for (int m = 0; m < MB; ++m) {
      const int64_t mm = m0 + m;
      const int8_t* xq = p.a.q + mm * p.k + j * 64;
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
      const __m256 d = widen2(p.a.d + mm * nb + b);
      for (int r = 0; r < NB; ++r) {
        const __m256i i = dot2(lo[r], x0, hi[r], x1);
        acc[j % U][r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(d, sw[r]), acc[j % U][r][m]);
      }
    }
  }
  if (nb & 1) {  // the last block alone: a super-block of one, [even | odd]
    const int64_t b = nb - 1;
    const __m128i l4 = _mm_set1_epi8(15);
    for (int r = 0; r < NB; ++r) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + b * 16));
      const __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), l4), _mm_and_si128(v, l4));
      const float s = to_float(p.scales, g0[r] + b / bpg, p.scale_type);
      for (int m = 0; m < MB; ++m) {
        const int64_t mm = m0 + m;
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.a.q + mm * p.k + b * 32));
        const __m256i i = dot(_mm256_setzero_si256(), wv, x);
        acc[0][r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(s * p.a.d[mm * nb + b]), acc[0][r][m]);
      }
    }
  }
  for (int r = 0; r < NB; ++r) {
    const int64_t nr = n + r * stride;
    for (int m = 0; m < MB; ++m) {
      const int64_t mm = m0 + m;
      __m256 t = acc[0][r][m];
      for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[u][r][m]);
      // The zero points' share: sum over groups of scale * zero * (sum of d q over the group).
      float v = hsum(t) - zero_share(p, g0[r], p.a.corr + mm * p.groups);
      if (p.bias) v += p.bias[nr];
      p.y[mm * p.n + nr] = v;
    }
  }
}

// NB adjacent weight rows from n against the 8 rows of x of group g (Act::q8). A block's products
// for one weight row and 8 rows of x are 8 vpmaddubsw (4 k of each row of x per instruction) summed
// in int16, then one widening gives one int32 lane per row of x, so the block's float work (a
// convert and an FMA) serves 8 rows, where rows_int4_nb spends it per row. 16 products of
// 15 x 127 per int16 lane fit. The zero points come off in int32 (8 x the block's sum of q) or,
// stored ones, in float, per block: no pass over the row's groups afterwards.
template <int NB>
QD_TARGET void rows_int4_x8(const Problem& p, int64_t n, int64_t g) {
  const int64_t nb = p.k / kBlock;
  const int gsh = p.group == 32 ? 0 : p.group == 64 ? 1 : 2;  // block b is in group b >> gsh
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const uint8_t* row[NB];
  int64_t g0[NB];
  for (int r = 0; r < NB; ++r) {
    row[r] = p.w + (n + r) * p.row_bytes;
    g0[r] = (n + r) * p.groups;
  }
  const int8_t* xg = p.a.q8 + g * nb * 256;
  const float* dg = p.a.d8 + g * nb * 8;
  const int32_t* sg = p.a.s8 + g * nb * 8;
  __m256 acc[NB];
  for (int r = 0; r < NB; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* xb = xg + b * 256;
    __m256i s[NB];
    for (int r = 0; r < NB; ++r) {
      // The rows NB on, which the next call reads: 16 bytes a block, one line every 4 blocks.
      if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(row[r] + NB * p.row_bytes + b * 16), _MM_HINT_T0);
      s[r] = _mm256_setzero_si256();
      for (int t = 0; t < 4; ++t) {
        const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + t * 64));
        const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + t * 64 + 32));
        int32_t w4;
        __builtin_memcpy(&w4, row[r] + b * 16 + t * 4, 4);
        const __m256i wv = _mm256_set1_epi32(w4);
        const __m256i lo = _mm256_and_si256(wv, low), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
        s[r] = _mm256_add_epi16(s[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)));
        // Keeps the sum a chain: GCC otherwise reassociates the block's 32 products into a tree
        // and spills them to the stack (1.5-2x slower, AMD EPYC Zen 3).
        __asm__("" : "+x"(s[r]));
      }
    }
    const __m256 d = _mm256_loadu_ps(dg + b * 8);
    const __m256i sq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + b * 8));
    const __m256i sq8 = _mm256_slli_epi32(sq, 3);
    for (int r = 0; r < NB; ++r) {
      const __m256i i = _mm256_madd_epi16(s[r], ones);
      const int64_t gi = g0[r] + (b >> gsh);
      const __m256 f = p.zeros ? _mm256_fnmadd_ps(_mm256_set1_ps(to_float(p.zeros, gi, p.scale_type)),
                                                  _mm256_cvtepi32_ps(sq), _mm256_cvtepi32_ps(i))
                               : _mm256_cvtepi32_ps(_mm256_sub_epi32(i, sq8));
      acc[r] = _mm256_fmadd_ps(f, _mm256_mul_ps(d, _mm256_set1_ps(to_float(p.scales, gi, p.scale_type))), acc[r]);
    }
  }
  for (int r = 0; r < NB; ++r) {
    alignas(32) float v[8];
    _mm256_store_ps(v, acc[r]);
    const float bias = p.bias ? p.bias[n + r] : 0.f;
    for (int m = 0; m < 8; ++m) p.y[(g * 8 + m) * p.n + n + r] = v[m] + bias;
  }
}

QD_TARGET void rows_x8(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  walk_rows<4, false>(n0, n1, [&](int64_t n) { rows_int4_x8<1>(p, n, m0 / 8); },
                      [&](int64_t n, int64_t) { rows_int4_x8<4>(p, n, m0 / 8); });
}

// With one row of x four rows from the four quarters of the range (four memory streams); with
// more, two adjacent rows, which share each load of x and its block scale (AMD EPYC Zen 3, 4096 x
// 4096, M = 16, against one row at a time: int8 5.38 -> 4.54 ms, int4 g32 6.43 -> 5.39, medians
// of six alternations).
constexpr int rows_at_once(int mb) { return mb == 1 ? 4 : 2; }

template <int MB>
QD_TARGET void rows_int8(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int NB = rows_at_once(MB);
  walk_rows<NB, MB == 1>(n0, n1, [&](int64_t n) { rows_int8_nb<MB, 1>(p, n, m0, 1); },
                         [&](int64_t n, int64_t stride) { rows_int8_nb<MB, NB>(p, n, m0, stride); });
}

template <int MB>
QD_TARGET void rows_int4(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int NB = rows_at_once(MB);
  walk_rows<NB, MB == 1>(n0, n1, [&](int64_t n) { rows_int4_nb<MB, 1>(p, n, m0, 1); },
                         [&](int64_t n, int64_t stride) { rows_int4_nb<MB, NB>(p, n, m0, stride); });
}

template <int BITS>
QD_TARGET void rows_bits(const Problem& p, int64_t n0, int64_t n1, int64_t m0, int mb) {
  constexpr auto f1 = BITS == 4 ? rows_int4<1> : rows_int8<1>;
  constexpr auto f2 = BITS == 4 ? rows_int4<2> : rows_int8<2>;
  constexpr auto f3 = BITS == 4 ? rows_int4<3> : rows_int8<3>;
  constexpr auto f4 = BITS == 4 ? rows_int4<4> : rows_int8<4>;
  switch (mb) {
    case 1: return f1(p, n0, n1, m0);
    case 2: return f2(p, n0, n1, m0);
    case 3: return f3(p, n0, n1, m0);
    default: return f4(p, n0, n1, m0);
  }
}

}  // namespace

QD_TARGET void QD_NAME(const Problem& p, int64_t n0, int64_t n1, int64_t m0, int mb) {
  if (mb == 8) {
    rows_x8(p, n0, n1, m0);
  } else if (p.bits == 4) {
    rows_bits<4>(p, n0, n1, m0, mb);
  } else {
    rows_bits<8>(p, n0, n1, m0, mb);
  }
}

}  // namespace fastlm::qdot
