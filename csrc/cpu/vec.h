// Eight-float AVX2 vectors for the CPU kernels: loads that widen bf16/fp16/fp32 storage to
// float, stores that round back, and a horizontal sum for reductions.
//
// Why not plain loops: a reduction written as `s += v[j]` is one dependent chain of adds, whose
// latency (4 cycles) rather than the load rate bounds it; compilers keep it that way without
// -ffast-math. Four independent accumulators run at the load rate.
// The extension is built with -mavx2 -mfma -mf16c (setup.py).
#pragma once

#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace fastlm::vec {

constexpr int kW = 8;  // floats per vector

inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load(const c10::BFloat16* p) {
  // bf16 is the top half of a float: widen to 32 bits and shift into place.
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store(c10::BFloat16* p, __m256 v) {
  // Round to nearest even, as c10::BFloat16 does. NaN lanes are quietened instead of rounded,
  // since rounding a NaN whose payload sits in the low half would carry it into infinity.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000));
  const __m256i out = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
  // Pack the low 16 bits of each 32-bit lane into 8 halfwords.
  const __m128i lo = _mm256_castsi256_si128(out), hi = _mm256_extracti128_si256(out, 1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(lo, hi));
}
inline void store(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace fastlm::vec
