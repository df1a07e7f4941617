// Layer norm and RMS norm on the CPU: forward and backward, parallel over rows.
//
// A row of a real model (768..8192 values) fits in L1, so each row is read from memory once and
// then swept from cache: statistics first (two passes, mean then variance, which is more accurate
// than E[x^2] - E[x]^2), then the write. Low-precision rows are widened once into a per-thread
// float buffer so that every sweep runs on plain floats. `omp simd` lets the compiler vectorise
// the reductions, which it otherwise may not reorder.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#include "fastlm.h"

namespace fastlm {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Rows per parallel task: enough that a task amortises its scheduling, few enough to balance.
constexpr int64_t kGrainBytes = 1 << 16;

int64_t grain_rows(int64_t n, size_t elem) {
  return std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, n * static_cast<int64_t>(elem)));
}

// Widen row `src` (and add `res` when given, rounding the sum to T like an unfused add would,
// writing it to `h_out`) into `dst`.
template <typename T, typename A>
void load_row(const T* src, const T* res, T* h_out, A* dst, int64_t n) {
  if (res == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<A>(src[j]);
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T h = static_cast<T>(static_cast<A>(src[j]) + static_cast<A>(res[j]));
    h_out[j] = h;
    dst[j] = static_cast<A>(h);
  }
}

template <typename T>
void norm_fwd_kernel(const T* x, const T* w, const T* b, const T* res, T* y, T* h, float* mean_f,
                     double* mean_d, float* rstd_f, double* rstd_d, int64_t m, int64_t n, double eps,
                     bool rms) {
  using A = typename Acc<T>::type;
  // float and double inputs without a residual are read in place; others go through a buffer.
  constexpr bool kInPlace = std::is_same_v<T, A>;
  at::parallel_for(0, m, grain_rows(n, sizeof(T)), [&](int64_t begin, int64_t end) {
    std::vector<A> buf((kInPlace && res == nullptr) ? 0 : n);
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * n;
      const A* v;
      if constexpr (kInPlace) {
        if (res == nullptr) {
          v = reinterpret_cast<const A*>(xr);
        } else {
          load_row(xr, res + i * n, h + i * n, buf.data(), n);
          v = buf.data();
        }
      } else {
        load_row(xr, res ? res + i * n : nullptr, res ? h + i * n : nullptr, buf.data(), n);
        v = buf.data();
      }
      A mu = 0;
      if (!rms) {
        A s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n; ++j) s += v[j];
        mu = s / n;
      }
      A ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < n; ++j) ss += (v[j] - mu) * (v[j] - mu);
      const A rs = A(1) / std::sqrt(ss / n + static_cast<A>(eps));
      T* yr = y + i * n;
      if (w && b) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j)
          yr[j] = static_cast<T>((v[j] - mu) * rs * static_cast<A>(w[j]) + static_cast<A>(b[j]));
      } else if (w) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) yr[j] = static_cast<T>((v[j] - mu) * rs * static_cast<A>(w[j]));
      } else if (b) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) yr[j] = static_cast<T>((v[j] - mu) * rs + static_cast<A>(b[j]));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) yr[j] = static_cast<T>((v[j] - mu) * rs);
      }
      if (mean_f) mean_f[i] = static_cast<float>(mu);
      if (mean_d) mean_d[i] = static_cast<double>(mu);
      if (rstd_f) rstd_f[i] = static_cast<float>(rs);
      if (rstd_d) rstd_d[i] = static_cast<double>(rs);
    }
  });
}

// dx = rstd * (w*dy - xhat * mean(w*dy*xhat) - mean(w*dy)) [+ dh]; for RMS the last term is absent.
// dweight and dbias are sums over rows: each task sums its rows into its own partial row, and
// the partial rows are added in a fixed order, so the result does not depend on scheduling.
template <typename T>
void norm_bwd_kernel(const T* dy, const T* x, const T* w, const T* dh, const void* mean_p,
                     const void* rstd_p, T* dx, typename Acc<T>::type* dw_part,
                     typename Acc<T>::type* db_part, int64_t nparts, int64_t m, int64_t n, bool rms) {
  using A = typename Acc<T>::type;
  const A* mean = static_cast<const A*>(mean_p);
  const A* rstd = static_cast<const A*>(rstd_p);
  const int64_t rows_per_part = (m + nparts - 1) / nparts;
  at::parallel_for(0, nparts, 1, [&](int64_t pbegin, int64_t pend) {
    std::vector<A> vbuf(n), gbuf(n);
    for (int64_t p = pbegin; p < pend; ++p) {
      A* dwp = dw_part ? dw_part + p * n : nullptr;
      A* dbp = db_part ? db_part + p * n : nullptr;
      const int64_t rbegin = p * rows_per_part, rend = std::min(m, rbegin + rows_per_part);
      for (int64_t i = rbegin; i < rend; ++i) {
        A* v = vbuf.data();  // becomes xhat
        A* g = gbuf.data();  // dy
        load_row<T, A>(x + i * n, nullptr, nullptr, v, n);
        load_row<T, A>(dy + i * n, nullptr, nullptr, g, n);
        const A mu = rms ? A(0) : mean[i];
        const A rs = rstd[i];
        A c1 = 0, c2 = 0;
        if (w) {
#pragma omp simd reduction(+ : c1, c2)
          for (int64_t j = 0; j < n; ++j) {
            v[j] = (v[j] - mu) * rs;
            const A wg = g[j] * static_cast<A>(w[j]);
            c1 += wg * v[j];
            c2 += wg;
          }
        } else {
#pragma omp simd reduction(+ : c1, c2)
          for (int64_t j = 0; j < n; ++j) {
            v[j] = (v[j] - mu) * rs;
            c1 += g[j] * v[j];
            c2 += g[j];
          }
        }
        c1 /= n;
        c2 = rms ? A(0) : c2 / n;
        T* dxr = dx + i * n;
        const T* dhr = dh ? dh + i * n : nullptr;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const A wg = w ? g[j] * static_cast<A>(w[j]) : g[j];
          A d = rs * (wg - v[j] * c1 - c2);
          if (dhr) d += static_cast<A>(dhr[j]);
          dxr[j] = static_cast<T>(d);
        }
        if (dwp) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) dwp[j] += g[j] * v[j];
        }
        if (dbp) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) dbp[j] += g[j];
        }
      }
    }
  });
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    double eps, bool rms) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "norm_fwd: x must be a contiguous 2-D tensor");
  const int64_t m = x.size(0), n = x.size(1);
  const bool has_res = residual.has_value() && residual->defined();
  auto y = at::empty_like(x);
  auto h = has_res ? at::empty_like(x) : at::empty({0}, x.options());
  auto sopt = x.options().dtype(stat_dtype(x));
  auto mean = rms ? at::empty({0}, sopt) : at::empty({m}, sopt);
  auto rstd = at::empty({m}, sopt);
  if (m == 0) return {y, h, mean, rstd};
  const bool dbl = x.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "norm_fwd_cpu", [&] {
    norm_fwd_kernel<scalar_t>(
        x.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(weight), ptr_or_null<scalar_t>(bias),
        ptr_or_null<scalar_t>(residual), y.data_ptr<scalar_t>(),
        has_res ? h.data_ptr<scalar_t>() : nullptr,
        (!rms && !dbl) ? mean.data_ptr<float>() : nullptr, (!rms && dbl) ? mean.data_ptr<double>() : nullptr,
        dbl ? nullptr : rstd.data_ptr<float>(), dbl ? rstd.data_ptr<double>() : nullptr, m, n, eps, rms);
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const OptTensor& dh, bool rms, bool has_bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && dy.sizes() == x.sizes() && dy.is_contiguous(),
              "norm_bwd: dy and x must be contiguous 2-D tensors of one shape");
  const int64_t m = x.size(0), n = x.size(1);
  const bool has_w = weight.has_value() && weight->defined();
  auto dx = at::empty_like(x);
  auto acc_opt = x.options().dtype(stat_dtype(x));
  // One partial row per thread, capped by the rows available.
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m));
  auto dw_part = has_w ? at::zeros({nparts, n}, acc_opt) : at::Tensor();
  auto db_part = has_bias ? at::zeros({nparts, n}, acc_opt) : at::Tensor();
  if (m > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "norm_bwd_cpu", [&] {
      using A = typename Acc<scalar_t>::type;
      norm_bwd_kernel<scalar_t>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(weight),
          ptr_or_null<scalar_t>(dh), rms ? nullptr : mean.data_ptr(), rstd.data_ptr(),
          dx.data_ptr<scalar_t>(), has_w ? dw_part.data_ptr<A>() : nullptr,
          has_bias ? db_part.data_ptr<A>() : nullptr, nparts, m, n, rms);
    });
  }
  auto dw = has_w ? dw_part.sum(0).to(weight->scalar_type()) : at::empty({0}, x.options());
  auto db = has_bias ? db_part.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dw, db};
}

}  // namespace fastlm
