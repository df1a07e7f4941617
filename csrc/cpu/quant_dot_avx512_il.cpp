// The 512-bit integer-dot kernels for rows of x taken 16 or 8 at once (M >= 8), from the
// row-interleaved x of Act::q8 (quant_dot.h): one int32 lane per row of x, 16 in a 512-bit
// register or 8 in a 256-bit one. A 4-byte broadcast of unpacked weights (4 k of one weight row)
// meets the same 4 k of every row of x in one vpdpbusd, so the block's convert and FMA serve 16
// (8) rows where rows_int4_nb / rows_int8_nb spend them per row.
//
// Weight rows are unpacked first, NB at a time, into bytes of the operand that vpdpbusd takes
// unsigned: int4 as stored (0..15; four blocks' low nibbles, then their high ones), int8 with
// the top bit flipped (w + 128); their scales and zeros widened to float. The offsets (8 or 128
// times x's block sums) come off in int32, by starting each block's sums at them.
//
// Why 16 rows: on an AMD EPYC (Zen 4, 2 vCPUs) a loop of these steps with 8 rows per 256-bit
// vpdpbusd was bound by its loads (a broadcast for every 32 products; the machine took ~0.6 ns
// per load of the broadcasts or of x): one core ~113 G products/s; 16 rows per 512-bit
// instruction, 64 products per load, ~190.
#include <immintrin.h>

#include <vector>

#include "cpu/quant_dot.h"

#define QD_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

namespace fastlm::qdot {
namespace {

// The vector of R int32 / float lanes, one per row of x.
template <int R>
struct V;

template <>
struct V<16> {
  using I = __m512i;
  using F = __m512;
  QD_TARGET static I load(const void* p) { return _mm512_loadu_si512(p); }
  QD_TARGET static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  QD_TARGET static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  QD_TARGET static F set1f(float v) { return _mm512_set1_ps(v); }
  QD_TARGET static I zero() { return _mm512_setzero_si512(); }
  QD_TARGET static F zerof() { return _mm512_setzero_ps(); }
  QD_TARGET static I dot(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  QD_TARGET static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  QD_TARGET static I neg_shl(I a, int s) { return _mm512_sub_epi32(zero(), _mm512_slli_epi32(a, s)); }
  QD_TARGET static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  QD_TARGET static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  QD_TARGET static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  QD_TARGET static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  QD_TARGET static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};

template <>
struct V<8> {
  using I = __m256i;
  using F = __m256;
  QD_TARGET static I load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  QD_TARGET static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  QD_TARGET static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  QD_TARGET static F set1f(float v) { return _mm256_set1_ps(v); }
  QD_TARGET static I zero() { return _mm256_setzero_si256(); }
  QD_TARGET static F zerof() { return _mm256_setzero_ps(); }
  QD_TARGET static I dot(I acc, I u, I s) { return _mm256_dpbusd_epi32(acc, u, s); }
  QD_TARGET static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  QD_TARGET static I neg_shl(I a, int s) { return _mm256_sub_epi32(zero(), _mm256_slli_epi32(a, s)); }
  QD_TARGET static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  QD_TARGET static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  QD_TARGET static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  QD_TARGET static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  QD_TARGET static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};

// count scales (or zeros) from i on, widened to float.
QD_TARGET void widen(const void* src, int64_t i, int64_t count, ScaleType t, float* out) {
  int64_t g = 0;
  if (t == ScaleType::f32) {
    __builtin_memcpy(out, static_cast<const float*>(src) + i, count * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(src) + i;
  for (; g + 16 <= count; g += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + g));
    const __m512 f = t == ScaleType::f16 ? _mm512_cvtph_ps(v)
                                         : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    _mm512_storeu_ps(out + g, f);
  }
  for (; g < count; ++g) out[g] = to_float(src, i + g, t);
}

// Where block b of row r of NB unpacked weight rows starts: blocks in runs of 4 per row (128
// bytes), the NB rows' runs one after another, so that the kernel walks them with one pointer.
// int8: a block's 32 bytes, so that a 64-byte store writes two blocks. int4: the run's 4 x 16 low
// nibbles, then its 4 x 16 high ones, as one load of packed weights splits into them (no
// shuffle): block b's low nibbles at block_at + (b & 3) * 16, its high ones 64 bytes on.
template <int NB>
inline int64_t block_at(int64_t b, int r) {
  return (((b >> 2) * NB + r) * 4 + (b & 3)) * 32;
}

template <int NB>
inline int64_t nibbles_at(int64_t b, int r) {
  return block_at<NB>(b & ~int64_t{3}, r) + (b & 3) * 16;
}

// Row r of NB weight rows into the unsigned bytes of the header comment (int4: as stored, 0..15;
// int8: the top bit flipped) at block_at / nibbles_at; its scales and zeros (if any) into float.
template <int BITS, int NB>
QD_TARGET void unpack_row(const Problem& p, int64_t n, int r, uint8_t* u, float* s, float* z) {
  const uint8_t* w = p.w + n * p.row_bytes;
  const int64_t nb = p.k / kBlock;
  int64_t b = 0;
  if constexpr (BITS == 8) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    for (; b + 2 <= nb; b += 2)  // blocks b, b + 1 (b even) are adjacent
      _mm512_storeu_si512(u + block_at<NB>(b, r), _mm512_xor_si512(_mm512_loadu_si512(w + b * 32), flip));
    if (b < nb) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 32));
      const __m256i f = _mm256_xor_si256(v, _mm512_castsi512_si256(flip));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + block_at<NB>(b, r)), f);
    }
  } else {
    // Four blocks a load: 128-bit lane j of lo and hi is block j's low and high nibbles.
    const __m512i low = _mm512_set1_epi8(15);
    for (; b + 4 <= nb; b += 4) {
      const __m512i v = _mm512_loadu_si512(w + b * 16);
      uint8_t* o = u + nibbles_at<NB>(b, r);
      _mm512_storeu_si512(o, _mm512_and_si512(v, low));
      _mm512_storeu_si512(o + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
    for (; b < nb; ++b) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * 16)), l4 = _mm_set1_epi8(15);
      uint8_t* o = u + nibbles_at<NB>(b, r);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_and_si128(v, l4));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 64), _mm_and_si128(_mm_srli_epi16(v, 4), l4));
    }
  }
  widen(p.scales, n * p.groups, p.groups, p.scale_type, s);
  if (p.zeros) widen(p.zeros, n * p.groups, p.groups, p.scale_type, z);
}

QD_TARGET inline int32_t word(const uint8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

// NB adjacent weight rows from n, unpacked (u: as unpack_row; s, z: groups floats a row), against
// the R rows of x from m0; Z: stored zero points (int4).
template <int BITS, int R, int NB, bool Z>
QD_TARGET void rows_il_nb(const Problem& p, int64_t n, int64_t m0, const uint8_t* u, const float* s, const float* z) {
  using v = V<R>;
  const int64_t nb = p.k / kBlock;
  const int gsh = p.group == 32 ? 0 : p.group == 64 ? 1 : p.group == 128 ? 2 : 30;  // block b in group b >> gsh
  const int8_t* xb = p.a.q8 + m0 * p.k;
  const float* dg = p.a.d8 + m0 * nb;
  const int32_t* sg = p.a.s8 + m0 * nb;
  typename v::F acc[NB];
  for (int r = 0; r < NB; ++r) acc[r] = v::zerof();
  for (int64_t b = 0; b < nb; ++b, xb += 32 * R) {
    const uint8_t* ub = u + (BITS == 8 ? block_at<NB>(b, 0) : nibbles_at<NB>(b, 0));
    const typename v::I sq = v::load(sg + b * R);
    const typename v::I off = BITS == 8 ? v::neg_shl(sq, 7) : Z ? v::zero() : v::neg_shl(sq, 3);
    // The NB rows after these, which the next unpack reads from memory: a line every 64 / (32 or
    // 16) blocks of each, so that the stream overlaps this loop (unpacking them waited on memory
    // for as long as this loop ran, one thread, 4096 x 4096 int8, M = 16). Into L1: into L2 was
    // 4-11% slower (2 threads, M = 16).
    if ((b & (BITS == 8 ? 1 : 3)) == 0) {
      for (int r = 0; r < NB; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(p.w + (n + NB + r) * p.row_bytes + b * BITS * 4), _MM_HINT_T0);
    }
    typename v::I e[NB], o[NB];  // the even and odd half-steps: two chains per row
    for (int r = 0; r < NB; ++r) {
      e[r] = off;
      o[r] = v::zero();
    }
    for (int t = 0; t < 4; ++t) {
      const typename v::I xe = v::load(xb + t * 8 * R), xo = v::load(xb + t * 8 * R + 4 * R);
      for (int r = 0; r < NB; ++r) {
        const uint8_t* we = ub + r * 128 + (BITS == 8 ? t * 8 : t * 4);
        e[r] = v::dot(e[r], v::set1(word(we)), xe);
        o[r] = v::dot(o[r], v::set1(word(we + (BITS == 8 ? 4 : 64))), xo);
      }
    }
    const typename v::F d = v::loadf(dg + b * R);
    [[maybe_unused]] const typename v::F sqf = Z ? v::cvt(sq) : v::zerof();
    const int64_t gb = b >> gsh;
    for (int r = 0; r < NB; ++r) {
      typename v::F f = v::cvt(v::add(e[r], o[r]));
      if constexpr (BITS == 8) {
        acc[r] = v::fmadd(f, d, acc[r]);  // the row's one scale at the end
      } else {
        if constexpr (Z) f = v::fnmadd(v::set1f(z[r * p.groups + gb]), sqf, f);
        acc[r] = v::fmadd(f, v::mul(d, v::set1f(s[r * p.groups + gb])), acc[r]);
      }
    }
  }
  for (int r = 0; r < NB; ++r) {
    alignas(64) float out[R];
    v::store(out, BITS == 8 ? v::mul(acc[r], v::set1f(s[r * p.groups])) : acc[r]);
    const float bias = p.bias ? p.bias[n + r] : 0.f;
    for (int m = 0; m < R && m0 + m < p.m; ++m) p.y[(m0 + m) * p.n + n + r] = out[m] + bias;  // past p.m: padding
  }
}

template <int BITS, int R, bool Z>
QD_TARGET void rows_il(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  constexpr int NB = 4;
  thread_local std::vector<uint8_t> bytes;
  thread_local std::vector<float> floats;
  const int64_t ubytes = NB * ((p.k / kBlock + 3) / 4) * 128;  // whole runs of 4 blocks (block_at)
  if (static_cast<int64_t>(bytes.size()) < ubytes) bytes.resize(ubytes);
  if (static_cast<int64_t>(floats.size()) < 2 * NB * p.groups) floats.resize(2 * NB * p.groups);
  uint8_t* u = bytes.data();
  float* s = floats.data();
  float* z = s + NB * p.groups;
  walk_rows<NB, false>(
      n0, n1,
      [&](int64_t n) {
        unpack_row<BITS, 1>(p, n, 0, u, s, z);
        rows_il_nb<BITS, R, 1, Z>(p, n, m0, u, s, z);
      },
      [&](int64_t n, int64_t) {
        for (int r = 0; r < NB; ++r) unpack_row<BITS, NB>(p, n + r, r, u, s + r * p.groups, z + r * p.groups);
        rows_il_nb<BITS, R, NB, Z>(p, n, m0, u, s, z);
      });
}

template <int R>
QD_TARGET void rows_r(const Problem& p, int64_t n0, int64_t n1, int64_t m0) {
  if (p.bits == 8) return rows_il<8, R, false>(p, n0, n1, m0);
  return p.zeros ? rows_il<4, R, true>(p, n0, n1, m0) : rows_il<4, R, false>(p, n0, n1, m0);
}

}  // namespace

QD_TARGET void rows_avx512_il(const Problem& p, int64_t n0, int64_t n1, int64_t m0, int width) {
  return width == 16 ? rows_r<16>(p, n0, n1, m0) : rows_r<8>(p, n0, n1, m0);
}

}  // namespace fastlm::qdot
