// Argument checks shared by the CPU and CUDA entry points, so both backends word a broken
// contract alike. fastlm/ops/*.py validates user input first; these guard direct callers of
// torch.ops.fastlm_C.* from out-of-bounds memory access.
#pragma once

#include <ATen/ATen.h>

#include <climits>
#include <optional>
#include <string>

namespace fastlm {

// An optional tensor argument was passed (Python None arrives as nullopt or an undefined tensor).
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// tok_pos_embedding: ids (B, T); tok (V, D) and pos (P, D) of one dtype; start_pos + T <= P.
inline void check_tok_pos(const at::Tensor& ids, const at::Tensor& tok, const at::Tensor& pos, int64_t start_pos) {
  TORCH_CHECK(ids.dim() == 2, "tok_pos_embedding: ids must be 2-D (batch, time)");
  TORCH_CHECK(tok.size(1) == pos.size(1) && tok.scalar_type() == pos.scalar_type(),
              "tok_pos_embedding: tok and pos must share width and dtype");
  const int64_t t = ids.size(1);
  TORCH_CHECK(start_pos >= 0 && start_pos + t <= pos.size(0), "tok_pos_embedding: start_pos ", start_pos,
              " + ", t, " positions exceeds the position table's ", pos.size(0), " rows");
}

// The tensor checks below word a broken contract alike on both backends: "<op> (<device>):
// <argument> ...". `type` is the entry point's device type; float64 is a CPU-only dtype.
inline std::string where(const char* op, at::DeviceType type) {
  return std::string(op) + " (" + c10::DeviceTypeName(type, /*lower_case=*/true) + ")";
}

// x: a contiguous 2-D (M, N) tensor on a `type` device, in a float dtype that backend computes in.
inline void check_rows(const char* op, const char* name, const at::Tensor& x, at::DeviceType type) {
  const auto w = where(op, type);
  TORCH_CHECK(x.device().type() == type, w, ": ", name, " must be a ", c10::DeviceTypeName(type, true),
              " tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), w, ": ", name, " must be a contiguous 2-D tensor, got shape ",
              x.sizes(), x.dim() == 2 ? " (not contiguous)" : "");
  const auto dt = x.scalar_type();
  const bool ok = dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat ||
                  (dt == at::kDouble && type == at::kCPU);
  TORCH_CHECK(ok, w, ": ", name, " has dtype ", dt, "; this backend supports float16, bfloat16, float32",
              type == at::kCPU ? " and float64" : "");
  // The GPU kernels index a row with 32-bit ints.
  TORCH_CHECK(type == at::kCPU || x.size(1) <= INT_MAX, w, ": ", name, " has rows longer than ", INT_MAX,
              " elements");
}

// t: contiguous, of shape `sizes` and dtype `dtype`, on x's device.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                       at::IntArrayRef sizes, at::ScalarType dtype, at::DeviceType type) {
  const auto w = where(op, type);
  TORCH_CHECK(t.defined(), w, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == x.device(), w, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == dtype, w, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.sizes() == sizes, w, ": ", name, " has shape ", t.sizes(), ", expected ", sizes);
  TORCH_CHECK(t.is_contiguous(), w, ": ", name, " must be contiguous");
}

// The dtype of the norm statistics (mean, rstd) and of the CPU's partial sums for x.
inline at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// norm_fwd: x (M, N); weight and bias (N) and residual (M, N) in x's dtype, when present.
inline void check_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                           at::DeviceType type) {
  check_rows("norm_fwd", "x", x, type);
  const int64_t n = x.size(1);
  if (present(weight)) check_like("norm_fwd", "weight", *weight, x, {n}, x.scalar_type(), type);
  if (present(bias)) check_like("norm_fwd", "bias", *bias, x, {n}, x.scalar_type(), type);
  if (present(residual)) check_like("norm_fwd", "residual", *residual, x, x.sizes(), x.scalar_type(), type);
}

// norm_bwd: dy and dh like x (M, N); weight (N); mean (M, unread for rms) and rstd (M) in the
// statistics' dtype.
inline void check_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& dh,
                           bool rms, at::DeviceType type) {
  check_rows("norm_bwd", "x", x, type);
  const int64_t m = x.size(0), n = x.size(1);
  check_like("norm_bwd", "dy", dy, x, x.sizes(), x.scalar_type(), type);
  if (present(weight)) check_like("norm_bwd", "weight", *weight, x, {n}, x.scalar_type(), type);
  if (present(dh)) check_like("norm_bwd", "dh", *dh, x, x.sizes(), x.scalar_type(), type);
  if (!rms) check_like("norm_bwd", "mean", mean, x, {m}, stat_dtype(x), type);
  check_like("norm_bwd", "rstd", rstd, x, {m}, stat_dtype(x), type);
}

// bias_gelu_fwd / _bwd: x (M, N), bias (N) in x's dtype when present, dy (when given) like x.
inline void check_bias_gelu(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                            const at::Tensor* dy, at::DeviceType type) {
  check_rows(op, "x", x, type);
  if (present(bias)) check_like(op, "bias", *bias, x, {x.size(1)}, x.scalar_type(), type);
  if (dy != nullptr) check_like(op, "dy", *dy, x, x.sizes(), x.scalar_type(), type);
}

// rotary_fwd / rotary_pos_fwd: q (B, Hq, T, D) and k (B, Hk, T, D) of one float dtype on one device,
// each with a unit stride on the channel dim (other strides are free).
inline void check_rotary_qk(const char* op, const at::Tensor& q, const at::Tensor& k, at::DeviceType type) {
  const auto w = where(op, type);
  for (const auto* t : {&q, &k}) {
    const char* name = t == &q ? "q" : "k";
    TORCH_CHECK(t->device().type() == type, w, ": ", name, " must be a ", c10::DeviceTypeName(type, true),
                " tensor, got one on ", t->device());
    TORCH_CHECK(t->dim() == 4, w, ": ", name, " must be 4-D (batch, heads, time, head_dim), got shape ", t->sizes());
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, w, ": ", name, " must have a unit stride on its last dim");
  }
  const auto dt = q.scalar_type();
  const bool ok = dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || (dt == at::kDouble && type == at::kCPU);
  TORCH_CHECK(ok, w, ": q has dtype ", dt, "; this backend supports float16, bfloat16, float32",
              type == at::kCPU ? " and float64" : "");
  TORCH_CHECK(k.scalar_type() == dt && k.device() == q.device(), w, ": k must have q's dtype and device, got ",
              k.scalar_type(), " on ", k.device());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), w,
              ": k ", k.sizes(), " must match q ", q.sizes(), " in batch, time and head_dim");
}

// The angles' dtype: float32, or float64 for float64 q.
inline at::ScalarType rotary_angle_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// rotary_fwd: cos and sin (Bc, T, R) contiguous in the angles' dtype, Bc 1 or B, R even and <= D.
inline void check_rotary_table(const at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin, at::DeviceType type) {
  const auto w = where("rotary_fwd", type);
  for (const auto* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    TORCH_CHECK(t->dim() == 3, w, ": ", name, " must be 3-D (batch, time, rotary_dim), got shape ", t->sizes());
    TORCH_CHECK(t->size(0) == 1 || t->size(0) == q.size(0), w, ": ", name, " has batch ", t->size(0),
                "; expected 1 or q's ", q.size(0));
    check_like("rotary_fwd", name, *t, q, {t->size(0), q.size(2), cos.size(2)}, rotary_angle_dtype(q), type);
  }
  const int64_t r = cos.size(2);
  TORCH_CHECK(r % 2 == 0 && r <= q.size(3), w, ": rotary_dim ", r, " must be even and at most head_dim ", q.size(3));
}

// rotary_pos_fwd: positions (Bp, T) int64 contiguous, Bp 1 or B; theta > 0; rotary_dim even, <= D.
inline void check_rotary_positions(const at::Tensor& q, const at::Tensor& positions, double theta,
                                   int64_t rotary_dim, at::DeviceType type) {
  const auto w = where("rotary_pos_fwd", type);
  TORCH_CHECK(positions.dim() == 2 && (positions.size(0) == 1 || positions.size(0) == q.size(0)), w,
              ": positions must have shape (1 or ", q.size(0), ", ", q.size(2), "), got ", positions.sizes());
  check_like("rotary_pos_fwd", "positions", positions, q, {positions.size(0), q.size(2)}, at::kLong, type);
  TORCH_CHECK(theta > 0, w, ": theta must be positive, got ", theta);
  TORCH_CHECK(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= q.size(3), w, ": rotary_dim ", rotary_dim,
              " must be even, non-negative and at most head_dim ", q.size(3));
}

}  // namespace fastlm
