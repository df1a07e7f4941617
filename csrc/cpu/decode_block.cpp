// One pre-norm Llama block (RMSNorm, rotary attention against a KV cache, SwiGLU MLP, every
// projection a quantized integer-dot linear) for one new token per sequence, in one call.
//
// It runs the very kernels the modules run (norm_fwd, quant_matmul_dot, rotary_pos_fwd,
// decode_attention, silu_mul_fwd), in their order and on the same inputs, so its results are the
// modules' to the bit. What it removes is the Python between them: at decode every kernel takes
// tens of microseconds and the layer's ~40 tensor ops and module calls around them took as long
// again (a 24-layer 0.65 B model on a 2-core AMD EPYC: ~18 of ~41 ms a token with the matmuls
// stubbed out).
//
// Between the matmuls the block tells fastlm's pool (cpu/pool.h) which weights come next: its
// helpers stay awake instead of sleeping through rotary and attention (waking one cost the next
// matmul ~35 us on an Intel Xeon VM), read the ends of the next weights into their caches while
// this thread works alone, and take decode attention's parallel tasks. The block ends with such a
// hint too, for the next block's first matmul.
#include <ATen/ATen.h>

#include <cstring>

#include "checks.h"
#include "cpu/pool.h"
#include "fastlm.h"

namespace fastlm {

namespace {

constexpr int kLinears = 5;  // qkv, proj, gate, up, down

struct Linears {
  at::TensorList q, s;
  const c10::List<std::optional<at::Tensor>>& z;
  at::IntArrayRef bits, group;

  // The pool's helpers stay awake for the linears `next` and read ahead their weights.
  void prepare(std::initializer_list<int> next) const {
    pool::Range r[pool::kMaxRanges];
    int n = 0;
    for (int i : next) {
      r[n++] = {q[i].data_ptr(), static_cast<int64_t>(q[i].nbytes())};
      r[n++] = {s[i].data_ptr(), static_cast<int64_t>(s[i].nbytes())};
    }
    pool::prepare(r, n);
  }

  at::Tensor operator()(int i, const at::Tensor& x) const {
    const std::optional<at::Tensor> zi = z.get(i);
    return quant_matmul_dot_cpu(x, q[i], s[i], zi, std::nullopt, bits[i], group[i]);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_block_cpu(
    const at::Tensor& x, const OptTensor& residual, const at::Tensor& norm1, const at::Tensor& norm2, double eps,
    at::TensorList qweights, at::TensorList scales, const c10::List<std::optional<at::Tensor>>& zeros,
    at::IntArrayRef bits, at::IntArrayRef group_sizes, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, int64_t position, int64_t n_head, int64_t n_kv_head, double theta,
    double scale) {
  const char* op = "decode_block";
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(1) == 1 && x.is_contiguous() &&
                  x.scalar_type() == at::kFloat,
              op, ": x must be a contiguous float32 (B, 1, C) CPU tensor, got ", x.scalar_type(), " of shape ",
              x.sizes());
  TORCH_CHECK(!present(residual) || residual->sizes() == x.sizes(), op, ": residual must have x's shape ",
              x.sizes(), ", got ", residual->sizes());
  TORCH_CHECK(qweights.size() == kLinears && scales.size() == kLinears && zeros.size() == kLinears &&
                  bits.size() == kLinears && group_sizes.size() == kLinears,
              op, ": qweights, scales, zeros, bits and group_sizes must hold ", kLinears,
              " entries each (qkv, proj, gate, up, down)");
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(n_head > 0 && n_kv_head > 0 && n_head % n_kv_head == 0 && C % n_head == 0, op, ": n_head ", n_head,
              " must divide C = ", C, " and be a multiple of n_kv_head ", n_kv_head);
  const int64_t Hq = n_head, Hk = n_kv_head, D = C / n_head;
  TORCH_CHECK(qweights[0].size(0) == (Hq + 2 * Hk) * D && qweights[1].size(0) == C, op,
              ": the qkv projection must have (n_head + 2 n_kv_head) x head_dim = ", (Hq + 2 * Hk) * D,
              " outputs and proj ", C, "; got ", qweights[0].size(0), " and ", qweights[1].size(0));
  TORCH_CHECK(qweights[4].size(0) == C, op, ": down must have C = ", C, " outputs, got ", qweights[4].size(0));
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == Hk && k_cache.size(3) == D &&
                  k_cache.is_contiguous() && k_cache.scalar_type() == at::kFloat && k_cache.device().is_cpu(),
              op, ": k_cache must be a contiguous float32 CPU tensor (", B, ", ", Hk, ", Tmax, ", D, "), got ",
              k_cache.scalar_type(), " of shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() && v_cache.scalar_type() == at::kFloat &&
                  v_cache.device().is_cpu(),
              op, ": v_cache must be contiguous and like k_cache ", k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK(position >= 0 && position < k_cache.size(2), op, ": position ", position, " must lie in [0, ",
              k_cache.size(2), "): the cache has no room for the new token");
  TORCH_CHECK(cache_seqlens.device().is_cpu() && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                  cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous(),
              op, ": cache_seqlens must be a contiguous int32 CPU tensor of shape (", B, ")");
  // The new token goes to `position` of every sequence, where decode_attention will look for it.
  int32_t* lens = cache_seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] == position, op, ": cache_seqlens[", b, "] = ", lens[b], " but position is ", position,
                "; every sequence must hold `position` tokens");
  }
  const Linears linear{qweights, scales, zeros, bits, group_sizes};
  linear.prepare({0});

  // h = x + residual; y = rms_norm(h)
  const at::Tensor x2 = x.view({B, C});
  const OptTensor r2 = present(residual) ? OptTensor(residual->view({B, C})) : std::nullopt;
  auto [y, h, unused_mean, unused_rstd] = norm_fwd_cpu(x2, norm1, std::nullopt, r2, eps, /*rms=*/true);
  if (!present(residual)) h = x2;

  // Attention: q, k, v of the new token, rotated to `position`, k and v into the cache.
  const at::Tensor qkv = linear(0, y);
  linear.prepare({1});
  const auto heads = [&](int64_t first, int64_t count) {
    return qkv.narrow(1, first * D, count * D).view({B, 1, count, D}).transpose(1, 2);
  };
  const at::Tensor positions = at::full({1, 1}, position, x.options().dtype(at::kLong));  // one angle table for the batch
  auto [q, k] = rotary_pos_fwd_cpu(heads(0, Hq), heads(Hq, Hk), positions, theta, D, false, false);
  // Plain copies of B x Hk rows of D floats: ATen's copy_ costs ~10 us a call at this size.
  const int64_t tmax = k_cache.size(2), n = qkv.size(1);
  const float* kr = k.data_ptr<float>();  // (B, Hk, 1, D), contiguous
  const float* vr = qkv.data_ptr<float>() + (Hq + Hk) * D;
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hk; ++g) {
      const int64_t off = ((b * Hk + g) * tmax + position) * D;
      std::memcpy(kc + off, kr + (b * Hk + g) * D, D * sizeof(float));
      std::memcpy(vc + off, vr + b * n + g * D, D * sizeof(float));
    }
    lens[b] += 1;
  }
  const at::Tensor att = decode_attention_cpu(q, k_cache, v_cache, cache_seqlens, scale);
  const at::Tensor o = linear(1, att.transpose(1, 2).reshape({B, C}));
  linear.prepare({2});

  // h = h + attn; y = rms_norm(h); mlp = down(silu(gate(y)) * up(y))
  auto [y2, h2, unused_mean2, unused_rstd2] = norm_fwd_cpu(o, norm2, std::nullopt, h, eps, /*rms=*/true);
  const at::Tensor gate = linear(2, y2), up = linear(3, y2);
  linear.prepare({4});
  const at::Tensor a = silu_mul_fwd_cpu(gate, up);
  at::Tensor out = linear(4, a).view({B, 1, C});
  linear.prepare({});  // the next block's first matmul
  return {out, h2.view({B, 1, C})};
}

}  // namespace fastlm
