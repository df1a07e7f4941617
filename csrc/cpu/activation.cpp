// Bias + GELU on the CPU: y = gelu(x + bias), forward and backward, parallel over tiles of rows;
// and SiLU times gate, y = silu(gate) * up (the SwiGLU activation), at the end of the file.
//
// Both GELUs are written around one exponential per element, on eight lanes:
//   tanh:  0.5 v (1 + tanh(u)) = v * s,  s = 1 / (1 + e),  e = exp(-2u),  u = sqrt(2/pi) (v + 0.044715 v^3)
//          gelu'(v) = s + v * 2u'(v) * e * s^2        (s (1 - s) = e s^2: no cancellation near s = 1)
//   erf:   v * Phi(v), Phi(v) = 1 - erfc(z) / 2 for v >= 0 and erfc(z) / 2 below, z = |v| / sqrt(2)
//          gelu'(v) = Phi(v) + v * exp(-v^2 / 2) / sqrt(2 pi)
// erfc(z) = exp(-z^2) * P(t), t = 1 / (1 + p z), is the rational form of Abramowitz and Stegun
// (7.1.26, absolute error below 1.5e-7); the exp(-z^2) it needs is also the derivative's Gaussian,
// so the backward pays for one exponential too. Taking Phi from erfc instead of 1 + erf keeps the
// left tail relatively accurate rather than absolutely.
//
// Extremes saturate as the exact functions do. exp_ps overflows to inf and underflows to 0 like
// expf, so the tanh forward's v / (1 + e) is -0 for every v below about -10 (an e capped at a
// finite value would leave v / e finite and wrong for |v| near float's range) and NaN at -inf, as
// torch's. The tanh backward cannot take e = inf (e * s^2 would be inf * 0): it runs on v clamped
// to +-kTanhClamp, where gelu' is already 0 or 1 to float precision, plus (v - v), which is 0 for
// finite v and NaN for +-inf and NaN, as torch's gelu' is there.
//
// A row's tail (N not a multiple of 8) goes through the same vector code from a padded buffer, so
// an element's result does not depend on where it sits. float64 takes plain loops over std::tanh
// and std::erfc (it exists for gradcheck). dbias is summed as norm.cpp sums dweight: each part
// (a band of rows) into its own float partial row, the partial rows added in a fixed order after.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/vec.h"
#include "checks.h"
#include "fastlm.h"

namespace fastlm {
namespace {

using vec::kW;

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
constexpr float kRsqrt2 = 0.7071067811865476f;
constexpr float kRsqrt2Pi = 0.3989422804014327f;

// e^x, accurate to about one ulp for x in [-87, 88]; below about -87.7 exactly 0 and above about
// 88.4 inf, like expf at its limits. Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then a
// degree-7 polynomial for e^r (Cephes' expf coefficients). The clamp keeps n in [-127, 128], whose
// biased exponents 0 and 255 are the bit patterns of 0 and inf: the limits cost no extra step.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.f)), _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// -2u(v) and, for the backward, 2u'(v).
inline __m256 minus_2u(__m256 v, __m256 v2) {
  const __m256 k = _mm256_set1_ps(-2.f * kSqrt2OverPi);
  return _mm256_mul_ps(v, _mm256_fmadd_ps(v2, _mm256_set1_ps(-2.f * kSqrt2OverPi * kCubic), k));
}
inline __m256 du2(__m256 v2) {
  return _mm256_fmadd_ps(v2, _mm256_set1_ps(6.f * kSqrt2OverPi * kCubic), _mm256_set1_ps(2.f * kSqrt2OverPi));
}

// Phi(v) for the erf GELU, given g = exp(-v^2 / 2).
inline __m256 phi_cdf(__m256 v, __m256 g) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 z = _mm256_mul_ps(_mm256_andnot_ps(sign, v), _mm256_set1_ps(kRsqrt2));
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(z, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.f)));
  __m256 q = _mm256_set1_ps(1.061405429f);
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-1.453152027f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(1.421413741f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-0.284496736f));
  q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(0.254829592f));
  const __m256 half_erfc = _mm256_mul_ps(_mm256_mul_ps(q, t), _mm256_mul_ps(g, _mm256_set1_ps(0.5f)));
  // v >= 0: 1 - erfc/2; v < 0: erfc/2. A NaN lane stays NaN through g.
  const __m256 neg = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.f), half_erfc), half_erfc, neg);
}

template <bool TANH>
inline __m256 gelu_ps(__m256 v) {
  const __m256 v2 = _mm256_mul_ps(v, v);
  if constexpr (TANH) {
    const __m256 e = exp_ps(minus_2u(v, v2));
    return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), e));
  } else {
    const __m256 g = exp_ps(_mm256_mul_ps(v2, _mm256_set1_ps(-0.5f)));
    return _mm256_mul_ps(v, phi_cdf(v, g));
  }
}

// |2u(9.5)| = 76.3: e stays finite, and beyond it gelu' differs from 0 or 1 by under 1e-30.
constexpr float kTanhClamp = 9.5f;

template <bool TANH>
inline __m256 gelu_grad_ps(__m256 v) {
  if constexpr (TANH) {
    const __m256 c = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-kTanhClamp)), _mm256_set1_ps(kTanhClamp));
    const __m256 c2 = _mm256_mul_ps(c, c);
    const __m256 e = exp_ps(minus_2u(c, c2));
    const __m256 s = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), e));
    const __m256 es2 = _mm256_mul_ps(_mm256_mul_ps(e, s), s);
    return _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(c, du2(c2)), es2, s), _mm256_sub_ps(v, v));
  } else {
    const __m256 v2 = _mm256_mul_ps(v, v);
    const __m256 g = exp_ps(_mm256_mul_ps(v2, _mm256_set1_ps(-0.5f)));
    return _mm256_fmadd_ps(_mm256_mul_ps(v, g), _mm256_set1_ps(kRsqrt2Pi), phi_cdf(v, g));
  }
}

// Tiles: a run of up to kCols columns of one row, so that one long row still splits across
// threads and short rows come many to a task. At least 64K elements a task: a decode step's
// 8 x 4096 silu_mul, right after the up projection, took ~80 us as an OpenMP region against
// 30-40 us on the calling thread alone (2-core AMD EPYC Zen 3, inside the fused decode block).
constexpr int64_t kCols = 4096;
constexpr int64_t kGrainElems = 1 << 16;

template <typename T>
inline void load_tail(const T* p, int64_t n, float* buf) {
  for (int64_t j = 0; j < kW; ++j) buf[j] = j < n ? static_cast<float>(p[j]) : 0.f;
}

template <typename T>
inline void store_tail(T* p, int64_t n, const float* buf) {
  for (int64_t j = 0; j < n; ++j) p[j] = static_cast<T>(buf[j]);
}

template <typename T, bool TANH>
void fwd_vec(const T* x, const T* b, T* y, int64_t m, int64_t n) {
  const int64_t chunks = (n + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::min(n, kCols));
  at::parallel_for(0, m * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / chunks, c0 = (t % chunks) * kCols, c1 = std::min(n, c0 + kCols);
      const T* xr = x + i * n;
      T* yr = y + i * n;
      int64_t j = c0;
      for (; j + kW <= c1; j += kW) {
        __m256 v = vec::load(xr + j);
        if (b) v = _mm256_add_ps(v, vec::load(b + j));
        vec::store(yr + j, gelu_ps<TANH>(v));
      }
      if (j < c1) {
        alignas(32) float xv[kW], bv[kW];
        load_tail(xr + j, c1 - j, xv);
        __m256 v = _mm256_load_ps(xv);
        if (b) {
          load_tail(b + j, c1 - j, bv);
          v = _mm256_add_ps(v, _mm256_load_ps(bv));
        }
        _mm256_store_ps(xv, gelu_ps<TANH>(v));
        store_tail(yr + j, c1 - j, xv);
      }
    }
  });
}

// dx = dy * gelu'(x + b); with db_part, each part also sums its rows' dx (in float, before
// rounding to T) into its partial row.
template <typename T, bool TANH>
void bwd_vec(const T* dy, const T* x, const T* b, T* dx, float* db_part, int64_t nparts, int64_t m, int64_t n) {
  auto row = [&](int64_t i, int64_t c0, int64_t c1, float* acc) {
    const T* xr = x + i * n;
    const T* gr = dy + i * n;
    T* dxr = dx + i * n;
    int64_t j = c0;
    for (; j + kW <= c1; j += kW) {
      __m256 v = vec::load(xr + j);
      if (b) v = _mm256_add_ps(v, vec::load(b + j));
      const __m256 d = _mm256_mul_ps(vec::load(gr + j), gelu_grad_ps<TANH>(v));
      vec::store(dxr + j, d);
      if (acc) _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), d));
    }
    if (j < c1) {
      alignas(32) float xv[kW], bv[kW], gv[kW];
      load_tail(xr + j, c1 - j, xv);
      load_tail(gr + j, c1 - j, gv);
      __m256 v = _mm256_load_ps(xv);
      if (b) {
        load_tail(b + j, c1 - j, bv);
        v = _mm256_add_ps(v, _mm256_load_ps(bv));
      }
      _mm256_store_ps(xv, _mm256_mul_ps(_mm256_load_ps(gv), gelu_grad_ps<TANH>(v)));
      store_tail(dxr + j, c1 - j, xv);
      if (acc)
        for (int64_t k = 0; k < c1 - j; ++k) acc[j + k] += xv[k];
    }
  };
  if (db_part == nullptr) {
    const int64_t chunks = (n + kCols - 1) / kCols;
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::min(n, kCols));
    at::parallel_for(0, m * chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c0 = (t % chunks) * kCols;
        row(t / chunks, c0, std::min(n, c0 + kCols), nullptr);
      }
    });
    return;
  }
  const int64_t rows_per_part = (m + nparts - 1) / nparts;
  at::parallel_for(0, nparts, 1, [&](int64_t pbegin, int64_t pend) {
    for (int64_t p = pbegin; p < pend; ++p)
      for (int64_t i = p * rows_per_part; i < std::min(m, (p + 1) * rows_per_part); ++i)
        row(i, 0, n, db_part + p * n);
  });
}

// float64: the textbook formulas.
inline double gelu_f64(double v, bool tanh, double* grad) {
  constexpr double k = 0.7978845608028654, c = 0.044715;
  if (tanh) {
    const double t = std::tanh(k * (v + c * v * v * v));
    if (grad) *grad = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * k * (1 + 3 * c * v * v);
    return 0.5 * v * (1 + t);
  }
  const double cdf = 0.5 * std::erfc(-v * 0.7071067811865476);
  if (grad) *grad = cdf + v * std::exp(-0.5 * v * v) * 0.3989422804014327;
  return v * cdf;
}

void fwd_f64(const double* x, const double* b, double* y, int64_t m, int64_t n, bool tanh) {
  at::parallel_for(0, m, std::max<int64_t>(1, kGrainElems / n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t j = 0; j < n; ++j) y[i * n + j] = gelu_f64(x[i * n + j] + (b ? b[j] : 0.0), tanh, nullptr);
  });
}

void bwd_f64(const double* dy, const double* x, const double* b, double* dx, double* db_part, int64_t nparts,
             int64_t m, int64_t n, bool tanh) {
  const int64_t rows_per_part = (m + nparts - 1) / nparts;
  at::parallel_for(0, nparts, 1, [&](int64_t pbegin, int64_t pend) {
    for (int64_t p = pbegin; p < pend; ++p) {
      for (int64_t i = p * rows_per_part; i < std::min(m, (p + 1) * rows_per_part); ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double g;
          gelu_f64(x[i * n + j] + (b ? b[j] : 0.0), tanh, &g);
          const double d = dy[i * n + j] * g;
          dx[i * n + j] = d;
          if (db_part) db_part[p * n + j] += d;
        }
      }
    }
  });
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return present(t) ? t->data_ptr<T>() : nullptr;
}

}  // namespace

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const OptTensor& bias, bool tanh) {
  // fastlm/ops/activation.py validates arguments; this keeps direct callers in bounds.
  check_bias_gelu("bias_gelu_fwd", x, bias, nullptr, at::kCPU);
  const int64_t m = x.size(0), n = x.size(1);
  auto y = at::empty_like(x);
  if (m == 0 || n == 0) return y;
  if (x.scalar_type() == at::kDouble) {
    fwd_f64(x.data_ptr<double>(), ptr_or_null<double>(bias), y.data_ptr<double>(), m, n, tanh);
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_gelu_fwd_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const auto* xp = x.data_ptr<scalar_t>();
      const auto* bp = ptr_or_null<scalar_t>(bias);
      auto* yp = y.data_ptr<scalar_t>();
      if (tanh) fwd_vec<scalar_t, true>(xp, bp, yp, m, n); else fwd_vec<scalar_t, false>(xp, bp, yp, m, n);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const OptTensor& bias,
                                                     bool tanh, bool need_dbias) {
  check_bias_gelu("bias_gelu_bwd", x, bias, &dy, at::kCPU);
  const int64_t m = x.size(0), n = x.size(1);
  const bool f64 = x.scalar_type() == at::kDouble;
  auto dx = at::empty_like(x);
  auto acc_opt = x.options().dtype(f64 ? at::kDouble : at::kFloat);
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m));
  auto db_part = need_dbias ? at::zeros({nparts, n}, acc_opt) : at::empty({0}, acc_opt);
  if (m > 0 && n > 0 && f64) {
    bwd_f64(dy.data_ptr<double>(), x.data_ptr<double>(), ptr_or_null<double>(bias), dx.data_ptr<double>(),
            need_dbias ? db_part.data_ptr<double>() : nullptr, nparts, m, n, tanh);
  } else if (m > 0 && n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_gelu_bwd_cpu", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        const auto* gp = dy.data_ptr<scalar_t>();
        const auto* xp = x.data_ptr<scalar_t>();
        const auto* bp = ptr_or_null<scalar_t>(bias);
        auto* dxp = dx.data_ptr<scalar_t>();
        float* dbp = need_dbias ? db_part.data_ptr<float>() : nullptr;
        if (tanh) bwd_vec<scalar_t, true>(gp, xp, bp, dxp, dbp, nparts, m, n);
        else bwd_vec<scalar_t, false>(gp, xp, bp, dxp, dbp, nparts, m, n);
      }
    });
  }
  auto db = need_dbias ? db_part.sum(0) : at::empty({0}, acc_opt);
  return {dx, db};
}

}  // namespace fastlm

// ---- SiLU times gate ---------------------------------------------------------------------------
//
// y = silu(g) * u with silu(g) = g / (1 + e), e = exp(-g); backward
//   dup   = dy * silu(g)
//   dgate = dy * u * s (1 + g (1 - s)),  s = 1 / (1 + e),  1 - s = e s for g > 0 (no cancellation
//           where s is near 1), 1 - s as written below (s <= 1/2 there).
// e is not clamped: it overflows to inf for g below about -88, so silu is -0 there and NaN at
// -inf, and s (1 + g (1 - s)) is -0 there and NaN at +-inf, all as torch's. silu(g) is formed
// before the product with u: g * u could overflow where silu(g) * u is -0.
// gate, up and dy may have any row stride (the halves of a fused gate_up projection are read in
// place); when every one is contiguous the rows are walked as one, so short rows vectorise too.
namespace fastlm {
namespace {

struct SiluRows {
  int64_t m, n, gs, us, ds;  // rows, columns, row strides of gate, up and dy (in elements)
};

template <typename T>
inline __m256 load_any(const T* p, int64_t n) {
  if (n == kW) return vec::load(p);
  alignas(32) float buf[kW];
  load_tail(p, n, buf);
  return _mm256_load_ps(buf);
}

template <typename T>
inline void store_any(T* p, int64_t n, __m256 v) {
  if (n == kW) return vec::store(p, v);
  alignas(32) float buf[kW];
  _mm256_store_ps(buf, v);
  store_tail(p, n, buf);
}

// (s, e) for lanes g: s = 1 / (1 + e), e = exp(-g).
inline __m256 sigmoid_ps(__m256 g, __m256* e_out) {
  const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
  *e_out = e;
  return _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

// Calls f(row, c0, c1) over tiles of at most kCols columns, in parallel.
template <typename F>
void for_tiles(const SiluRows& r, F&& f) {
  const int64_t chunks = (r.n + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::min(r.n, kCols));
  at::parallel_for(0, r.m * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = (t % chunks) * kCols;
      f(t / chunks, c0, std::min(r.n, c0 + kCols));
    }
  });
}

template <typename T>
void silu_mul_fwd(const T* g, const T* u, T* y, const SiluRows& r) {
  for_tiles(r, [&](int64_t i, int64_t c0, int64_t c1) {
    const T* gr = g + i * r.gs;
    const T* ur = u + i * r.us;
    T* yr = y + i * r.n;
    for (int64_t j = c0; j < c1; j += kW) {
      const int64_t w = std::min<int64_t>(kW, c1 - j);
      const __m256 gv = load_any(gr + j, w);
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv));
      const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e));
      store_any(yr + j, w, _mm256_mul_ps(silu, load_any(ur + j, w)));
    }
  });
}

template <typename T>
void silu_mul_bwd(const T* dy, const T* g, const T* u, T* dg, T* du, const SiluRows& r) {
  for_tiles(r, [&](int64_t i, int64_t c0, int64_t c1) {
    const T* gr = g + i * r.gs;
    const T* ur = u + i * r.us;
    const T* dyr = dy + i * r.ds;
    for (int64_t j = c0; j < c1; j += kW) {
      const int64_t w = std::min<int64_t>(kW, c1 - j);
      const __m256 gv = load_any(gr + j, w), d = load_any(dyr + j, w);
      __m256 e;
      const __m256 s = sigmoid_ps(gv, &e);
      const __m256 pos = _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_GT_OQ);
      const __m256 one_minus_s = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.f), s), _mm256_mul_ps(e, s), pos);
      const __m256 dsilu = _mm256_mul_ps(s, _mm256_fmadd_ps(gv, one_minus_s, _mm256_set1_ps(1.f)));
      store_any(dg + i * r.n + j, w, _mm256_mul_ps(_mm256_mul_ps(d, load_any(ur + j, w)), dsilu));
      store_any(du + i * r.n + j, w, _mm256_mul_ps(d, _mm256_mul_ps(gv, s)));
    }
  });
}

// float64: the same formulas in plain loops (they serve gradcheck); overloads the templates above.
void silu_mul_fwd(const double* g, const double* u, double* y, const SiluRows& r) {
  for_tiles(r, [&](int64_t i, int64_t c0, int64_t c1) {
    for (int64_t j = c0; j < c1; ++j) {
      const double gv = g[i * r.gs + j];
      y[i * r.n + j] = gv / (1.0 + std::exp(-gv)) * u[i * r.us + j];
    }
  });
}

void silu_mul_bwd(const double* dy, const double* g, const double* u, double* dg, double* du,
                      const SiluRows& r) {
  for_tiles(r, [&](int64_t i, int64_t c0, int64_t c1) {
    for (int64_t j = c0; j < c1; ++j) {
      const double gv = g[i * r.gs + j], d = dy[i * r.ds + j], e = std::exp(-gv);
      const double s = 1.0 / (1.0 + e);
      const double one_minus_s = gv > 0 ? e * s : 1.0 - s;
      dg[i * r.n + j] = d * u[i * r.us + j] * (s * (1.0 + gv * one_minus_s));
      du[i * r.n + j] = d * (gv * s);
    }
  });
}

// One tensor of silu_mul's contract: (M, N) like gate, unit column stride, any row stride.
void check_silu_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& gate,
                     at::DeviceType type) {
  const auto w = where(op, type);
  TORCH_CHECK(t.defined(), w, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().type() == type, w, ": ", name, " must be a ", c10::DeviceTypeName(type, true),
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == gate.device(), w, ": ", name, " is on ", t.device(), " but gate is on ", gate.device());
  TORCH_CHECK(t.dim() == 2, w, ": ", name, " must be 2-D (M, N), got shape ", t.sizes());
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || (dt == at::kDouble && type == at::kCPU);
  TORCH_CHECK(ok, w, ": ", name, " has dtype ", dt, "; this backend supports float16, bfloat16, float32",
              type == at::kCPU ? " and float64" : "");
  TORCH_CHECK(dt == gate.scalar_type(), w, ": ", name, " has dtype ", dt, ", expected gate's ", gate.scalar_type());
  TORCH_CHECK(t.sizes() == gate.sizes(), w, ": ", name, " has shape ", t.sizes(), ", expected gate's ", gate.sizes());
  const bool unit_cols = t.size(1) <= 1 || t.stride(1) == 1;
  const bool rows_apart = t.size(0) <= 1 || t.stride(0) >= t.size(1);
  TORCH_CHECK(t.numel() == 0 || (unit_cols && rows_apart), w, ": ", name,
              " must have unit column stride and rows that do not overlap, got strides ", t.strides());
  TORCH_CHECK(type == at::kCPU || (t.size(1) <= INT_MAX && t.stride(0) <= INT_MAX), w, ": ", name,
              " has rows longer than ", INT_MAX, " elements");
}

SiluRows silu_rows(const at::Tensor& gate, const at::Tensor& up, const at::Tensor* dy) {
  const int64_t m = gate.size(0), n = gate.size(1);
  auto stride = [&](const at::Tensor& t) { return m <= 1 ? n : t.stride(0); };
  SiluRows r{m, n, stride(gate), stride(up), dy ? stride(*dy) : n};
  if (r.gs == n && r.us == n && r.ds == n) r = SiluRows{1, m * n, m * n, m * n, m * n};
  return r;
}

}  // namespace

void check_silu_mul(const char* op, const at::Tensor& gate, const at::Tensor& up, const at::Tensor* dy,
                    at::DeviceType type) {
  check_silu_rows(op, "gate", gate, gate, type);
  check_silu_rows(op, "up", up, gate, type);
  if (dy != nullptr) check_silu_rows(op, "dy", *dy, gate, type);
}

at::Tensor silu_mul_fwd_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_silu_mul("silu_mul_fwd", gate, up, nullptr, at::kCPU);
  auto y = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const SiluRows r = silu_rows(gate, up, nullptr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "silu_mul_fwd_cpu", [&] {
    const auto* gp = gate.data_ptr<scalar_t>();
    const auto* up_ = up.data_ptr<scalar_t>();
    auto* yp = y.data_ptr<scalar_t>();
    silu_mul_fwd(gp, up_, yp, r);  // float64 picks the plain-loop overload
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate,
                                                    const at::Tensor& up) {
  check_silu_mul("silu_mul_bwd", gate, up, &dy, at::kCPU);
  const auto opts = gate.options().memory_format(at::MemoryFormat::Contiguous);
  auto dg = at::empty(gate.sizes(), opts), du = at::empty(gate.sizes(), opts);
  if (dg.numel() == 0) return {dg, du};
  const SiluRows r = silu_rows(gate, up, &dy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "silu_mul_bwd_cpu", [&] {
    const auto* dyp = dy.data_ptr<scalar_t>();
    const auto* gp = gate.data_ptr<scalar_t>();
    const auto* up_ = up.data_ptr<scalar_t>();
    auto* dgp = dg.data_ptr<scalar_t>();
    auto* dup = du.data_ptr<scalar_t>();
    silu_mul_bwd(dyp, gp, up_, dgp, dup, r);
  });
  return {dg, du};
}

}  // namespace fastlm
