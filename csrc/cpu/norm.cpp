// Layer norm and RMS norm on the CPU: forward and backward, parallel over rows.
//
// A row of a real model (768..8192 values) fits in L1, so each row is read from memory once and
// then swept from cache: statistics first (two sweeps, mean then centred variance, which is more
// accurate than E[x^2] - E[x]^2), then the write. Sweeps run on AVX2 vectors with four
// accumulators (csrc/cpu/vec.h); float64 takes a plain scalar path (it exists for gradcheck).
// Streaming stores for large outputs were tried and measured slower here (forward 9-23 ms
// against 5-6 ms at 8192x1024 fp32), so outputs go through the cache.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "cpu/vec.h"
#include "checks.h"
#include "fastlm.h"

namespace fastlm {
namespace {

using vec::kW;

// Rows per parallel task: about 64 KiB of input each.
int64_t grain_rows(int64_t n, size_t elem) {
  return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, n * static_cast<int64_t>(elem)));
}

// sum(v) and sum((v - mu)^2) of a row, vectorised with four accumulators.
template <typename T>
float row_sum(const T* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 4 * kW <= n; j += 4 * kW) {
    a0 = _mm256_add_ps(a0, vec::load(p + j));
    a1 = _mm256_add_ps(a1, vec::load(p + j + kW));
    a2 = _mm256_add_ps(a2, vec::load(p + j + 2 * kW));
    a3 = _mm256_add_ps(a3, vec::load(p + j + 3 * kW));
  }
  for (; j + kW <= n; j += kW) a0 = _mm256_add_ps(a0, vec::load(p + j));
  float s = vec::hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; j < n; ++j) s += static_cast<float>(p[j]);
  return s;
}

template <typename T>
float row_sq_dev(const T* p, int64_t n, float mu) {
  const __m256 m = _mm256_set1_ps(mu);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 4 * kW <= n; j += 4 * kW) {
    const __m256 d0 = _mm256_sub_ps(vec::load(p + j), m), d1 = _mm256_sub_ps(vec::load(p + j + kW), m);
    const __m256 d2 = _mm256_sub_ps(vec::load(p + j + 2 * kW), m), d3 = _mm256_sub_ps(vec::load(p + j + 3 * kW), m);
    a0 = _mm256_fmadd_ps(d0, d0, a0);
    a1 = _mm256_fmadd_ps(d1, d1, a1);
    a2 = _mm256_fmadd_ps(d2, d2, a2);
    a3 = _mm256_fmadd_ps(d3, d3, a3);
  }
  for (; j + kW <= n; j += kW) {
    const __m256 d = _mm256_sub_ps(vec::load(p + j), m);
    a0 = _mm256_fmadd_ps(d, d, a0);
  }
  float s = vec::hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; j < n; ++j) {
    const float d = static_cast<float>(p[j]) - mu;
    s += d * d;
  }
  return s;
}

// Forward for float, bf16 and fp16 storage, computing in float.
template <typename T>
void norm_fwd_vec(const T* x, const T* w, const T* b, const T* res, T* y, T* h, float* mean, float* rstd,
                  int64_t m, int64_t n, float eps, bool rms) {
  at::parallel_for(0, m, grain_rows(n, sizeof(T)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* v = x + i * n;
      if (res) {
        // h is rounded to T before it is normalised, exactly like an unfused `x + r` then norm.
        T* hr = h + i * n;
        const T* rr = res + i * n;
        int64_t j = 0;
        for (; j + kW <= n; j += kW) vec::store(hr + j, _mm256_add_ps(vec::load(v + j), vec::load(rr + j)));
        for (; j < n; ++j) hr[j] = static_cast<T>(static_cast<float>(v[j]) + static_cast<float>(rr[j]));
        v = hr;
      }
      const float mu = rms ? 0.f : row_sum(v, n) / n;
      const float rs = 1.f / std::sqrt(row_sq_dev(v, n, mu) / n + eps);
      if (mean) mean[i] = mu;
      rstd[i] = rs;
      T* yr = y + i * n;
      const __m256 vmu = _mm256_set1_ps(mu), vrs = _mm256_set1_ps(rs);
      int64_t j = 0;
      for (; j + kW <= n; j += kW) {
        __m256 o = _mm256_mul_ps(_mm256_sub_ps(vec::load(v + j), vmu), vrs);
        if (w) o = _mm256_mul_ps(o, vec::load(w + j));
        if (b) o = _mm256_add_ps(o, vec::load(b + j));
        vec::store(yr + j, o);
      }
      for (; j < n; ++j) {
        float o = (static_cast<float>(v[j]) - mu) * rs;
        if (w) o *= static_cast<float>(w[j]);
        if (b) o += static_cast<float>(b[j]);
        yr[j] = static_cast<T>(o);
      }
    }
  });
}

// Backward for float, bf16 and fp16 storage:
//   dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) [+ dh],  g = dy * w,  xhat = (x - mu) * rstd
// (for RMS the mean(g) term is absent). dweight and dbias are sums over rows: each task sums its
// rows into its own float partial row, and partial rows are added in a fixed order afterwards,
// so the result does not depend on scheduling.
template <typename T>
void norm_bwd_vec(const T* dy, const T* x, const T* w, const T* dh, const float* mean, const float* rstd, T* dx,
                  float* dw_part, float* db_part, int64_t nparts, int64_t m, int64_t n, bool rms) {
  const int64_t rows_per_part = (m + nparts - 1) / nparts;
  at::parallel_for(0, nparts, 1, [&](int64_t pbegin, int64_t pend) {
    for (int64_t p = pbegin; p < pend; ++p) {
      float* dwp = dw_part ? dw_part + p * n : nullptr;
      float* dbp = db_part ? db_part + p * n : nullptr;
      const int64_t rbegin = p * rows_per_part, rend = std::min(m, rbegin + rows_per_part);
      for (int64_t i = rbegin; i < rend; ++i) {
        const T* xr = x + i * n;
        const T* gr = dy + i * n;
        const float mu = rms ? 0.f : mean[i], rs = rstd[i];
        const __m256 vmu = _mm256_set1_ps(mu), vrs = _mm256_set1_ps(rs);
        __m256 c1v = _mm256_setzero_ps(), c2v = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + kW <= n; j += kW) {
          const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(vec::load(xr + j), vmu), vrs);
          __m256 g = vec::load(gr + j);
          if (w) g = _mm256_mul_ps(g, vec::load(w + j));
          c1v = _mm256_fmadd_ps(g, xh, c1v);
          c2v = _mm256_add_ps(c2v, g);
        }
        float c1 = vec::hsum(c1v), c2 = vec::hsum(c2v);
        for (; j < n; ++j) {
          const float xh = (static_cast<float>(xr[j]) - mu) * rs;
          const float g = static_cast<float>(gr[j]) * (w ? static_cast<float>(w[j]) : 1.f);
          c1 += g * xh;
          c2 += g;
        }
        c1 /= n;
        c2 = rms ? 0.f : c2 / n;
        const __m256 vc1 = _mm256_set1_ps(c1), vc2 = _mm256_set1_ps(c2);
        T* dxr = dx + i * n;
        const T* dhr = dh ? dh + i * n : nullptr;
        for (j = 0; j + kW <= n; j += kW) {
          const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(vec::load(xr + j), vmu), vrs);
          const __m256 d = vec::load(gr + j);
          const __m256 g = w ? _mm256_mul_ps(d, vec::load(w + j)) : d;
          __m256 o = _mm256_mul_ps(vrs, _mm256_sub_ps(_mm256_sub_ps(g, _mm256_mul_ps(xh, vc1)), vc2));
          if (dhr) o = _mm256_add_ps(o, vec::load(dhr + j));
          vec::store(dxr + j, o);
          if (dwp) _mm256_storeu_ps(dwp + j, _mm256_fmadd_ps(d, xh, _mm256_loadu_ps(dwp + j)));
          if (dbp) _mm256_storeu_ps(dbp + j, _mm256_add_ps(d, _mm256_loadu_ps(dbp + j)));
        }
        for (; j < n; ++j) {
          const float xh = (static_cast<float>(xr[j]) - mu) * rs;
          const float d = static_cast<float>(gr[j]);
          const float g = d * (w ? static_cast<float>(w[j]) : 1.f);
          float o = rs * (g - xh * c1 - c2);
          if (dhr) o += static_cast<float>(dhr[j]);
          dxr[j] = static_cast<T>(o);
          if (dwp) dwp[j] += d * xh;
          if (dbp) dbp[j] += d;
        }
      }
    }
  });
}

// float64: the same math in plain loops.
void norm_fwd_f64(const double* x, const double* w, const double* b, const double* res, double* y, double* h,
                  double* mean, double* rstd, int64_t m, int64_t n, double eps, bool rms) {
  at::parallel_for(0, m, grain_rows(n, sizeof(double)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* v = x + i * n;
      if (res) {
        for (int64_t j = 0; j < n; ++j) h[i * n + j] = v[j] + res[i * n + j];
        v = h + i * n;
      }
      double mu = 0, ss = 0;
      if (!rms) {
        for (int64_t j = 0; j < n; ++j) mu += v[j];
        mu /= n;
      }
      for (int64_t j = 0; j < n; ++j) ss += (v[j] - mu) * (v[j] - mu);
      const double rs = 1.0 / std::sqrt(ss / n + eps);
      if (mean) mean[i] = mu;
      rstd[i] = rs;
      for (int64_t j = 0; j < n; ++j) y[i * n + j] = (v[j] - mu) * rs * (w ? w[j] : 1.0) + (b ? b[j] : 0.0);
    }
  });
}

void norm_bwd_f64(const double* dy, const double* x, const double* w, const double* dh, const double* mean,
                  const double* rstd, double* dx, double* dw_part, double* db_part, int64_t nparts, int64_t m,
                  int64_t n, bool rms) {
  const int64_t rows_per_part = (m + nparts - 1) / nparts;
  at::parallel_for(0, nparts, 1, [&](int64_t pbegin, int64_t pend) {
    for (int64_t p = pbegin; p < pend; ++p) {
      for (int64_t i = p * rows_per_part; i < std::min(m, (p + 1) * rows_per_part); ++i) {
        const double mu = rms ? 0.0 : mean[i], rs = rstd[i];
        double c1 = 0, c2 = 0;
        for (int64_t j = 0; j < n; ++j) {
          const double g = dy[i * n + j] * (w ? w[j] : 1.0);
          c1 += g * (x[i * n + j] - mu) * rs;
          c2 += g;
        }
        c1 /= n;
        c2 = rms ? 0.0 : c2 / n;
        for (int64_t j = 0; j < n; ++j) {
          const double xh = (x[i * n + j] - mu) * rs, d = dy[i * n + j], g = d * (w ? w[j] : 1.0);
          dx[i * n + j] = rs * (g - xh * c1 - c2) + (dh ? dh[i * n + j] : 0.0);
          if (dw_part) dw_part[p * n + j] += d * xh;
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

template <typename T>
T* data_or_null(at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    double eps, bool rms) {
  check_norm_fwd(x, weight, bias, residual, at::kCPU);
  const int64_t m = x.size(0), n = x.size(1);
  const bool has_res = present(residual);
  const bool f64 = x.scalar_type() == at::kDouble;
  auto y = at::empty_like(x);
  auto h = has_res ? at::empty_like(x) : at::empty({0}, x.options());
  auto sopt = x.options().dtype(f64 ? at::kDouble : at::kFloat);
  auto mean = rms ? at::empty({0}, sopt) : at::empty({m}, sopt);
  auto rstd = at::empty({m}, sopt);
  if (m == 0) return {y, h, mean, rstd};
  if (f64) {
    norm_fwd_f64(x.data_ptr<double>(), ptr_or_null<double>(weight), ptr_or_null<double>(bias),
                 ptr_or_null<double>(residual), y.data_ptr<double>(), data_or_null<double>(h),
                 data_or_null<double>(mean), rstd.data_ptr<double>(), m, n, eps, rms);
    return {y, h, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "norm_fwd_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      norm_fwd_vec<scalar_t>(x.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(weight), ptr_or_null<scalar_t>(bias),
                             ptr_or_null<scalar_t>(residual), y.data_ptr<scalar_t>(), data_or_null<scalar_t>(h),
                             data_or_null<float>(mean), rstd.data_ptr<float>(), m, n, static_cast<float>(eps), rms);
    }
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const OptTensor& dh, bool rms, bool has_bias) {
  check_norm_bwd(dy, x, weight, mean, rstd, dh, rms, at::kCPU);
  const int64_t m = x.size(0), n = x.size(1);
  const bool has_w = present(weight);
  const bool f64 = x.scalar_type() == at::kDouble;
  auto dx = at::empty_like(x);
  auto acc_opt = x.options().dtype(f64 ? at::kDouble : at::kFloat);
  // One partial row per thread, capped by the rows available.
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m));
  auto dw_part = has_w ? at::zeros({nparts, n}, acc_opt) : at::empty({0}, acc_opt);
  auto db_part = has_bias ? at::zeros({nparts, n}, acc_opt) : at::empty({0}, acc_opt);
  if (m > 0 && f64) {
    norm_bwd_f64(dy.data_ptr<double>(), x.data_ptr<double>(), ptr_or_null<double>(weight), ptr_or_null<double>(dh),
                 rms ? nullptr : mean.data_ptr<double>(), rstd.data_ptr<double>(), dx.data_ptr<double>(),
                 data_or_null<double>(dw_part), data_or_null<double>(db_part), nparts, m, n, rms);
  } else if (m > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "norm_bwd_cpu", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        norm_bwd_vec<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(weight),
                               ptr_or_null<scalar_t>(dh), rms ? nullptr : mean.data_ptr<float>(),
                               rstd.data_ptr<float>(), dx.data_ptr<scalar_t>(), data_or_null<float>(dw_part),
                               data_or_null<float>(db_part), nparts, m, n, rms);
      }
    });
  }
  auto dw = has_w ? dw_part.sum(0).to(weight->scalar_type()) : at::empty({0}, x.options());
  auto db = has_bias ? db_part.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dw, db};
}

}  // namespace fastlm
