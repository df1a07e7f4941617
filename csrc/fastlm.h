// Host entry points of fastlm._C. Each op has one CPU and (when built with CUDA) one CUDA
// implementation with the same signature; csrc/registration.cpp binds them to torch.ops.fastlm_C.
//
// Contract shared by every backend (fastlm/ops/*.py validates arguments before calling):
// tensors are contiguous and on one device, optional tensors absent are passed as undefined, and
// outputs that do not apply come back as empty tensors.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace fastlm {

using OptTensor = std::optional<at::Tensor>;

// Layer norm (rms=false) or RMS norm (rms=true) over the last dim of x (M, N).
// With residual: h = x + residual is formed (rounded to x's dtype), returned, and normalised.
// Returns (y, h or empty, mean (M) or empty for rms, rstd (M)); stats are float32, or float64
// for float64 input.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    double eps, bool rms);

// Gradients of norm_fwd. x is the normalised input (h when a residual was added); dh, when
// given, is the gradient arriving at the h output and is added to dx.
// Returns (dx, dweight or empty, dbias or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const OptTensor& dh, bool rms, bool has_bias);

// Embedding lookup: out[i, :] = weight[ids[i], :] for ids (n) int32 or int64 and weight (V, D).
// Any id outside [0, V) raises IndexError naming the value; no row outside the table is read.
at::Tensor embedding_fwd_cpu(const at::Tensor& ids, const at::Tensor& weight);

// Token plus position embedding (the GPT input layer), ids (B, T):
// out[b, t, :] = tok[ids[b, t], :] + pos[start_pos + t, :]; requires start_pos + T <= P.
at::Tensor tok_pos_embedding_fwd_cpu(const at::Tensor& ids, const at::Tensor& tok,
                                     const at::Tensor& pos, int64_t start_pos);

// Gradient of the table: dweight (V, D) in dout's dtype, dweight[v] = sum of dout[i] over the
// i with ids[i] == v, accumulated in float32; row padding_idx (-1: none) stays zero. With
// `deterministic` the summation order is fixed, so the result is bitwise reproducible.
at::Tensor embedding_bwd_cpu(const at::Tensor& dout, const at::Tensor& ids, int64_t num_weights,
                             int64_t padding_idx, bool deterministic);

#ifdef FASTLM_WITH_CUDA
at::Tensor embedding_fwd_cuda(const at::Tensor& ids, const at::Tensor& weight);
at::Tensor tok_pos_embedding_fwd_cuda(const at::Tensor& ids, const at::Tensor& tok,
                                      const at::Tensor& pos, int64_t start_pos);
at::Tensor embedding_bwd_cuda(const at::Tensor& dout, const at::Tensor& ids, int64_t num_weights,
                              int64_t padding_idx, bool deterministic);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cuda(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
    double eps, bool rms);
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const OptTensor& dh, bool rms, bool has_bias);
#endif

}  // namespace fastlm
