// The 512-bit integer-dot kernels (AVX-512 with VNNI: vpdpbusd, u8 x s8 summed into int32 in one
// instruction), chosen at run time by CPUID (quant_dot.cpp); the build stays -mavx2, so every
// function here carries its own target attribute.
//
// vpdpbusd does not saturate, so int8 weights are made unsigned by flipping the top bit (w + 128)
// and 128 times the block sums of the quantized x is taken off once per row (Act::corr). int4
// weights are used as stored (0..15): a 64-byte load is four blocks of 32 weights, its low
// nibbles meet the first half of the super-block of x and its high nibbles the second.
#include <immintrin.h>

#include "cpu/quant_dot.h"

#define QD_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

namespace fastlm::qdot {
namespace {

// C scales (or zeros) from i on, widened to float: one broadcast (C = 1) or 16 lanes.
template <int C>
QD_TARGET inline __m512 loadc(const void* p, int64_t i, ScaleType t) {
  static_assert(C == 1 || C == 16);
  if constexpr (C == 1) {
    return _mm512_set1_ps(to_float(p, i, t));
  } else {
    if (t == ScaleType::f32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    if (t == ScaleType::f16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

QD_TARGET inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// x's block scales d[0], d[1] in lanes 0-7 and 8-15 (int8: a 64-byte step is two blocks).
QD_TARGET inline __m512 widen2(const float* d) {
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(d)))));
}

// v[b] in lanes 4b..4b+3 (int4: a 64-byte step is a super-block of four blocks).
QD_TARGET inline __m512 widen4(__m128 v) {
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
}


// For M > 1 (at M = 4 it pays: AMD EPYC Zen 4, 2 threads, int4 g32 4096 x 4096 0.95 ms with, 1.24
// without). With one row of x, int8 takes none: its four streams and the hardware's prefetchers
// keep up, and one such instruction per 64-byte load only took load slots (4096 x 14336 int8 76 ->
// 84% of the read without); int4, with more work per byte, prefetches into L2 twice as far ahead
// (4096 x 4096 / 4096 x 14336, two runs: 69-79 / 77-78% of the read without, 82 / 87-88% so).
QD_TARGET inline void prefetch(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T0);
}

QD_TARGET inline void prefetch_far(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + 4096, _MM_HINT_T1);
}

QD_TARGET inline float zero_share(const Problem& p, int64_t g0, const float* corr) {
  __m512 acc = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= p.groups; g += 16) {
    const __m512 z = p.zeros ? loadc<16>(p.zeros, g0 + g, p.scale_type) : _mm512_set1_ps(8.f);
    acc = _mm512_fmadd_ps(_mm512_mul_ps(loadc<16>(p.scales, g0 + g, p.scale_type), z), _mm512_loadu_ps(corr + g), acc);
  }
  float c = hsum(acc);
  for (; g < p.groups; ++g) {
    const float z = p.zeros ? to_float(p.zeros, g0 + g, p.scale_type) : 8.f;
    c += to_float(p.scales, g0 + g, p.scale_type) * z * corr[g];
  }
  return c;
}

// NB weight rows n, n + stride, .. for MB rows of x, as rows_int4_nb below.
template <int MB, int NB>
QD_TARGET void rows_int8_nb(const Problem& p, int64_t n, int64_t m0, int64_t stride) {
  constexpr int U = NB * MB < 4 ? 2 : 1;
  const int64_t nb = p.k / kBlock, pairs = nb / 2;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const uint8_t* row[NB];
  for (int r = 0; r < NB; ++r) row[r] = p.w + (n + r * stride) * p.row_bytes;
  __m512 acc[U][NB][MB];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < NB; ++r)
      for (int m = 0; m < MB; ++m) acc[u][r][m] = _mm512_setzero_ps();
  for (int64_t j = 0; j < pairs; ++j) {
    __m512i w[NB];
    for (int r = 0; r < NB; ++r) {
      if constexpr (MB > 1) prefetch(row[r] + j * 64);
      w[r] = _mm512_xor_si512(_mm512_loadu_si512(row[r] + j * 64), flip);
    }
    for (int m = 0; m < MB; ++m) {
      const int64_t mm = m0 + m;
      const __m512i x = _mm512_loadu_si512(p.a.q + mm * p.k + j * 64);
      const __m512 de = widen2(p.a.d + mm * nb + 2 * j);
      for (int r = 0; r < NB; ++r) {
        const __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r], x);
        acc[j % U][r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), de, acc[j % U][r][m]);
      }
    }
  }
  for (int r = 0; r < NB; ++r) {
    __m256 tail[MB];
    for (int m = 0; m < MB; ++m) tail[m] = _mm256_setzero_ps();
    if (nb & 1) {
      const int64_t b = nb - 1;
      const __m256i u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + b * 32)),
                                         _mm256_set1_epi8(static_cast<char>(0x80)));
      for (int m = 0; m < MB; ++m) {
        const int64_t mm = m0 + m;
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.a.q + mm * p.k + b * 32));
        const __m256i i = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
        tail[m] = _mm256_mul_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(p.a.d[mm * nb + b]));
      }
    }
    const float s = to_float(p.scales, n + r * stride, p.scale_type);
    for (int m = 0; m < MB; ++m) {
      const int64_t mm = m0 + m;
      __m512 t = _mm512_castps256_ps512(tail[m]);
      for (int u = 0; u < U; ++u) t = _mm512_add_ps(t, acc[u][r][m]);
      float v = s * (hsum(t) - p.a.corr[mm]);
      if (p.bias) v += p.bias[n + r * stride];
      p.y[mm * p.n + n + r * stride] = v;
    }
  }
}

// With one row of x four rows from the four quarters of the range (four memory streams: these
// kernels at M = 1 on an Intel Xeon 12-27% faster than one row at a time); with more, two
// adjacent rows share each load of x.
constexpr int rows_at_once(int mb) { return mb == 1 ? 4 : 2; }

template <int MB>
QD_TARGET void rows_int8(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int NB = rows_at_once(MB);
  walk_rows<NB, MB == 1>(n0, n1, [&](int64_t n) { rows_int8_nb<MB, 1>(p, n, m0, 1); },
                [&](int64_t n, int64_t stride) { rows_int8_nb<MB, NB>(p, n, m0, stride); });
}

// The same four blocks' scales, one per block, in a 128-bit register: with one row of x, the
// product with x's four block scales is taken there and widened once (one permute, not two).
template <int BPG>
QD_TARGET inline __m128 block_scales4(const Problem& p, int64_t g0, int64_t b) {
  const int64_t g = g0 + b / BPG;
  if constexpr (BPG == 4) return _mm_set1_ps(to_float(p.scales, g, p.scale_type));
  __m128 s;
  if (p.scale_type == ScaleType::f32) {
    s = BPG == 1 ? _mm_loadu_ps(static_cast<const float*>(p.scales) + g)
                 : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(static_cast<const float*>(p.scales) + g)));
  } else {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p.scales) + g));
    s = p.scale_type == ScaleType::f16 ? _mm_cvtph_ps(h) : _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
  }
  return BPG == 1 ? s : _mm_unpacklo_ps(s, s);  // BPG 2: (s0, s0, s1, s1)
}

// The row's scales for one super-block of 4 blocks, one per int32 lane (4 lanes per block): the
// 128-bit ones widened: plain loads and one permute, where masked 512-bit loads were used before.
template <int BPG>
QD_TARGET inline __m512 quad_scales(const Problem& p, int64_t g0, int64_t b) {
  if constexpr (BPG == 4) return loadc<1>(p.scales, g0 + b / 4, p.scale_type);
  return widen4(block_scales4<BPG>(p, g0, b));
}

// NB weight rows n, n + stride, .. at once for MB rows of x: each load of x serves NB rows (loads,
// not the dot products, bounded the one-row version at M > 1). One accumulator per (row, x row), two
// (even and odd steps) when there are fewer than four such chains to overlap.
template <int MB, int NB, int BPG>
QD_TARGET void rows_int4_nb(const Problem& p, int64_t n, int64_t m0, int64_t stride) {
  constexpr int U = NB * MB < 4 ? 2 : 1;
  const int64_t nb = p.k / kBlock, quads = nb / 4;
  const __m512i low = _mm512_set1_epi8(15);
  const uint8_t* row[NB];
  int64_t g0[NB];
  for (int r = 0; r < NB; ++r) {
    row[r] = p.w + (n + r * stride) * p.row_bytes;
    g0[r] = (n + r * stride) * p.groups;
  }
  __m512 acc[U][NB][MB];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < NB; ++r)
      for (int m = 0; m < MB; ++m) acc[u][r][m] = _mm512_setzero_ps();
  for (int64_t j = 0; j < quads; ++j) {
    __m512i lo[NB], hi[NB];
    __m512 sw[NB];  // M > 1: the row's scales per lane, shared by the rows of x
    __m128 s4[NB];  // M = 1: per block, multiplied by x's block scales before widening
    for (int r = 0; r < NB; ++r) {
      if constexpr (MB > 1) {
        prefetch(row[r] + j * 64);
      } else {
        prefetch_far(row[r] + j * 64);
      }
      const __m512i v = _mm512_loadu_si512(row[r] + j * 64);
      lo[r] = _mm512_and_si512(v, low);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      if constexpr (MB > 1) {
        sw[r] = quad_scales<BPG>(p, g0[r], 4 * j);
      } else {
        s4[r] = block_scales4<BPG>(p, g0[r], 4 * j);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const int64_t mm = m0 + m;
      const int8_t* xq = p.a.q + mm * p.k + j * 128;
      const __m512i x0 = _mm512_loadu_si512(xq), x1 = _mm512_loadu_si512(xq + 64);
      const __m128 d4 = _mm_loadu_ps(p.a.d + mm * nb + 4 * j);
      const __m512 de = widen4(d4);  // unused (and dropped by the compiler) when MB == 1
      for (int r = 0; r < NB; ++r) {
        const __m512i i = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], x0), hi[r], x1);
        const __m512 sc = MB > 1 ? _mm512_mul_ps(de, sw[r]) : widen4(_mm_mul_ps(d4, s4[r]));
        acc[j % U][r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), sc, acc[j % U][r][m]);
      }
    }
  }
  for (int r = 0; r < NB; ++r) {
    __m256 tail[MB];
    for (int m = 0; m < MB; ++m) tail[m] = _mm256_setzero_ps();
    for (int64_t b = quads * 4; b < nb; ++b) {  // super-blocks of one: [even | odd]
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + b * 16));
      const __m128i l4 = _mm_set1_epi8(15);
      const __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), l4), _mm_and_si128(v, l4));
      const float s = to_float(p.scales, g0[r] + b / BPG, p.scale_type);
      for (int m = 0; m < MB; ++m) {
        const int64_t mm = m0 + m;
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.a.q + mm * p.k + b * 32));
        const __m256i i = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, x);
        tail[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(s * p.a.d[mm * nb + b]), tail[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const int64_t mm = m0 + m;
      __m512 t = _mm512_castps256_ps512(tail[m]);
      for (int u = 0; u < U; ++u) t = _mm512_add_ps(t, acc[u][r][m]);
      float v = hsum(t) - zero_share(p, g0[r], p.a.corr + mm * p.groups);
      if (p.bias) v += p.bias[n + r * stride];
      p.y[mm * p.n + n + r * stride] = v;
    }
  }
}

template <int MB, int BPG>
QD_TARGET void rows_int4(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int NB = rows_at_once(MB);
  walk_rows<NB, MB == 1>(n0, n1, [&](int64_t n) { rows_int4_nb<MB, 1, BPG>(p, n, m0, 1); },
                [&](int64_t n, int64_t stride) { rows_int4_nb<MB, NB, BPG>(p, n, m0, stride); });
}

template <int MB>
QD_TARGET void rows_mb(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  if (p.bits == 8) return rows_int8<MB>(p, n0, n1, m0);
  switch (p.group / kBlock) {
    case 1: return rows_int4<MB, 1>(p, n0, n1, m0);
    case 2: return rows_int4<MB, 2>(p, n0, n1, m0);
    default: return rows_int4<MB, 4>(p, n0, n1, m0);
  }
}

}  // namespace

QD_TARGET void rows_avx512(const Problem& p, int64_t n0, int64_t n1, int64_t m0, int mb) {
  if (mb >= 8) return rows_avx512_il(p, n0, n1, m0, mb);
  switch (mb) {
    case 1: return rows_mb<1>(p, n0, n1, m0);
    case 2: return rows_mb<2>(p, n0, n1, m0);
    case 3: return rows_mb<3>(p, n0, n1, m0);
    default: return rows_mb<4>(p, n0, n1, m0);
  }
}

}  // namespace fastlm::qdot
