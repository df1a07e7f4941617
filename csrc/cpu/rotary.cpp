// Rotary position embedding on the CPU: q and k rotated in one pass each, by cos/sin tables
// (rotary_fwd) or by angles made here from positions and the base (rotary_pos_fwd).
//
// A row of D channels holds R / 2 rotated pairs (a, b) and D - R channels that pass through:
// (i, i + R/2) in the rotate-half layout, (2i, 2i + 1) interleaved. With c, s the cos/sin rows
// (R entries each: a pair reads its own entries, which the usual tables repeat),
//   forward   a' = a c_a - b s_a,   b' = b c_b + a s_b
//   backward  a' = a c_a + b s_b,   b' = b c_b - a s_a     (the transpose of forward: its gradient)
// so the gradient is the same kernel with `backward` set, and never a second table.
//
// Work is split into tasks of (batch, a block of kTB positions). A task takes the cos/sin rows of
// its positions once (from the table, or computed into a small buffer: R / 2 sin/cos in double
// per position, shared by every head) and then rotates those positions of every q and k head;
// a head's kTB rows are contiguous in the output, and in the input for the usual layouts.
// Inputs may have any strides but a unit one on the channel dim (q and k as views of a fused
// QKV projection are read in place); outputs are contiguous (B, H, T, D).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/vec.h"
#include "checks.h"
#include "fastlm.h"

namespace fastlm {
namespace {

using vec::kW;

constexpr int64_t kTB = 16;  // positions per task
// Channels a parallel task should rotate at least: a decode step's task (one position of every
// head, ~2K channels) is a microsecond of work, less than waking an OpenMP worker, whose core may
// be held by the spinning helper of fastlm's pool (cpu/pool.h) besides.
constexpr int64_t kTaskChannels = 1 << 15;

// One head's rows: element (b, h, t, :) at src + b * sb + h * sh + t * st.
struct Heads {
  const void* src;
  void* dst;
  int64_t n, sb, sh, st;
};

template <typename T, typename C>
inline void pair_scalar(const T* x, T* y, const C* c, const C* s, int64_t a, int64_t b, bool backward) {
  const C xa = static_cast<C>(x[a]), xb = static_cast<C>(x[b]);
  if (backward) {
    y[a] = static_cast<T>(xa * c[a] + xb * s[b]);
    y[b] = static_cast<T>(xb * c[b] - xa * s[a]);
  } else {
    y[a] = static_cast<T>(xa * c[a] - xb * s[a]);
    y[b] = static_cast<T>(xb * c[b] + xa * s[b]);
  }
}

// Rotate-half, eight pairs (i .. i + 7, and i + h ..) a step.
template <typename T>
inline void half_vec(const T* x, T* y, const float* c, const float* s, int64_t h, bool backward) {
  int64_t i = 0;
  for (; i + kW <= h; i += kW) {
    const __m256 a = vec::load(x + i), b = vec::load(x + i + h);
    const __m256 ca = _mm256_loadu_ps(c + i), cb = _mm256_loadu_ps(c + i + h);
    const __m256 sa = _mm256_loadu_ps(s + i), sb = _mm256_loadu_ps(s + i + h);
    if (backward) {
      vec::store(y + i, _mm256_fmadd_ps(b, sb, _mm256_mul_ps(a, ca)));
      vec::store(y + i + h, _mm256_fnmadd_ps(a, sa, _mm256_mul_ps(b, cb)));
    } else {
      vec::store(y + i, _mm256_fnmadd_ps(b, sa, _mm256_mul_ps(a, ca)));
      vec::store(y + i + h, _mm256_fmadd_ps(a, sb, _mm256_mul_ps(b, cb)));
    }
  }
  for (; i < h; ++i) pair_scalar(x, y, c, s, i, i + h, backward);
}

// Interleaved, four pairs a step: with x~ the vector with each pair swapped,
//   forward  y = x c -+ x~ s        (fmaddsub: subtract in even lanes, add in odd)
//   backward y = x c +- (x s)~      (fmsubadd: add in even lanes, subtract in odd)
template <typename T>
inline void interleaved_vec(const T* x, T* y, const float* c, const float* s, int64_t r, bool backward) {
  int64_t j = 0;
  for (; j + kW <= r; j += kW) {
    const __m256 v = vec::load(x + j), cc = _mm256_loadu_ps(c + j), ss = _mm256_loadu_ps(s + j);
    if (backward) {
      const __m256 u = _mm256_permute_ps(_mm256_mul_ps(v, ss), 0xB1);
      vec::store(y + j, _mm256_fmsubadd_ps(v, cc, u));
    } else {
      vec::store(y + j, _mm256_fmaddsub_ps(v, cc, _mm256_mul_ps(_mm256_permute_ps(v, 0xB1), ss)));
    }
  }
  for (; j < r; j += 2) pair_scalar(x, y, c, s, j, j + 1, backward);
}

template <typename T, typename C>
inline void rotate_row(const T* x, T* y, const C* c, const C* s, int64_t r, int64_t d, bool interleaved,
                       bool backward) {
  if constexpr (std::is_same_v<C, float>) {
    if (interleaved) interleaved_vec(x, y, c, s, r, backward); else half_vec(x, y, c, s, r / 2, backward);
  } else {
    for (int64_t i = 0; i < r / 2; ++i) {
      const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + r / 2;
      pair_scalar(x, y, c, s, a, b, backward);
    }
  }
  if (r < d) std::memcpy(y + r, x + r, (d - r) * sizeof(T));
}

// Where a task's cos/sin rows come from: a (Bc, T, R) table, or positions (Bp, T) and 1 / freq.
template <typename C>
struct Angles {
  const C* cos = nullptr;
  const C* sin = nullptr;
  int64_t table_batches = 0;
  const int64_t* positions = nullptr;
  int64_t position_batches = 0;
  std::vector<double> inv_freq;
};

// Rows of positions t0 .. t0 + n of batch b: pointers into the table, or computed into buf
// (2 * kTB * R: cos rows then sin rows) in the layout the table would have.
template <typename C>
void angle_rows(const Angles<C>& an, int64_t b, int64_t t0, int64_t n, int64_t t_len, int64_t r,
                bool interleaved, C* buf, const C** c, const C** s) {
  if (an.cos != nullptr) {
    const int64_t off = ((an.table_batches == 1 ? 0 : b) * t_len + t0) * r;
    *c = an.cos + off;
    *s = an.sin + off;
    return;
  }
  const int64_t* pos = an.positions + (an.position_batches == 1 ? 0 : b) * t_len + t0;
  C* cb = buf;
  C* sb = buf + kTB * r;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < r / 2; ++i) {
      const double angle = static_cast<double>(pos[t]) * an.inv_freq[i];
      const C cv = static_cast<C>(std::cos(angle)), sv = static_cast<C>(std::sin(angle));
      const int64_t a = interleaved ? 2 * i : i, bb = interleaved ? 2 * i + 1 : i + r / 2;
      cb[t * r + a] = cb[t * r + bb] = cv;
      sb[t * r + a] = sb[t * r + bb] = sv;
    }
  }
  *c = cb;
  *s = sb;
}

template <typename T, typename C>
void rotate_all(const Heads* parts, int64_t batch, int64_t t_len, int64_t d, int64_t r, const Angles<C>& an,
                bool interleaved, bool backward) {
  const int64_t blocks = (t_len + kTB - 1) / kTB;
  const int64_t task_channels = (parts[0].n + parts[1].n) * std::min(kTB, t_len) * d;
  const int64_t grain = std::max<int64_t>(1, kTaskChannels / std::max<int64_t>(1, task_channels));
  at::parallel_for(0, batch * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<C> buf(an.cos != nullptr ? 0 : 2 * kTB * r);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, t0 = (task % blocks) * kTB, n = std::min(kTB, t_len - t0);
      const C *c, *s;
      angle_rows(an, b, t0, n, t_len, r, interleaved, buf.data(), &c, &s);
      for (int p = 0; p < 2; ++p) {
        const Heads& hd = parts[p];
        const T* src = static_cast<const T*>(hd.src);
        T* dst = static_cast<T*>(hd.dst);
        for (int64_t h = 0; h < hd.n; ++h) {
          for (int64_t t = 0; t < n; ++t) {
            const T* x = src + b * hd.sb + h * hd.sh + (t0 + t) * hd.st;
            T* y = dst + ((b * hd.n + h) * t_len + t0 + t) * d;
            rotate_row(x, y, c + t * r, s + t * r, r, d, interleaved, backward);
          }
        }
      }
    }
  });
}

template <typename C>
std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& q, const at::Tensor& k, int64_t r, const Angles<C>& an,
                                       bool interleaved, bool backward) {
  auto qo = at::empty(q.sizes(), q.options());
  auto ko = at::empty(k.sizes(), k.options());
  const int64_t batch = q.size(0), t_len = q.size(2), d = q.size(3);
  if (qo.numel() + ko.numel() == 0) return {qo, ko};
  const Heads parts[2] = {
      {q.data_ptr(), qo.data_ptr(), q.size(1), q.stride(0), q.stride(1), q.stride(2)},
      {k.data_ptr(), ko.data_ptr(), k.size(1), k.stride(0), k.stride(1), k.stride(2)}};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_cpu", [&] {
    // float64 tensors come with float64 angles, the rest with float ones (checked by the caller).
    if constexpr (std::is_same_v<scalar_t, double> == std::is_same_v<C, double>)
      rotate_all<scalar_t, C>(parts, batch, t_len, d, r, an, interleaved, backward);
  });
  return {qo, ko};
}

// The cos/sin rows of positions (1, T) into out (2, 1, T, R): cos rows, then sin rows, the layout
// of a rotary_fwd table.
template <typename C>
void fill_table(const Angles<C>& an, int64_t t_len, int64_t r, bool interleaved, C* out) {
  const int64_t blocks = (t_len + kTB - 1) / kTB;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<C> buf(2 * kTB * r);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t0 = blk * kTB, n = std::min(kTB, t_len - t0);
      const C *c, *s;
      angle_rows(an, 0, t0, n, t_len, r, interleaved, buf.data(), &c, &s);
      std::memcpy(out + t0 * r, c, n * r * sizeof(C));
      std::memcpy(out + (t_len + t0) * r, s, n * r * sizeof(C));
    }
  });
}

// One set of positions for a whole batch (training, a prompt): its table is made once, here,
// rather than by every batch row's tasks; the sines and cosines would otherwise cost as much as
// the rotation itself at small head counts.
template <typename C>
std::tuple<at::Tensor, at::Tensor> run_positions(const at::Tensor& q, const at::Tensor& k, int64_t r,
                                                 const Angles<C>& an, bool interleaved, bool backward) {
  if (an.position_batches != 1 || q.size(0) <= 1 || r == 0) return run(q, k, r, an, interleaved, backward);
  const int64_t t_len = q.size(2);
  auto tab = at::empty({2, 1, t_len, r}, q.options().dtype(rotary_angle_dtype(q)));
  C* out = tab.data_ptr<C>();
  fill_table(an, t_len, r, interleaved, out);
  Angles<C> table;
  table.cos = out;
  table.sin = out + t_len * r;
  table.table_batches = 1;
  return run(q, k, r, table, interleaved, backward);
}

// theta ** (-2i / R), as transformers' inv_freq, but in double.
template <typename C>
Angles<C> position_angles(const at::Tensor& positions, double theta, int64_t rotary_dim) {
  Angles<C> an;
  an.positions = positions.data_ptr<int64_t>();
  an.position_batches = positions.size(0);
  for (int64_t i = 0; i < rotary_dim / 2; ++i)
    an.inv_freq.push_back(std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(rotary_dim)));
  return an;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                  const at::Tensor& sin, bool interleaved, bool backward) {
  check_rotary_qk("rotary_fwd", q, k, at::kCPU);
  check_rotary_table(q, cos, sin, at::kCPU);
  const int64_t r = cos.size(2);
  if (q.scalar_type() == at::kDouble) {
    Angles<double> an{cos.data_ptr<double>(), sin.data_ptr<double>(), cos.size(0)};
    return run(q, k, r, an, interleaved, backward);
  }
  Angles<float> an{cos.data_ptr<float>(), sin.data_ptr<float>(), cos.size(0)};
  return run(q, k, r, an, interleaved, backward);
}

std::tuple<at::Tensor, at::Tensor> rotary_pos_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& positions, double theta, int64_t rotary_dim,
                                                      bool interleaved, bool backward) {
  check_rotary_qk("rotary_pos_fwd", q, k, at::kCPU);
  check_rotary_positions(q, positions, theta, rotary_dim, at::kCPU);
  if (q.scalar_type() == at::kDouble) {
    return run_positions(q, k, rotary_dim, position_angles<double>(positions, theta, rotary_dim), interleaved,
                         backward);
  }
  return run_positions(q, k, rotary_dim, position_angles<float>(positions, theta, rotary_dim), interleaved, backward);
}

at::Tensor rotary_pos_table_cpu(const at::Tensor& positions, double theta, int64_t rotary_dim) {
  TORCH_CHECK(positions.device().is_cpu() && positions.dim() == 2 && positions.size(0) == 1 &&
                  positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "rotary_pos_table: positions must be a contiguous (1, T) int64 CPU tensor");
  TORCH_CHECK(theta > 0 && rotary_dim >= 0 && rotary_dim % 2 == 0, "rotary_pos_table: theta must be positive and ",
              "rotary_dim even, got ", theta, " and ", rotary_dim);
  const int64_t t_len = positions.size(1);
  auto tab = at::empty({2, 1, t_len, rotary_dim}, positions.options().dtype(at::kFloat));
  if (rotary_dim > 0) fill_table(position_angles<float>(positions, theta, rotary_dim), t_len, rotary_dim, false,
                                 tab.data_ptr<float>());
  return tab;
}

}  // namespace fastlm
