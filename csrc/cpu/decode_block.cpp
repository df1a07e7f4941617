// Pre-norm Llama blocks (RMSNorm, rotary attention against a KV cache, SwiGLU MLP, every
// projection a quantized integer-dot linear) for one new token per sequence: a stack of them in
// one call. q, k and v come from one projection (fastlm's model) or three (a transformers Llama).
//
// It runs the very kernels the modules run (norm_fwd, quant_matmul_dot, rotary_pos_fwd,
// decode_attention, silu_mul_fwd), in their order and on the same inputs, so its results are the
// modules' to the bit. What it removes is the Python between them: at decode every kernel takes
// tens of microseconds and the layer's ~40 tensor ops and module calls around them took as long
// again (a 24-layer 0.65 B model on a 2-core AMD EPYC: ~18 of ~41 ms a token with the matmuls
// stubbed out). Between the blocks of a stack no Python runs either: each block's matmuls stream
// megabytes of weights through this core's caches, and the Python of the next block's call then
// ran from memory, ~120 us a block where it takes ~11 hot (Intel Xeon, 0.65 B, batch 1).
//
// Between the matmuls the block tells fastlm's pool (cpu/pool.h) which weights come next: its
// helpers stay awake instead of sleeping through rotary and attention (waking one cost the next
// matmul ~35 us on an Intel Xeon VM), read the ends of the next weights into their caches while
// this thread works alone, and take decode attention's parallel tasks. A block ends with such a
// hint for the next block's first matmul.
#include <ATen/ATen.h>

#include <cstring>

#include "checks.h"
#include "cpu/pool.h"
#include "fastlm.h"

namespace fastlm {

namespace {

constexpr int kLinears = 5;  // qkv, proj, gate, up, down
constexpr int kSplit = 7;    // q, k, v, proj, gate, up, down (a transformers attention's three projections)

// Block l's projections: entries per * l .. per * l + per - 1 of the lists, per = kLinears or
// kSplit. Linear i is numbered as in the fused layout (0 qkv .. 4 down).
struct Linears {
  at::TensorList q, s;
  const c10::List<std::optional<at::Tensor>>& z;
  const c10::List<std::optional<at::Tensor>>& b;
  at::IntArrayRef bits, group;
  int64_t first;
  int per;

  // The list entry of linear i (kLinears: the next block's first); with q, k, v split, qkv is
  // entries 0-2 and the rest move up by two.
  int64_t entry(int i) const { return first + (per == kSplit && i > 0 ? i + 2 : i); }

  // The pool's helpers stay awake for the entries `next` and read ahead their weights.
  void prepare_entries(std::initializer_list<int64_t> next) const {
    pool::Range r[pool::kMaxRanges];
    int n = 0;
    for (int64_t j : next) {
      if (j >= static_cast<int64_t>(q.size())) continue;
      r[n++] = {q[j].data_ptr(), static_cast<int64_t>(q[j].nbytes())};
      r[n++] = {s[j].data_ptr(), static_cast<int64_t>(s[j].nbytes())};
    }
    pool::prepare(r, n);
  }

  // ... for linear `next` of this block (kLinears: the next block's qkv, when there is one).
  void prepare(int next) const { prepare_entries({entry(next)}); }

  at::Tensor matmul(int64_t j, const at::Tensor& x) const {
    const std::optional<at::Tensor> zj = z.get(j), bj = b.get(j);
    return quant_matmul_dot_cpu(x, q[j], s[j], zj, bj, bits[j], group[j]);
  }

  at::Tensor operator()(int i, const at::Tensor& x) const { return matmul(entry(i), x); }

  // q, k and v of x side by side, (B, (Hq + 2 Hk) D).
  at::Tensor qkv(const at::Tensor& x) const {
    if (per == kLinears) return matmul(first, x);
    const at::Tensor q = matmul(first, x);
    prepare_entries({first + 1});
    const at::Tensor k = matmul(first + 1, x);
    prepare_entries({first + 2});
    const at::Tensor v = matmul(first + 2, x);
    return at::cat({q, k, v}, 1);
  }
};

struct Shape {
  int64_t B, C, Hq, Hk, D;
};

// Everything about block l that could fail part way through the stack, checked before any block
// runs, so that a bad block leaves every cache as it was. (The kernels check their own inputs again.)
void check_block(const char* op, int64_t l, const Shape& sh, const at::Tensor& norm1, const at::Tensor& norm2,
                 const OptTensor& q_norm, const OptTensor& k_norm, const Linears& lin, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& seqlens, int64_t position) {
  const auto [B, C, Hq, Hk, D] = sh;
  for (const at::Tensor* w : {&norm1, &norm2}) {
    TORCH_CHECK(w->device().is_cpu() && w->scalar_type() == at::kFloat && w->dim() == 1 && w->size(0) == C, op,
                ": block ", l, "'s norm weights must be float32 CPU tensors of shape (", C, ")");
  }
  for (const OptTensor* w : {&q_norm, &k_norm}) {
    TORCH_CHECK(!present(*w) || ((*w)->device().is_cpu() && (*w)->scalar_type() == at::kFloat && (*w)->dim() == 1 &&
                                 (*w)->size(0) == D),
                op, ": block ", l, "'s q and k norm weights must be float32 CPU tensors of shape (", D, ")");
  }
  const char* fused[kLinears] = {"qkv", "proj", "gate", "up", "down"};
  const char* split[kSplit] = {"q", "k", "v", "proj", "gate", "up", "down"};
  const char* const* names = lin.per == kSplit ? split : fused;
  for (int i = 0; i < lin.per; ++i) {
    TORCH_CHECK(lin.q[lin.first + i].dim() == 2, op, ": block ", l, "'s ", names[i], " qweight must be 2-D, got ",
                lin.q[lin.first + i].sizes());
  }
  const int64_t hidden = lin.q[lin.entry(2)].size(0);
  const int64_t fused_outs[kLinears] = {(Hq + 2 * Hk) * D, C, hidden, hidden, C};
  const int64_t split_outs[kSplit] = {Hq * D, Hk * D, Hk * D, C, hidden, hidden, C};
  const int64_t fused_ins[kLinears] = {C, Hq * D, C, C, hidden};
  const int64_t split_ins[kSplit] = {C, C, C, Hq * D, C, C, hidden};
  const int64_t* outs = lin.per == kSplit ? split_outs : fused_outs;
  const int64_t* ins = lin.per == kSplit ? split_ins : fused_ins;
  for (int i = 0; i < lin.per; ++i) {
    const at::Tensor& q = lin.q[lin.first + i];
    const int64_t bits = lin.bits[lin.first + i];
    const int64_t in = ins[i];
    TORCH_CHECK(q.size(0) == outs[i] && (bits == 4 || bits == 8) && q.size(1) * (bits == 4 ? 2 : 1) == in,
                op, ": block ", l, "'s ", names[i], " projection must be ", in, " -> ", outs[i], " (",
                bits, "-bit qweight of shape (", outs[i], ", ", bits == 4 ? in / 2 : in, ")), got qweight ",
                q.sizes());
    const std::optional<at::Tensor> bias = lin.b.get(lin.first + i);
    TORCH_CHECK(!present(bias) || (bias->device().is_cpu() && bias->scalar_type() == at::kFloat &&
                                   bias->dim() == 1 && bias->size(0) == outs[i] && bias->is_contiguous()),
                op, ": block ", l, "'s ", names[i], " bias must be a contiguous float32 CPU tensor of shape (",
                outs[i], "), got ", bias->scalar_type(), " of shape ", bias->sizes());
  }
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == Hk && k_cache.size(3) == D &&
                  k_cache.is_contiguous() && k_cache.scalar_type() == at::kFloat && k_cache.device().is_cpu(),
              op, ": block ", l, "'s k_cache must be a contiguous float32 CPU tensor (", B, ", ", Hk, ", Tmax, ", D,
              "), got ", k_cache.scalar_type(), " of shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() && v_cache.scalar_type() == at::kFloat &&
                  v_cache.device().is_cpu(),
              op, ": block ", l, "'s v_cache must be contiguous and like its k_cache ", k_cache.sizes(), ", got ",
              v_cache.sizes());
  TORCH_CHECK(position >= 0 && position < k_cache.size(2), op, ": position ", position, " must lie in [0, ",
              k_cache.size(2), "): block ", l, "'s cache has no room for the new token");
  TORCH_CHECK(seqlens.device().is_cpu() && seqlens.dim() == 1 && seqlens.size(0) == B &&
                  seqlens.scalar_type() == at::kInt && seqlens.is_contiguous(),
              op, ": block ", l, "'s cache_seqlens must be a contiguous int32 CPU tensor of shape (", B, ")");
  // The new token goes to `position` of every sequence, where decode_attention will look for it.
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] == position, op, ": block ", l, "'s cache_seqlens[", b, "] = ", lens[b], " but position is ",
                position, "; every sequence must hold `position` tokens");
  }
}

// One block: (mlp out, h), both (B, C).
std::tuple<at::Tensor, at::Tensor> block(const at::Tensor& x2, const OptTensor& r2, const Shape& sh,
                                         const at::Tensor& norm1, const at::Tensor& norm2, const OptTensor& q_norm,
                                         const OptTensor& k_norm, double eps, const Linears& linear,
                                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& cache_seqlens, const OptTensor& cache_starts,
                                         int64_t position, const at::Tensor& cos, const at::Tensor& sin,
                                         double scale) {
  const auto [B, C, Hq, Hk, D] = sh;
  // h = x + residual; y = rms_norm(h)
  auto [y, h, unused_mean, unused_rstd] = norm_fwd_cpu(x2, norm1, std::nullopt, r2, eps, /*rms=*/true);
  if (!present(r2)) h = x2;

  // Attention: q, k, v of the new token, rotated to `position`, k and v into the cache.
  const at::Tensor qkv = linear.qkv(y);
  linear.prepare(1);
  // (B, count, 1, D) views of qkv's heads from `first` on, each normalised over D first where
  // the model has such a norm (Qwen3's q_norm, k_norm).
  const auto heads = [&](int64_t first, int64_t count, const OptTensor& norm) {
    at::Tensor t = qkv.narrow(1, first * D, count * D);
    if (present(norm)) {
      t = std::get<0>(norm_fwd_cpu(t.reshape({B * count, D}), *norm, std::nullopt, std::nullopt, eps, /*rms=*/true));
    }
    return t.view({B, 1, count, D}).transpose(1, 2);
  };
  auto [q, k] = rotary_fwd_cpu(heads(0, Hq, q_norm), heads(Hq, Hk, k_norm), cos, sin, false, false);
  // Plain copies of B x Hk rows of D floats: ATen's copy_ costs ~10 us a call at this size.
  const int64_t tmax = k_cache.size(2), n = qkv.size(1);
  const float* kr = k.data_ptr<float>();  // (B, Hk, 1, D), contiguous
  const float* vr = qkv.data_ptr<float>() + (Hq + Hk) * D;
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  int32_t* lens = cache_seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hk; ++g) {
      const int64_t off = ((b * Hk + g) * tmax + position) * D;
      std::memcpy(kc + off, kr + (b * Hk + g) * D, D * sizeof(float));
      std::memcpy(vc + off, vr + b * n + g * D, D * sizeof(float));
    }
    lens[b] += 1;
  }
  const at::Tensor att = decode_attention_from_cpu(q, k_cache, v_cache, cache_seqlens, cache_starts, scale);
  const at::Tensor o = linear(1, att.transpose(1, 2).reshape({B, Hq * D}));
  linear.prepare(2);

  // h = h + attn; y = rms_norm(h); mlp = down(silu(gate(y)) * up(y))
  auto [y2, h2, unused_mean2, unused_rstd2] = norm_fwd_cpu(o, norm2, std::nullopt, h, eps, /*rms=*/true);
  const at::Tensor gate = linear(2, y2), up = linear(3, y2);
  linear.prepare(4);
  const at::Tensor a = silu_mul_fwd_cpu(gate, up);
  at::Tensor out = linear(4, a);
  linear.prepare(kLinears);  // the next block's first matmul
  return {out, h2};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_blocks_cpu(
    const at::Tensor& x, const OptTensor& residual, at::TensorList norm1, at::TensorList norm2, double eps,
    at::TensorList qweights, at::TensorList scales, const c10::List<std::optional<at::Tensor>>& zeros,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef bits, at::IntArrayRef group_sizes,
    at::TensorList k_caches, at::TensorList v_caches, at::TensorList cache_seqlens, int64_t position, int64_t n_head,
    int64_t n_kv_head, double theta, double scale, at::TensorList q_norms, at::TensorList k_norms, int64_t head_dim,
    const OptTensor& cos, const OptTensor& sin, const OptTensor& cache_starts) {
  const char* op = "decode_blocks";
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(1) == 1 && x.is_contiguous() &&
                  x.scalar_type() == at::kFloat,
              op, ": x must be a contiguous float32 (B, 1, C) CPU tensor, got ", x.scalar_type(), " of shape ",
              x.sizes());
  TORCH_CHECK(!present(residual) || (residual->sizes() == x.sizes() && residual->is_contiguous() &&
                                     residual->scalar_type() == at::kFloat && residual->device().is_cpu()),
              op, ": residual must be a contiguous float32 CPU tensor of x's shape ", x.sizes(), ", got ",
              residual->scalar_type(), " of shape ", residual->sizes());
  const int64_t L = static_cast<int64_t>(norm1.size());
  const auto n = [](auto& list) { return static_cast<int64_t>(list.size()); };
  TORCH_CHECK(L >= 1 && n(norm2) == L && n(k_caches) == L && n(v_caches) == L && n(cache_seqlens) == L, op,
              ": norm1, norm2, k_caches, v_caches and cache_seqlens must hold one entry per block (at least one), got ",
              L, ", ", n(norm2), ", ", n(k_caches), ", ", n(v_caches), " and ", n(cache_seqlens));
  const int64_t per = n(qweights) / L;
  TORCH_CHECK((per == kLinears || per == kSplit) && n(qweights) == per * L && n(scales) == per * L &&
                  n(zeros) == per * L && n(biases) == per * L && n(bits) == per * L && n(group_sizes) == per * L,
              op, ": qweights, scales, zeros, biases, bits and group_sizes must hold ", kLinears,
              " entries per block (qkv, proj, gate, up, down) or ", kSplit, " (q, k, v, proj, gate, up, down): ",
              kLinears * L, " or ", kSplit * L, " for ", L, " blocks, got ", n(qweights), ", ", n(scales), ", ",
              n(zeros), ", ", n(biases), ", ", n(bits), " and ", n(group_sizes));
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(n_head > 0 && n_kv_head > 0 && n_head % n_kv_head == 0 && head_dim >= 0 &&
                  (head_dim > 0 || C % n_head == 0),
              op, ": n_head ", n_head, " must be a multiple of n_kv_head ", n_kv_head, " and head_dim ", head_dim,
              " positive, or 0 with n_head dividing C = ", C);
  TORCH_CHECK(n(q_norms) == n(k_norms) && (q_norms.empty() || n(q_norms) == L), op,
              ": q_norms and k_norms must both be empty or hold one entry per block, got ", n(q_norms), " and ",
              n(k_norms), " for ", L, " blocks");
  const Shape sh{B, C, n_head, n_kv_head, head_dim > 0 ? head_dim : C / n_head};
  const auto qk_norm = [&](at::TensorList w, int64_t l) { return w.empty() ? OptTensor() : OptTensor(w[l]); };
  const auto linears = [&](int64_t l) {
    return Linears{qweights, scales, zeros, biases, bits, group_sizes, per * l, static_cast<int>(per)};
  };
  for (int64_t l = 0; l < L; ++l) {
    check_block(op, l, sh, norm1[l], norm2[l], qk_norm(q_norms, l), qk_norm(k_norms, l), linears(l), k_caches[l],
                v_caches[l], cache_seqlens[l], position);
  }

  if (present(cache_starts)) {
    TORCH_CHECK(cache_starts->device().is_cpu() && cache_starts->scalar_type() == at::kInt &&
                    cache_starts->dim() == 1 && cache_starts->size(0) == B && cache_starts->is_contiguous(),
                op, ": cache_starts must be a contiguous int32 CPU tensor of shape (", B, ")");
    const int32_t* st = cache_starts->data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(st[b] >= 0 && st[b] <= position, op, ": cache_starts[", b, "] = ", st[b], " must lie in [0, ",
                  position, "]: the new token is never padding");
    }
  }

  linears(0).prepare(0);
  TORCH_CHECK(present(cos) == present(sin), op, ": cos and sin must be given together");
  if (present(cos)) {
    for (const at::Tensor* t : {&*cos, &*sin}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3 &&
                      (t->size(0) == 1 || t->size(0) == B) && t->size(1) == 1 && t->size(2) % 2 == 0 &&
                      t->size(2) <= sh.D && t->sizes() == cos->sizes() && t->is_contiguous(),
                  op, ": cos and sin must be contiguous float32 CPU tensors of one shape (1 or ", B,
                  ", 1, an even rotary_dim <= ", sh.D, "), got ", cos->sizes(), " and ", sin->sizes());
    }
  }

  // The angles of `position`, made once for every block (and the batch): the same float32 rows
  // rotary_pos_fwd makes, so the same bits. Or the caller's table (a transformers model's
  // rotary, whatever its scaling).
  at::Tensor rot_cos, rot_sin;
  if (present(cos)) {
    rot_cos = *cos;
    rot_sin = *sin;
  } else {
    const at::Tensor table =
        rotary_pos_table_cpu(at::full({1, 1}, position, x.options().dtype(at::kLong)), theta, sh.D);
    rot_cos = table[0];
    rot_sin = table[1];
  }
  at::Tensor out = x.view({B, C});
  OptTensor h = present(residual) ? OptTensor(residual->view({B, C})) : std::nullopt;
  for (int64_t l = 0; l < L; ++l) {
    auto [o, h2] = block(out, h, sh, norm1[l], norm2[l], qk_norm(q_norms, l), qk_norm(k_norms, l), eps, linears(l),
                         k_caches[l], v_caches[l], cache_seqlens[l], cache_starts, position, rot_cos, rot_sin, scale);
    out = o;
    h = h2;
  }
  return {out.view({B, 1, C}), h->view({B, 1, C})};
}

}  // namespace fastlm
