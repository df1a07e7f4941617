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

// Attention, flash style: softmax(q k^T * scale + mask) v without a Tq x Tk intermediate.
// q (B, Hq, Tq, D), k and v (B, Hk, Tk, D), Hq a multiple of Hk: query head h reads key/value head
// h / (Hq / Hk) (grouped-query attention). mask, when given, is a float32 additive bias of shape
// (B, Hq, Tq, Tk) whose strides are honoured (0 for a broadcast dim; stride(3) is 1 or 0), so a
// key-padding mask (B, 1, 1, Tk) is passed expanded, never materialised. is_causal keeps key j
// for query i only when j <= i (torch's top-left alignment). A query row with every key masked
// gives zeros, and lse = -inf.
// Returns (out (B, Hq, Tq, D) in q's dtype, lse (B, Hq, Tq) float32, or float64 for float64
// input): lse is the natural-log log-sum-exp of each scaled, masked score row.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mask,
    bool is_causal, double scale);

// Gradients of attention_fwd: (dq, dk, dv) with the shapes and dtypes of q, k, v (dk and dv summed
// over the query heads that share a key/value head). out and lse are attention_fwd's outputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptTensor& mask, bool is_causal,
    double scale);

// Decoding against a KV cache. q (B, Hq, Tn, D) holds the Tn newest tokens of each sequence;
// k_cache and v_cache (B, Hk, Tmax, D) hold seqlens[b] valid positions (the new tokens included,
// already written) for sequence b. cache_seqlens (B) int32 or int64, Tn <= seqlens[b] <= Tmax.
// Query i of sequence b sits at position seqlens[b] - Tn + i and attends keys 0..that position.
// Returns out (B, Hq, Tn, D) in q's dtype. Forward only.
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                double scale);
// decode_attention_cpu whose sequence b attends keys cache_starts[b] .. seqlens[b] - 1 only
// (its first positions padding), for one new float32 token (Tn = 1); cache_starts (B) int32 or absent.
at::Tensor decode_attention_from_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& cache_seqlens, const OptTensor& cache_starts, double scale);

// Weight-only quantized linear: y = x dequant(W)^T + bias, accumulated in float32, never
// materialising a float copy of W. x (M, K); y (M, N) in x's dtype. The layout (fastlm/quant.py
// documents it in full): bits 8: qweight int8 (N, K), per output channel, group_size == K.
// bits 4: qweight uint8 (N, K / 2), element k of row n in byte k / 2, low nibble for even k,
// high nibble for odd k, unsigned 0..15. scales float32 (N, K / group_size); zeros float32 of the
// same shape or absent. W[n, k] = (q - zero) * scale of k's group, where zero is 0 for int8 and
// 8 for int4 without zeros. bias (N) in x's dtype or absent.
at::Tensor quant_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const OptTensor& zeros, const OptTensor& bias, int64_t bits,
                            int64_t group_size);

// The same product with x quantized to int8 per block of 32 along K (d = absmax / 127) and int32
// dot products (csrc/cpu/quant_dot.h): K a multiple of 32, int4 group_size 32, 64 or 128. scales
// (and zeros) may also be bfloat16 or float16. quant_dot_isa(force) names the instruction set it
// runs (force: -1 query, 0 automatic, 1 avx2, 2 avx512_vnni, 3 avx_vnni).
at::Tensor quant_matmul_dot_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const OptTensor& zeros, const OptTensor& bias, int64_t bits,
                                int64_t group_size);
std::string quant_dot_isa(int64_t force);

// Bias + GELU: y = gelu(x + bias) for x (M, N) contiguous and bias (N) in x's dtype or absent;
// tanh picks the tanh approximation, else the exact (erf) GELU. Computed in float32 (float64 for
// float64 input), x + bias never rounded to x's dtype. Returns y in x's dtype.
at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const OptTensor& bias, bool tanh);

// Gradients of bias_gelu_fwd from the saved input x: dx = dy * gelu'(x + bias) in x's dtype, and
// with need_dbias the column sum of dx over the M rows, accumulated and returned in float32
// (float64 for float64 input); an empty tensor without.
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                     const OptTensor& bias, bool tanh, bool need_dbias);

// SiLU times gate (the SwiGLU MLP's activation): y = silu(gate) * up for gate and up (M, N) of one
// dtype with unit column stride and any row stride that keeps rows apart (the two halves of a fused
// (M, 2N) gate_up projection are read in place). Computed in float32 (float64 for float64 input).
// Returns y (M, N), contiguous, in gate's dtype.
at::Tensor silu_mul_fwd_cpu(const at::Tensor& gate, const at::Tensor& up);

// Gradients of silu_mul_fwd, recomputing the sigmoid: dgate = dy * up * silu'(gate) and
// dup = dy * silu(gate), for dy laid out as gate may be. Returns (dgate, dup), contiguous.
std::tuple<at::Tensor, at::Tensor> silu_mul_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate,
                                                    const at::Tensor& up);

// The argument check both backends' silu_mul entry points share (dy may be null); defined in
// csrc/cpu/activation.cpp.
void check_silu_mul(const char* op, const at::Tensor& gate, const at::Tensor& up, const at::Tensor* dy,
                    at::DeviceType type);

// Rotary position embedding: q (B, Hq, T, D) and k (B, Hk, T, D), any strides with a unit one on
// the last dim, rotated by cos and sin (Bc, T, R), Bc 1 or B, float32 (float64 for float64 q);
// R even and <= D, channels R.. pass through. Pairs are (i, i + R/2) (rotate-half, as Llama) or
// (2i, 2i + 1) (interleaved, as GPT-J): a' = a cos_a - b sin_a, b' = b cos_b + a sin_b. With
// `backward` the transpose is applied instead (a' = a cos_a + b sin_b, b' = b cos_b - a sin_a),
// which is the gradient of the forward. Returns (q', k') contiguous in q's dtype.
std::tuple<at::Tensor, at::Tensor> rotary_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                  const at::Tensor& sin, bool interleaved, bool backward);

// rotary_fwd with the angles made inside: position p = positions[b, t] (positions (Bp, T) int64,
// Bp 1 or B), pair i's angle p * theta^(-2i / rotary_dim), cos and sin taken in float64.
std::tuple<at::Tensor, at::Tensor> rotary_pos_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& positions, double theta, int64_t rotary_dim,
                                                      bool interleaved, bool backward);

// rotary_pos_fwd's float32 angles for positions (1, T), rotate-half layout, as a rotary_fwd table
// (2, 1, T, rotary_dim): [0] the cos rows, [1] the sin rows. rotary_fwd_cpu over it rotates float32
// q and k to the same bits as rotary_pos_fwd_cpu does.
at::Tensor rotary_pos_table_cpu(const at::Tensor& positions, double theta, int64_t rotary_dim);

// A stack of L pre-norm Llama blocks at decode on the CPU (csrc/cpu/decode_block.cpp): x (B, 1, C)
// float32, the previous sub-layer's output, and residual of x's shape or absent (the first block
// of the model: x is the stream). Block l:
// h = x + residual, y = rms_norm(h) * norm1[l]; the qkv projection, q and k rotated (theta) to
// `position`, k and v written at `position` of k_caches[l] / v_caches[l] (B, Hk, Tmax, D),
// cache_seqlens[l] (B) int32, all equal to position, advanced by one; decode attention (scale),
// proj; h += that, y = rms_norm(h) * norm2[l]; x = down(silu(gate(y)) * up(y)), residual = h. The
// five projections of block l (qkv, proj, gate, up, down) are entries 5 l .. 5 l + 4 of the
// quant_matmul_dot weight lists (biases optional); or seven, 7 l .. 7 l + 6, with q, k and v apart
// (a transformers attention's q_proj, k_proj, v_proj). The rotary angles are position * theta^(-2i/D)
// made inside, or the caller's float32 table cos, sin (1 or B, 1, rotary_dim) in rotate-half layout,
// theta then unused. q_norms / k_norms (one (D) weight per block, or none): each head of q and k
// rms-normalised over D before rotary (Qwen3). head_dim D: 0 means C / n_head; proj takes Hq D.
// cache_starts (B) int32, or absent: sequence b's first cache_starts[b] positions are padding that
// attention skips (a left-padded batch); its rotary position then comes with the table.
// Every block is checked before the first runs.
// Returns the last block's (mlp out, h), both (B, 1, C).
std::tuple<at::Tensor, at::Tensor> decode_blocks_cpu(
    const at::Tensor& x, const OptTensor& residual, at::TensorList norm1, at::TensorList norm2, double eps,
    at::TensorList qweights, at::TensorList scales, const c10::List<std::optional<at::Tensor>>& zeros,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef bits, at::IntArrayRef group_sizes,
    at::TensorList k_caches, at::TensorList v_caches, at::TensorList cache_seqlens, int64_t position, int64_t n_head,
    int64_t n_kv_head, double theta, double scale, at::TensorList q_norms, at::TensorList k_norms, int64_t head_dim,
    const OptTensor& cos, const OptTensor& sin, const OptTensor& cache_starts);

#ifdef FASTLM_WITH_CUDA
at::Tensor quant_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const OptTensor& zeros, const OptTensor& bias, int64_t bits,
                             int64_t group_size);
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mask,
    bool is_causal, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptTensor& mask, bool is_causal,
    double scale);
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                 double scale);
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
at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x, const OptTensor& bias, bool tanh);
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                      const OptTensor& bias, bool tanh, bool need_dbias);
at::Tensor silu_mul_fwd_cuda(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> silu_mul_bwd_cuda(const at::Tensor& dy, const at::Tensor& gate,
                                                     const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> rotary_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                   const at::Tensor& sin, bool interleaved, bool backward);
std::tuple<at::Tensor, at::Tensor> rotary_pos_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& positions, double theta, int64_t rotary_dim,
                                                       bool interleaved, bool backward);
#endif

}  // namespace fastlm
