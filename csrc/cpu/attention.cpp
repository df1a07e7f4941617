// Attention on the CPU, flash style: forward, backward and KV-cache decoding without ever
// forming a Tq x Tk matrix.
//
// Layout. Scores are computed transposed, S^T (keys x queries), so that the eight lanes of an AVX2
// vector hold eight queries: the online softmax (running max, running sum, rescale) is then
// vertical vector code with no horizontal reductions, and the key operand K is read in place
// (row-major, one broadcast per element) instead of being transposed per block. The output is
// accumulated transposed too, O^T += V^T P^T, with V again read in place. Every product is one
// small GEMM, C (m x n) += sum_p A[p, m] B[p, n], where B is a packed row-major panel whose width
// n is padded to a multiple of 8 and A is any strided matrix read one broadcast at a time;
// a 6 x 16 register-blocked micro-kernel (12 accumulators) does all of them.
//
// Exponentials are base 2 (q is pre-scaled by scale * log2(e)) from a degree-7 polynomial on
// eight lanes, accurate to a few float ulps, instead of one scalar std::exp per score. bf16 and
// fp16 tiles are widened to float; float64 takes plain loops in double (it exists for gradcheck
// and references, not for speed).
//
// Work split. Forward: one task per (batch, head, query block), ordered so that consecutive tasks
// pair heavy and light causal blocks. Backward: one task per (batch, kv head[, slice of query
// blocks]): a task owns dk and dv of its kv head (accumulated in float over every query head
// of the group) and the dq of its query blocks, so no two tasks write the same output; slices
// exist only when there are too few kv heads to keep the threads busy, and their partial dk/dv
// are summed afterwards. Decoding: one task per (batch, kv head, slice of the cache) over the
// whole query group, partial (max, sum, acc) merged afterwards; a lone query (no group, one new
// token) runs along D instead of being padded to a tile of 8 queries.
// Extra memory: forward O(block^2) per thread plus lse; backward and decode O(T * D).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/pool.h"
#include "cpu/vec.h"
#include "fastlm.h"

namespace fastlm {
namespace {

constexpr int64_t kBQ = 64;  // queries per block: the n of every product
constexpr int64_t kBK = 64;  // keys per block
// Decode work (q . k multiply-adds) below which a task of decode attention stays on the calling
// thread; it runs on fastlm's pool (cpu/pool.h), not OpenMP, whose workers spin on into the next
// matmuls. Waking a sleeping helper costs the caller tens of microseconds on a VM, about this
// much work; an awake one (the fused decode block keeps it so between its matmuls) costs nothing.
constexpr int64_t kInlineWork = 1 << 19;
constexpr int64_t kInlineWorkAwake = 1 << 15;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

inline int64_t round8(int64_t x) { return (x + 7) / 8 * 8; }

// 2^x for x <= 128; exact 0 below -126 (and for -inf). Degree-7 Taylor series of e^(f ln 2) on
// f in [-1/2, 1/2]: truncation error 5e-9, below float rounding.
inline __m256 exp2_ps(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(_mm256_set1_ps(-126.f), x), _mm256_set1_ps(128.f));
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(xc, n), _mm256_set1_ps(kLn2));
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_LT_OQ), r);
}

// C[m, 0:8*NV] (+)= sum_p A[p * sap + m * sam] * B[p * ldb + 0:8*NV] for MR rows m.
template <int MR, int NV, bool ACC>
inline void ukernel(int64_t kp, const float* a, int64_t sam, int64_t sap, const float* b, int64_t ldb, float* c,
                    int64_t ldc) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? _mm256_loadu_ps(c + r * ldc + v * 8) : _mm256_setzero_ps();
  for (int64_t p = 0; p < kp; ++p) {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + p * ldb + v * 8);
    const float* ap = a + p * sap;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(ap + r * sam);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + r * ldc + v * 8, acc[r][v]);
}

template <int NV, bool ACC>
void gemm_panel(int64_t m, int64_t kp, const float* a, int64_t sam, int64_t sap, const float* b, int64_t ldb, float* c,
                int64_t ldc) {
  int64_t m0 = 0;
  for (; m0 + 6 <= m; m0 += 6) ukernel<6, NV, ACC>(kp, a + m0 * sam, sam, sap, b, ldb, c + m0 * ldc, ldc);
  a += m0 * sam;
  c += m0 * ldc;
  switch (m - m0) {
    case 5: ukernel<5, NV, ACC>(kp, a, sam, sap, b, ldb, c, ldc); break;
    case 4: ukernel<4, NV, ACC>(kp, a, sam, sap, b, ldb, c, ldc); break;
    case 3: ukernel<3, NV, ACC>(kp, a, sam, sap, b, ldb, c, ldc); break;
    case 2: ukernel<2, NV, ACC>(kp, a, sam, sap, b, ldb, c, ldc); break;
    case 1: ukernel<1, NV, ACC>(kp, a, sam, sap, b, ldb, c, ldc); break;
    default: break;
  }
}

// C (m x n, row stride ldc) (+)= A^T B with A[p, i] at a[p * sap + i * sam], B (kp x n) row-major
// with row stride ldb; n is a multiple of 8.
template <bool ACC>
void gemm(int64_t m, int64_t n, int64_t kp, const float* a, int64_t sam, int64_t sap, const float* b, int64_t ldb,
          float* c, int64_t ldc) {
  int64_t n0 = 0;
  for (; n0 + 16 <= n; n0 += 16) gemm_panel<2, ACC>(m, kp, a, sam, sap, b + n0, ldb, c + n0, ldc);
  if (n0 < n) gemm_panel<1, ACC>(m, kp, a, sam, sap, b + n0, ldb, c + n0, ldc);
}

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

// Widen rows [0, rows) of a row-major (rows x d) matrix into dst with row stride ld, zero-padding
// columns d..ld.
template <typename T>
void pack_rows(const T* src, int64_t rows, int64_t d, float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * d;
    float* o = dst + r * ld;
    int64_t j = 0;
    for (; j + vec::kW <= d; j += vec::kW) vec::store(o + j, vec::load(s + j));
    for (; j < d; ++j) o[j] = to_f(s[j]);
    for (; j < ld; ++j) o[j] = 0.f;
  }
}

// dst (d x np) = mul * rows^T, where row i (i < n) starts at rows[i]; columns n..np are zero.
template <typename T>
void pack_transposed(const T* const* rows, int64_t n, int64_t np, int64_t d, float mul, float* dst) {
  for (int64_t k = 0; k < d; ++k) std::fill(dst + k * np + n, dst + (k + 1) * np, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const T* r = rows[i];
    for (int64_t k = 0; k < d; ++k) dst[k * np + i] = to_f(r[k]) * mul;
  }
}

struct MaskView {
  const float* p = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  const float* row(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * si; }
};

// The queries of one block, as the products see them.
struct QueryTile {
  int64_t n = 0, np = 0;       // queries, and n padded to a multiple of 8
  const float* qt = nullptr;   // (D x np) q^T * scale * log2(e)
  const float* lim = nullptr;  // (np) last key each query may see (as float)
  float lim_min = 0, lim_max = 0;
  const float* mask = nullptr;  // additive mask row of query 0, or null
  int64_t msi = 0, msj = 0;     // mask strides between queries and between keys
};

// Adds the mask (in log2 units) and masks keys past each query's limit in S^T rows for keys
// [kb, kb + nk).
inline void mask_scores(const QueryTile& t, int64_t kb, int64_t nk, float* st) {
  const int64_t np = t.np;
  if (t.mask) {
    for (int64_t j = 0; j < nk; ++j) {
      const float* mj = t.mask + (kb + j) * t.msj;
      float* s = st + j * np;
      for (int64_t i = 0; i < t.n; ++i) s[i] += mj[i * t.msi] * kLog2e;
    }
  }
  if (static_cast<float>(kb + nk - 1) > t.lim_min) {
    const __m256 ninf = _mm256_set1_ps(-kInf);
    for (int64_t j = 0; j < nk; ++j) {
      const __m256 key = _mm256_set1_ps(static_cast<float>(kb + j));
      float* s = st + j * np;
      for (int64_t i = 0; i < np; i += 8) {
        const __m256 out = _mm256_cmp_ps(key, _mm256_loadu_ps(t.lim + i), _CMP_GT_OQ);
        _mm256_storeu_ps(s + i, _mm256_blendv_ps(_mm256_loadu_ps(s + i), ninf, out));
      }
    }
  }
}

// Per-thread buffers of the forward pass.
struct FwdScratch {
  std::vector<float> st, kbuf, vbuf;
  FwdScratch(int64_t d) : st(kBK * kBQ), kbuf(kBK * d), vbuf(kBK * d) {}  // d = 0: st only (decoding)
};

// Online softmax over keys [k0, k1) for one query tile: updates the running max m (log2 units),
// sum l and unnormalised accumulator ot (D x np) in place.
template <typename T>
void attend_keys(const QueryTile& t, const T* k, const T* v, int64_t d, int64_t k0, int64_t k1, FwdScratch& sc,
                 float* ot, float* m, float* l) {
  const int64_t np = t.np;
  k1 = std::min<int64_t>(k1, static_cast<int64_t>(t.lim_max) + 1);
  float* st = sc.st.data();
  for (int64_t kb = k0; kb < k1; kb += kBK) {
    const int64_t nk = std::min(kBK, k1 - kb);
    const float *kp, *vp;
    if constexpr (std::is_same_v<T, float>) {
      kp = k + kb * d;
      vp = v + kb * d;
    } else {
      pack_rows(k + kb * d, nk, d, sc.kbuf.data(), d);
      pack_rows(v + kb * d, nk, d, sc.vbuf.data(), d);
      kp = sc.kbuf.data();
      vp = sc.vbuf.data();
    }
    gemm<false>(nk, np, d, kp, d, 1, t.qt, np, st, np);
    mask_scores(t, kb, nk, st);
    for (int64_t i = 0; i < np; i += 8) {
      __m256 mx = _mm256_loadu_ps(m + i);
      const __m256 m_old = mx;
      for (int64_t j = 0; j < nk; ++j) mx = _mm256_max_ps(mx, _mm256_loadu_ps(st + j * np + i));
      // A query with every key so far masked keeps max -inf; 0 stands in for it so that no
      // inf - inf appears, and its probabilities stay exactly 0.
      const __m256 ref = _mm256_blendv_ps(mx, _mm256_setzero_ps(), _mm256_cmp_ps(mx, _mm256_set1_ps(-kInf), _CMP_EQ_OQ));
      const __m256 alpha = exp2_ps(_mm256_sub_ps(m_old, ref));
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < nk; ++j) {
        const __m256 p = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(st + j * np + i), ref));
        _mm256_storeu_ps(st + j * np + i, p);
        sum = _mm256_add_ps(sum, p);
      }
      _mm256_storeu_ps(m + i, mx);
      _mm256_storeu_ps(l + i, _mm256_fmadd_ps(_mm256_loadu_ps(l + i), alpha, sum));
      for (int64_t c = 0; c < d; ++c) _mm256_storeu_ps(ot + c * np + i, _mm256_mul_ps(_mm256_loadu_ps(ot + c * np + i), alpha));
    }
    gemm<true>(d, np, nk, vp, 1, d, st, np, ot, np);
  }
}

template <typename T>
void fwd_fast(const T* q, const T* k, const T* v, const MaskView& mask, T* out, float* lse, int64_t B, int64_t Hq,
              int64_t Hk, int64_t Tq, int64_t Tk, int64_t D, bool causal, double scale) {
  const int64_t G = Hq / Hk, nqb = (Tq + kBQ - 1) / kBQ;
  const float qmul = static_cast<float>(scale) * kLog2e;
  at::parallel_for(0, B * Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    FwdScratch sc(D);
    std::vector<float> qt(D * kBQ), ot(D * kBQ), lim(kBQ), m(kBQ), l(kBQ);
    std::vector<const T*> rows(kBQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, r = task % nqb;
      const int64_t qb = r % 2 == 0 ? r / 2 : nqb - 1 - r / 2;  // 0, n-1, 1, n-2, ...
      const int64_t b = bh / Hq, h = bh % Hq, i0 = qb * kBQ;
      QueryTile t;
      t.n = std::min(kBQ, Tq - i0);
      t.np = round8(t.n);
      for (int64_t i = 0; i < t.n; ++i) rows[i] = q + (bh * Tq + i0 + i) * D;
      pack_transposed(rows.data(), t.n, t.np, D, qmul, qt.data());
      t.qt = qt.data();
      for (int64_t i = 0; i < t.np; ++i) lim[i] = static_cast<float>(causal ? std::min(i0 + i, Tk - 1) : Tk - 1);
      t.lim = lim.data();
      t.lim_min = lim[0];
      t.lim_max = lim[t.n - 1];
      if (mask.p) {
        t.mask = mask.row(b, h, i0);
        t.msi = mask.si;
        t.msj = mask.sj;
      }
      std::fill(m.begin(), m.end(), -kInf);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(ot.begin(), ot.begin() + D * t.np, 0.f);
      const int64_t kv = (b * Hk + h / G) * Tk * D;
      attend_keys(t, k + kv, v + kv, D, 0, Tk, sc, ot.data(), m.data(), l.data());
      for (int64_t i = 0; i < t.n; ++i) {
        T* o = out + (bh * Tq + i0 + i) * D;
        const bool empty = l[i] == 0.f;
        const float inv = empty ? 0.f : 1.f / l[i];
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(ot[c * t.np + i] * inv);
        lse[bh * Tq + i0 + i] = empty ? -kInf : (m[i] + std::log2(l[i])) * kLn2;
      }
    }
  });
}

// Backward for float, bf16 and fp16. Task (b, kv head, slice s of the group's query blocks).
template <typename T>
void bwd_fast(const T* dout, const T* q, const T* k, const T* v, const T* out, const float* lse, const MaskView& mask,
              T* dq, T* dk, T* dv, float* part, int64_t S, int64_t B, int64_t Hq, int64_t Hk, int64_t Tq, int64_t Tk,
              int64_t D, bool causal, double scale) {
  const int64_t G = Hq / Hk, nqb = (Tq + kBQ - 1) / kBQ, Dp = round8(D);
  const float qmul = static_cast<float>(scale) * kLog2e, fscale = static_cast<float>(scale);
  at::parallel_for(0, B * Hk * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf(Tk * Dp), vf(Tk * Dp), dkv_local(S == 1 ? 2 * Tk * Dp : 0);
    std::vector<float> qt(D * kBQ), dot(D * kBQ), qr(kBQ * Dp), dor(kBQ * Dp), dqf(kBQ * Dp);
    std::vector<float> st(kBK * kBQ), dpt(kBK * kBQ), lim(kBQ), lse2(kBQ), delta(kBQ);
    std::vector<const T*> rows(kBQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bk = task / S, s = task % S, b = bk / Hk, hk = bk % Hk;
      pack_rows(k + bk * Tk * D, Tk, D, kf.data(), Dp);
      pack_rows(v + bk * Tk * D, Tk, D, vf.data(), Dp);
      // dk then dv of this task, in float: a slice's partial sums go straight to part.
      float* dkf = S == 1 ? dkv_local.data() : part + task * 2 * Tk * Dp;
      float* dvf = dkf + Tk * Dp;
      std::fill(dkf, dkf + 2 * Tk * Dp, 0.f);
      // Items (g, qb) of this slice, taken round robin so that causal costs even out.
      for (int64_t item = s; item < G * nqb; item += S) {
        const int64_t g = item / nqb, qb = item % nqb, h = hk * G + g, bh = b * Hq + h, i0 = qb * kBQ;
        QueryTile t;
        t.n = std::min(kBQ, Tq - i0);
        t.np = round8(t.n);
        const int64_t n = t.n, np = t.np;
        for (int64_t i = 0; i < n; ++i) rows[i] = q + (bh * Tq + i0 + i) * D;
        pack_transposed(rows.data(), n, np, D, qmul, qt.data());
        pack_rows(rows[0], n, D, qr.data(), Dp);
        for (int64_t i = 0; i < n; ++i) rows[i] = dout + (bh * Tq + i0 + i) * D;
        pack_transposed(rows.data(), n, np, D, 1.f, dot.data());
        pack_rows(rows[0], n, D, dor.data(), Dp);
        for (int64_t i = 0; i < np; ++i) {
          lim[i] = static_cast<float>(causal ? std::min(i0 + i, Tk - 1) : Tk - 1);
          // Rows with every key masked (lse = -inf) and padding rows get probability exactly 0.
          const float ls = i < n ? lse[bh * Tq + i0 + i] : -kInf;
          lse2[i] = ls == -kInf ? kInf : ls * kLog2e;
          // The same chain of fused multiply-adds as the dP product: where out equals one value
          // row (a query that sees a single key), dP - delta is then exactly 0 and so is dq.
          float dl = 0.f;
          if (i < n) {
            const T* o = out + (bh * Tq + i0 + i) * D;
            const float* dr = dor.data() + i * Dp;
            for (int64_t c = 0; c < D; ++c) dl = std::fma(dr[c], to_f(o[c]), dl);
          }
          delta[i] = dl;
        }
        t.qt = qt.data();
        t.lim = lim.data();
        t.lim_min = lim[0];
        t.lim_max = lim[n - 1];
        if (mask.p) {
          t.mask = mask.row(b, h, i0);
          t.msi = mask.si;
          t.msj = mask.sj;
        }
        std::fill(dqf.begin(), dqf.end(), 0.f);
        const int64_t kend = std::min<int64_t>(Tk, static_cast<int64_t>(t.lim_max) + 1);
        for (int64_t kb = 0; kb < kend; kb += kBK) {
          const int64_t nk = std::min(kBK, kend - kb);
          gemm<false>(nk, np, D, kf.data() + kb * Dp, Dp, 1, qt.data(), np, st.data(), np);
          mask_scores(t, kb, nk, st.data());
          gemm<false>(nk, np, D, vf.data() + kb * Dp, Dp, 1, dot.data(), np, dpt.data(), np);
          const __m256 vscale = _mm256_set1_ps(fscale);
          for (int64_t j = 0; j < nk; ++j) {
            float* sp = st.data() + j * np;
            float* dp = dpt.data() + j * np;
            for (int64_t i = 0; i < np; i += 8) {
              const __m256 p = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(sp + i), _mm256_loadu_ps(lse2.data() + i)));
              _mm256_storeu_ps(sp + i, p);
              const __m256 ds = _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + i), _mm256_loadu_ps(delta.data() + i)));
              _mm256_storeu_ps(dp + i, _mm256_mul_ps(ds, vscale));
            }
          }
          gemm<true>(nk, Dp, n, st.data(), np, 1, dor.data(), Dp, dvf + kb * Dp, Dp);
          gemm<true>(nk, Dp, n, dpt.data(), np, 1, qr.data(), Dp, dkf + kb * Dp, Dp);
          gemm<true>(n, Dp, nk, dpt.data(), 1, np, kf.data() + kb * Dp, Dp, dqf.data(), Dp);
        }
        for (int64_t i = 0; i < n; ++i) {
          T* o = dq + (bh * Tq + i0 + i) * D;
          const float* src = dqf.data() + i * Dp;
          for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(src[c]);
        }
      }
      if (S == 1) {
        for (int64_t j = 0; j < Tk; ++j) {
          for (int64_t c = 0; c < D; ++c) {
            dk[(bk * Tk + j) * D + c] = static_cast<T>(dkf[j * Dp + c]);
            dv[(bk * Tk + j) * D + c] = static_cast<T>(dvf[j * Dp + c]);
          }
        }
      }
    }
  });
  if (S == 1) return;
  // Sum the slices' partial dk and dv in slice order.
  at::parallel_for(0, B * Hk * Tk, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bk = row / Tk, j = row % Tk;
      for (int64_t c = 0; c < D; ++c) {
        float sk = 0.f, sv = 0.f;
        for (int64_t s = 0; s < S; ++s) {
          const float* pk = part + (bk * S + s) * 2 * Tk * Dp;
          sk += pk[j * Dp + c];
          sv += pk[Tk * Dp + j * Dp + c];
        }
        dk[row * D + c] = static_cast<T>(sk);
        dv[row * D + c] = static_cast<T>(sv);
      }
    }
  });
}

// Sums of eight vectors, one per lane: lane r of the result is the sum of a[r]'s lanes.
inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  // u0 = [a0..a3 over lanes 0-3 | a0..a3 over lanes 4-7], u1 the same for a4..a7.
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Sums of n <= 16 vectors, one per entry of out.
inline void hsums(const __m256* a, int n, float* out) {
  for (int i = 0; i < n; i += 8) {
    __m256 v[8];
    for (int r = 0; r < 8; ++r) v[r] = i + r < n ? a[i + r] : _mm256_setzero_ps();
    alignas(32) float s[8];
    _mm256_store_ps(s, hsum8(v));
    for (int r = 0; r < 8 && i + r < n; ++r) out[i + r] = s[r];
  }
}

// For each of G queries g: o_g[0, 8 NV) = o_g * alpha_g + sum over j < nk of p_g[j] * v[j, 0, 8 NV)
// (o_g at o + g * d, p_g at p + g * kBK, v's row stride d), with the outputs in registers for the
// whole pass (accumulating through memory instead chains every key's FMA behind the previous
// key's store) and each load of v serving the G queries.
template <int G, int NV, typename T>
inline void accumulate_v(const float* p, const T* v, int64_t d, int64_t nk, const float* alpha, float* o) {
  __m256 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < NV; ++i) acc[g][i] = _mm256_mul_ps(_mm256_loadu_ps(o + g * d + i * vec::kW), _mm256_set1_ps(alpha[g]));
  for (int64_t j = 0; j < nk; ++j) {
    __m256 vj[NV];
    for (int i = 0; i < NV; ++i) vj[i] = vec::load(v + j * d + i * vec::kW);
    for (int g = 0; g < G; ++g) {
      const __m256 pj = _mm256_set1_ps(p[g * kBK + j]);
      for (int i = 0; i < NV; ++i) acc[g][i] = _mm256_fmadd_ps(pj, vj[i], acc[g][i]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(o + g * d + i * vec::kW, acc[g][i]);
}

// G queries that share their keys (a group of grouped-query attention, or G = 1: a head of its
// own), one new token each, against keys [k0, k1), all visible: the decoding path. The tile path
// would pad the G queries to a vector of 8 and do 8 / G times the arithmetic; here vectors run
// along D instead, KR keys at a time, one vector accumulator per (query, key) pair, reduced
// together, so that each load of a key serves the G queries. qs: G rows of d floats, q * scale *
// log2(e); o: G rows of d, unnormalised; m, l: the running max and sum of each; sbuf: G x kBK.
template <int G, typename T>
void attend_group(const float* qs, const T* k, const T* v, int64_t d, int64_t k0, int64_t k1, float* sbuf, float* o,
                  float* m, float* l) {
  // Keys at a time: G q vectors, a key's and G x KR accumulators within AVX2's 16 registers.
  constexpr int KR = G == 1 ? 8 : G == 2 ? 6 : G == 3 ? 4 : 2;
  const int64_t dv = d / vec::kW * vec::kW;
  for (int64_t kb = k0; kb < k1; kb += kBK) {
    const int64_t nk = std::min(kBK, k1 - kb);
    const T* kbase = k + kb * d;
    for (int64_t j = 0; j < nk; j += KR) {
      const int64_t nj = std::min<int64_t>(KR, nk - j);
      // Streamed once from memory: ask for rows well ahead of use. (A prefetch past the end of
      // the cache is harmless: it never faults.)
      for (int64_t r = 0; r < nj; ++r) {
        const uintptr_t ahead = (j + r + 16) * d * sizeof(T);
        const uintptr_t ka = reinterpret_cast<uintptr_t>(kbase) + ahead;
        const uintptr_t va = reinterpret_cast<uintptr_t>(v + kb * d) + ahead;
        for (uintptr_t c = 0; c < d * sizeof(T); c += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(ka + c), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(va + c), _MM_HINT_T0);
        }
      }
      __m256 acc[G * KR];
      for (int i = 0; i < G * KR; ++i) acc[i] = _mm256_setzero_ps();
      // Keys past nk repeat key j: their scores are computed and dropped.
      const T* kr[KR];
      for (int r = 0; r < KR; ++r) kr[r] = kbase + (j + (r < nj ? r : 0)) * d;
      for (int64_t c = 0; c < dv; c += vec::kW) {
        __m256 qv[G];
        for (int g = 0; g < G; ++g) qv[g] = _mm256_loadu_ps(qs + g * d + c);
        for (int r = 0; r < KR; ++r) {
          const __m256 kv = vec::load(kr[r] + c);
          for (int g = 0; g < G; ++g) acc[g * KR + r] = _mm256_fmadd_ps(qv[g], kv, acc[g * KR + r]);
        }
      }
      float sc[G * KR];
      hsums(acc, G * KR, sc);
      for (int g = 0; g < G; ++g) {
        for (int64_t r = 0; r < nj; ++r) {
          float sj = sc[g * KR + r];
          for (int64_t c = dv; c < d; ++c) sj += qs[g * d + c] * to_f(kr[r][c]);
          sbuf[g * kBK + j + r] = sj;
        }
      }
    }
    const int64_t nkp = round8(nk);
    float alpha[G];
    for (int g = 0; g < G; ++g) {
      float* sg = sbuf + g * kBK;
      float mx = m[g];
      for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, sg[j]);
      for (int64_t j = nk; j < nkp; ++j) sg[j] = -kInf;
      const float ref = mx == -kInf ? 0.f : mx;
      alpha[g] = std::exp2(m[g] - ref);
      __m256 sum = _mm256_setzero_ps();
      const __m256 vref = _mm256_set1_ps(ref);
      for (int64_t j = 0; j < nkp; j += 8) {
        const __m256 pj = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(sg + j), vref));
        _mm256_storeu_ps(sg + j, pj);
        sum = _mm256_add_ps(sum, pj);
      }
      m[g] = mx;
      l[g] = l[g] * alpha[g] + vec::hsum(sum);
    }
    const T* vb = v + kb * d;
    // As many vectors of D at once as keep G x NV accumulators within 12 (8 for one query).
    constexpr int NV = G == 1 ? 8 : G == 2 ? 4 : G == 3 ? 4 : 2;
    int64_t c = 0;
    for (; c + NV * vec::kW <= dv; c += NV * vec::kW) accumulate_v<G, NV>(sbuf, vb + c, d, nk, alpha, o + c);
    for (; c + vec::kW <= dv; c += vec::kW) accumulate_v<G, 1>(sbuf, vb + c, d, nk, alpha, o + c);
    for (; c < d; ++c) {
      for (int g = 0; g < G; ++g) {
        float acc = o[g * d + c] * alpha[g];
        for (int64_t j = 0; j < nk; ++j) acc += sbuf[g * kBK + j] * to_f(vb[j * d + c]);
        o[g * d + c] = acc;
      }
    }
  }
}

// attend_group for any g <= kMaxGroup queries.
constexpr int64_t kMaxGroup = 4;
template <typename T>
void attend_queries(int64_t g, const float* qs, const T* k, const T* v, int64_t d, int64_t k0, int64_t k1,
                    float* sbuf, float* o, float* m, float* l) {
  switch (g) {
    case 1: return attend_group<1>(qs, k, v, d, k0, k1, sbuf, o, m, l);
    case 2: return attend_group<2>(qs, k, v, d, k0, k1, sbuf, o, m, l);
    case 3: return attend_group<3>(qs, k, v, d, k0, k1, sbuf, o, m, l);
    default: return attend_group<4>(qs, k, v, d, k0, k1, sbuf, o, m, l);
  }
}

// Decoding: task (b, kv head, slice s of the cache) attends every query of the group to the
// slice's keys and leaves a partial (max, sum, unnormalised output) per query in part; the
// partials are merged afterwards. With one slice (S = 1) each task writes its output itself.
template <typename T>
void decode_fast(const T* q, const T* kc, const T* vc, const int64_t* lens, const int32_t* starts, int64_t longest,
                 T* out, float* part, int64_t S, int64_t B, int64_t Hq, int64_t Hk, int64_t Tn, int64_t Tmax, int64_t D,
                 double scale) {
  const int64_t G = Hq / Hk, nq = G * Tn, W = D + 2;
  const float qmul = static_cast<float>(scale) * kLog2e;
  // A short cache is a few microseconds of work per task: run such tasks on this thread.
  const int64_t task_work = nq * ((longest + S - 1) / S) * D;  // multiply-adds of q . k per task
  const int64_t inline_work = pool::helpers_awake() ? kInlineWorkAwake : kInlineWork;
  const int64_t grain = std::max<int64_t>(1, inline_work / std::max<int64_t>(1, task_work));
  pool::parallel_for(B * Hk * S, grain, [&](int64_t begin, int64_t end) {
    // One new token needs a few KiB; the tile path its blocks (zeroing those every call showed at
    // decode sizes).
    const int64_t nqs = Tn == 1 ? kMaxGroup : kBQ;
    FwdScratch sc(Tn == 1 ? 0 : D);
    std::vector<float> qt(D * nqs), ot(D * nqs), lim(nqs), m(nqs), l(nqs);
    std::vector<const T*> rows(nqs);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bk = task / S, s = task % S, b = bk / Hk, hk = bk % Hk;
      // Keys [start, len): start > 0 where a sequence's first positions are padding (Tn == 1 only).
      const int64_t len = lens[b], start = starts ? starts[b] : 0;
      const int64_t chunk = ((len - start + S - 1) / S + kBK - 1) / kBK * kBK;
      const int64_t k0 = std::min(len, start + s * chunk), k1 = std::min(len, k0 + chunk);
      if (Tn == 1) {  // one new token: the group's queries by attend_group, up to kMaxGroup at once
        for (int64_t g0 = 0; g0 < G; g0 += kMaxGroup) {
          const int64_t gs = std::min(kMaxGroup, G - g0);
          const T* qr = q + (b * Hq + hk * G + g0) * D;
          for (int64_t c = 0; c < gs * D; ++c) qt[c] = to_f(qr[c]) * qmul;
          std::fill(m.begin(), m.begin() + gs, -kInf);
          std::fill(l.begin(), l.begin() + gs, 0.f);
          std::fill(ot.begin(), ot.begin() + gs * D, 0.f);
          attend_queries(gs, qt.data(), kc + bk * Tmax * D, vc + bk * Tmax * D, D, k0, k1, sc.st.data(), ot.data(),
                         m.data(), l.data());
          for (int64_t i = 0; i < gs; ++i) {
            const float* oi = ot.data() + i * D;
            if (S == 1) {  // the whole cache in one task: normalise here, nothing to merge
              T* o = out + (b * Hq + hk * G + g0 + i) * D;
              const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
              for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(oi[c] * inv);
              continue;
            }
            float* p = part + ((bk * nq + g0 + i) * S + s) * W;
            p[0] = m[i];
            p[1] = l[i];
            std::copy(oi, oi + D, p + 2);
          }
        }
        continue;
      }
      for (int64_t c0 = 0; c0 < nq; c0 += kBQ) {
        QueryTile t;
        t.n = std::min(kBQ, nq - c0);
        t.np = round8(t.n);
        t.lim_min = kInf;
        t.lim_max = -kInf;
        for (int64_t i = 0; i < t.np; ++i) {
          const int64_t x = std::min(c0 + i, nq - 1), g = x / Tn, tn = x % Tn;
          if (i < t.n) rows[i] = q + ((b * Hq + hk * G + g) * Tn + tn) * D;
          lim[i] = static_cast<float>(len - Tn + tn);
          t.lim_min = std::min(t.lim_min, lim[i]);
          t.lim_max = std::max(t.lim_max, lim[i]);
        }
        pack_transposed(rows.data(), t.n, t.np, D, qmul, qt.data());
        t.qt = qt.data();
        t.lim = lim.data();
        std::fill(m.begin(), m.end(), -kInf);
        std::fill(l.begin(), l.end(), 0.f);
        std::fill(ot.begin(), ot.begin() + D * t.np, 0.f);
        const int64_t kv = bk * Tmax * D;
        attend_keys(t, kc + kv, vc + kv, D, k0, k1, sc, ot.data(), m.data(), l.data());
        for (int64_t i = 0; i < t.n; ++i) {
          if (S == 1) {
            const int64_t x = c0 + i, g = x / Tn, tn = x % Tn;
            T* o = out + ((b * Hq + hk * G + g) * Tn + tn) * D;
            const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
            for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(ot[c * t.np + i] * inv);
            continue;
          }
          float* p = part + ((bk * nq + c0 + i) * S + s) * W;
          p[0] = m[i];
          p[1] = l[i];
          for (int64_t c = 0; c < D; ++c) p[2 + c] = ot[c * t.np + i];
        }
      }
    }
  });
  if (S == 1) return;
  pool::parallel_for(B * Hk * nq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t x = begin; x < end; ++x) {
      const int64_t bk = x / nq, b = bk / Hk, hk = bk % Hk, g = (x % nq) / Tn, tn = x % Tn;
      const float* p = part + x * S * W;
      float mx = -kInf;
      for (int64_t s = 0; s < S; ++s) mx = std::max(mx, p[s * W]);
      float lsum = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < S; ++s) {
        if (p[s * W + 1] == 0.f) continue;
        const float w = std::exp2(p[s * W] - mx);
        lsum += w * p[s * W + 1];
        for (int64_t c = 0; c < D; ++c) acc[c] += w * p[s * W + 2 + c];
      }
      T* o = out + ((b * Hq + hk * G + g) * Tn + tn) * D;
      const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
      for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(acc[c] * inv);
    }
  });
}
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, Hq, Tq, D), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D (B, Hk, Tk, D), got ", k.dim(), "-D");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), op, ": k has batch ", k.size(0), " but q has ", q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), op, ": k has head dim ", k.size(3), " but q has ", q.size(3));
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": q's ", q.size(1),
              " heads must be a multiple of k's ", k.size(1));
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": q, k and v must be CPU tensors");
    TORCH_CHECK(t->is_contiguous(), op, ": q, k and v must be contiguous");
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype");
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": q must be float32, float64, bfloat16 or float16, got ", st);
}

MaskView mask_view(const char* op, const OptTensor& mask, int64_t B, int64_t H, int64_t Tq, int64_t Tk) {
  MaskView m;
  if (!mask.has_value() || !mask->defined()) return m;
  const at::Tensor& t = *mask;
  TORCH_CHECK(t.device().is_cpu(), op, ": mask must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": mask must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == H && t.size(2) == Tq && t.size(3) == Tk, op,
              ": mask must have shape (", B, ", ", H, ", ", Tq, ", ", Tk, "), got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 0 || t.stride(3) == 1, op, ": mask's last stride must be 0 or 1, got ", t.stride(3));
  m.p = t.data_ptr<float>();
  m.sb = t.stride(0); m.sh = t.stride(1); m.si = t.stride(2); m.sj = t.stride(3);
  return m;
}

// float64: one query row at a time with an online softmax, all in double.
template <typename T>
void fwd_f64(const T* q, const T* k, const T* v, MaskView mask, T* out, double* lse,
             int64_t B, int64_t Hq, int64_t Hk, int64_t Tq, int64_t Tk, int64_t D, bool causal, double scale) {
  using A = double;
  const int64_t G = Hq / Hk;
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      const T* kb = k + (b * Hk + h / G) * Tk * D;
      const T* vb = v + (b * Hk + h / G) * Tk * D;
      for (int64_t i = 0; i < Tq; ++i) {
        const T* qr = q + (bh * Tq + i) * D;
        const float* mr = mask.p ? mask.row(b, h, i) : nullptr;
        const int64_t jend = causal ? std::min(Tk, i + 1) : Tk;
        A mx = -std::numeric_limits<A>::infinity(), sum = 0;
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t j = 0; j < jend; ++j) {
          A s = 0;
          for (int64_t d = 0; d < D; ++d) s += static_cast<A>(qr[d]) * static_cast<A>(kb[j * D + d]);
          s = s * static_cast<A>(scale) + (mr ? static_cast<A>(mr[j * mask.sj]) : A(0));
          if (s == -std::numeric_limits<A>::infinity()) continue;
          if (s > mx) {
            const A c = std::exp(mx - s);
            sum *= c;
            for (int64_t d = 0; d < D; ++d) acc[d] *= c;
            mx = s;
          }
          const A p = std::exp(s - mx);
          sum += p;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<A>(vb[j * D + d]);
        }
        T* orow = out + (bh * Tq + i) * D;
        if (sum == 0) {
          for (int64_t d = 0; d < D; ++d) orow[d] = T(0);
          lse[bh * Tq + i] = -std::numeric_limits<A>::infinity();
        } else {
          for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[d] / sum);
          lse[bh * Tq + i] = mx + std::log(sum);
        }
      }
    }
  });
}

// float64 gradients, one task per (batch, kv head) holding its dk and dv in double.
template <typename T>
void bwd_f64(const T* dout, const T* q, const T* k, const T* v, const T* out, const double* lse,
             MaskView mask, T* dq, T* dk, T* dv, int64_t B, int64_t Hq, int64_t Hk, int64_t Tq, int64_t Tk,
             int64_t D, bool causal, double scale) {
  using A = double;
  const int64_t G = Hq / Hk;
  at::parallel_for(0, B * Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> dka(Tk * D), dva(Tk * D), dqa(D);
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / Hk;
      const T* kb = k + bk * Tk * D;
      const T* vb = v + bk * Tk * D;
      std::fill(dka.begin(), dka.end(), A(0));
      std::fill(dva.begin(), dva.end(), A(0));
      for (int64_t h = (bk % Hk) * G; h < (bk % Hk + 1) * G; ++h) {
        const int64_t bh = b * Hq + h;
        for (int64_t i = 0; i < Tq; ++i) {
          const int64_t r = bh * Tq + i;
          const T* qr = q + r * D;
          const T* dor = dout + r * D;
          const T* orow = out + r * D;
          T* dqr = dq + r * D;
          std::fill(dqa.begin(), dqa.end(), A(0));
          const A l = lse[r];
          if (l != -std::numeric_limits<A>::infinity()) {
            const float* mr = mask.p ? mask.row(b, h, i) : nullptr;
            A delta = 0;
            for (int64_t d = 0; d < D; ++d) delta += static_cast<A>(dor[d]) * static_cast<A>(orow[d]);
            const int64_t jend = causal ? std::min(Tk, i + 1) : Tk;
            for (int64_t j = 0; j < jend; ++j) {
              A s = 0, dp = 0;
              for (int64_t d = 0; d < D; ++d) {
                s += static_cast<A>(qr[d]) * static_cast<A>(kb[j * D + d]);
                dp += static_cast<A>(dor[d]) * static_cast<A>(vb[j * D + d]);
              }
              s = s * static_cast<A>(scale) + (mr ? static_cast<A>(mr[j * mask.sj]) : A(0));
              const A p = std::exp(s - l);
              const A ds = p * (dp - delta) * static_cast<A>(scale);
              for (int64_t d = 0; d < D; ++d) {
                dqa[d] += ds * static_cast<A>(kb[j * D + d]);
                dka[j * D + d] += ds * static_cast<A>(qr[d]);
                dva[j * D + d] += p * static_cast<A>(dor[d]);
              }
            }
          }
          for (int64_t d = 0; d < D; ++d) dqr[d] = static_cast<T>(dqa[d]);
        }
      }
      for (int64_t x = 0; x < Tk * D; ++x) {
        dk[bk * Tk * D + x] = static_cast<T>(dka[x]);
        dv[bk * Tk * D + x] = static_cast<T>(dva[x]);
      }
    }
  });
}

template <typename T, typename I>
void decode_f64(const T* q, const T* kc, const T* vc, const I* seqlens, T* out, int64_t B, int64_t Hq, int64_t Hk,
                int64_t Tn, int64_t Tmax, int64_t D, double scale) {
  using A = double;
  const int64_t G = Hq / Hk;
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      const T* kb = kc + (b * Hk + h / G) * Tmax * D;
      const T* vb = vc + (b * Hk + h / G) * Tmax * D;
      const int64_t len = static_cast<int64_t>(seqlens[b]);
      for (int64_t i = 0; i < Tn; ++i) {
        const T* qr = q + (bh * Tn + i) * D;
        const int64_t jend = len - Tn + i + 1;
        A mx = -std::numeric_limits<A>::infinity(), sum = 0;
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t j = 0; j < jend; ++j) {
          A s = 0;
          for (int64_t d = 0; d < D; ++d) s += static_cast<A>(qr[d]) * static_cast<A>(kb[j * D + d]);
          s *= static_cast<A>(scale);
          if (s > mx) {
            const A c = std::exp(mx - s);
            sum *= c;
            for (int64_t d = 0; d < D; ++d) acc[d] *= c;
            mx = s;
          }
          const A p = std::exp(s - mx);
          sum += p;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<A>(vb[j * D + d]);
        }
        T* orow = out + (bh * Tn + i) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(sum > 0 ? acc[d] / sum : A(0));
      }
    }
  });
}

// Calls f with a value of the storage type of a float32, bfloat16 or float16 tensor.
template <typename F>
void dispatch_reduced(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "attention: unsupported dtype ", st);
  }
}

// Slices per work unit so that units * slices keeps every thread busy.
int64_t slices_for(int64_t units, int64_t most) {
  const int64_t nth = at::get_num_threads();
  if (units >= 2 * nth) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(most, (2 * nth + units - 1) / units));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const OptTensor& mask, bool is_causal, double scale) {
  check_qkv("attention_fwd", q, k, v);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hk = k.size(1), Tk = k.size(2);
  const MaskView mv = mask_view("attention_fwd", mask, B, Hq, Tq, Tk);
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kDouble) {
    at::Tensor lse = at::empty({B, Hq, Tq}, q.options());
    fwd_f64<double>(q.data_ptr<double>(), k.data_ptr<double>(), v.data_ptr<double>(), mv, out.data_ptr<double>(),
                    lse.data_ptr<double>(), B, Hq, Hk, Tq, Tk, D, is_causal, scale);
    return {out, lse};
  }
  at::Tensor lse = at::empty({B, Hq, Tq}, q.options().dtype(at::kFloat));
  dispatch_reduced(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fwd_fast<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), mv, out.data_ptr<T>(), lse.data_ptr<float>(), B,
                Hq, Hk, Tq, Tk, D, is_causal, scale);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 const OptTensor& mask, bool is_causal, double scale) {
  check_qkv("attention_bwd", q, k, v);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hk = k.size(1), Tk = k.size(2);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() && dout.is_contiguous() &&
                  dout.device().is_cpu(),
              "attention_bwd: dout must be a contiguous CPU tensor with q's shape and dtype");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.is_contiguous() &&
                  out.device().is_cpu(),
              "attention_bwd: out must be a contiguous CPU tensor with q's shape and dtype");
  const auto lse_t = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == Tq &&
                  lse.scalar_type() == lse_t && lse.is_contiguous() && lse.device().is_cpu(),
              "attention_bwd: lse must be a contiguous CPU tensor of shape (", B, ", ", Hq, ", ", Tq, ") and dtype ",
              lse_t);
  const MaskView mv = mask_view("attention_bwd", mask, B, Hq, Tq, Tk);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.scalar_type() == at::kDouble) {
    bwd_f64<double>(dout.data_ptr<double>(), q.data_ptr<double>(), k.data_ptr<double>(), v.data_ptr<double>(),
                    out.data_ptr<double>(), lse.data_ptr<double>(), mv, dq.data_ptr<double>(), dk.data_ptr<double>(),
                    dv.data_ptr<double>(), B, Hq, Hk, Tq, Tk, D, is_causal, scale);
    return {dq, dk, dv};
  }
  const int64_t S = slices_for(B * Hk, (Hq / Hk) * ((Tq + kBQ - 1) / kBQ));
  at::Tensor part;
  if (S > 1) part = at::empty({B * Hk * S, 2, Tk, round8(D)}, q.options().dtype(at::kFloat));
  dispatch_reduced(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    bwd_fast<T>(dout.data_ptr<T>(), q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), out.data_ptr<T>(),
                lse.data_ptr<float>(), mv, dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(),
                S > 1 ? part.data_ptr<float>() : nullptr, S, B, Hq, Hk, Tq, Tk, D, is_causal, scale);
  });
  return {dq, dk, dv};
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& cache_seqlens, double scale) {
  return decode_attention_from_cpu(q, k_cache, v_cache, cache_seqlens, std::nullopt, scale);
}

at::Tensor decode_attention_from_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& cache_seqlens, const OptTensor& cache_starts, double scale) {
  check_qkv("decode_attention", q, k_cache, v_cache);
  const int64_t B = q.size(0), Hq = q.size(1), Tn = q.size(2), D = q.size(3), Hk = k_cache.size(1),
                Tmax = k_cache.size(2);
  TORCH_CHECK(cache_seqlens.device().is_cpu() && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                  (cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong),
              "decode_attention: cache_seqlens must be a CPU int32 or int64 tensor of shape (", B, ")");
  const at::Tensor lens = cache_seqlens.to(at::kLong).contiguous();
  const int64_t* lp = lens.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= Tn && lp[b] <= Tmax, "decode_attention: cache_seqlens[", b, "] = ", lp[b],
                " must lie in [", Tn, ", ", Tmax, "] (new tokens, cache capacity)");
    longest = std::max(longest, lp[b]);
  }
  const int32_t* starts = nullptr;
  if (present(cache_starts)) {
    TORCH_CHECK(Tn == 1 && q.scalar_type() == at::kFloat && cache_starts->device().is_cpu() &&
                    cache_starts->scalar_type() == at::kInt && cache_starts->dim() == 1 && cache_starts->size(0) == B &&
                    cache_starts->is_contiguous(),
                "decode_attention: cache_starts must be a contiguous int32 CPU tensor of shape (", B,
                "), for one new float32 token per sequence");
    starts = cache_starts->data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(starts[b] >= 0 && starts[b] < lp[b], "decode_attention: cache_starts[", b, "] = ", starts[b],
                  " must lie in [0, ", lp[b], ")");
    }
  }
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kDouble) {
    decode_f64<double, int64_t>(q.data_ptr<double>(), k_cache.data_ptr<double>(), v_cache.data_ptr<double>(), lp,
                                out.data_ptr<double>(), B, Hq, Hk, Tn, Tmax, D, scale);
    return out;
  }
  // Splitting the cache pays only when a slice still holds a few blocks of keys.
  const int64_t S = slices_for(B * Hk, std::max<int64_t>(1, longest / (4 * kBK)));
  at::Tensor part = at::empty({S > 1 ? B * Hk * (Hq / Hk) * Tn * S * (D + 2) : 0}, q.options().dtype(at::kFloat));
  dispatch_reduced(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    decode_fast<T>(q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), lp, starts, longest,
                   out.data_ptr<T>(), part.data_ptr<float>(), S, B, Hq, Hk, Tn, Tmax, D, scale);
  });
  return out;
}

}  // namespace fastlm
