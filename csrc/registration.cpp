// The one place where fastlm._C's kernels become torch ops (torch.ops.fastlm_C.*).
// These are private building blocks: the public, autograd-aware ops are torch.ops.fastlm.*,
// registered in fastlm/ops/*.py, which pick a backend and call these.
#include <torch/library.h>

#include "fastlm.h"

TORCH_LIBRARY(fastlm_C, m) {
  m.def("norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool rms)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, Tensor? dh,"
        " bool rms, bool has_bias) -> (Tensor, Tensor, Tensor)");
  m.def("embedding_fwd(Tensor ids, Tensor weight) -> Tensor");
  m.def("tok_pos_embedding_fwd(Tensor ids, Tensor tok, Tensor pos, int start_pos) -> Tensor");
  m.def("embedding_bwd(Tensor dout, Tensor ids, int num_weights, int padding_idx, bool deterministic)"
        " -> Tensor");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal, float scale)"
        " -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask,"
        " bool is_causal, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float scale)"
        " -> Tensor");
  m.def("quant_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits,"
        " int group_size) -> Tensor");
  m.def("quant_matmul_dot(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits,"
        " int group_size) -> Tensor");
  m.def("quant_dot_isa(int force) -> str", &fastlm::quant_dot_isa);
  m.def("decode_blocks(Tensor x, Tensor? residual, Tensor[] norm1, Tensor[] norm2, float eps, Tensor[] qweights,"
        " Tensor[] scales, Tensor?[] zeros, Tensor?[] biases, int[] bits, int[] group_sizes, Tensor(a!)[] k_caches,"
        " Tensor(b!)[] v_caches, Tensor(c!)[] cache_seqlens, int position, int n_head, int n_kv_head, float theta,"
        " float scale, Tensor[] q_norms, Tensor[] k_norms, int head_dim, Tensor? cos, Tensor? sin,"
        " Tensor? cache_starts) -> (Tensor, Tensor)");
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, bool tanh) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, bool tanh, bool need_dbias) -> (Tensor, Tensor)");
  m.def("silu_mul_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_mul_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("rotary_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved, bool backward)"
        " -> (Tensor, Tensor)");
  m.def("rotary_pos_fwd(Tensor q, Tensor k, Tensor positions, float theta, int rotary_dim, bool interleaved,"
        " bool backward) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("norm_fwd", &fastlm::norm_fwd_cpu);
  m.impl("norm_bwd", &fastlm::norm_bwd_cpu);
  m.impl("embedding_fwd", &fastlm::embedding_fwd_cpu);
  m.impl("tok_pos_embedding_fwd", &fastlm::tok_pos_embedding_fwd_cpu);
  m.impl("embedding_bwd", &fastlm::embedding_bwd_cpu);
  m.impl("attention_fwd", &fastlm::attention_fwd_cpu);
  m.impl("attention_bwd", &fastlm::attention_bwd_cpu);
  m.impl("decode_attention", &fastlm::decode_attention_cpu);
  m.impl("quant_matmul", &fastlm::quant_matmul_cpu);
  m.impl("quant_matmul_dot", &fastlm::quant_matmul_dot_cpu);
  m.impl("decode_blocks", &fastlm::decode_blocks_cpu);
  m.impl("bias_gelu_fwd", &fastlm::bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &fastlm::bias_gelu_bwd_cpu);
  m.impl("silu_mul_fwd", &fastlm::silu_mul_fwd_cpu);
  m.impl("silu_mul_bwd", &fastlm::silu_mul_bwd_cpu);
  m.impl("rotary_fwd", &fastlm::rotary_fwd_cpu);
  m.impl("rotary_pos_fwd", &fastlm::rotary_pos_fwd_cpu);
}

#ifdef FASTLM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastlm_C, CUDA, m) {
  m.impl("norm_fwd", &fastlm::norm_fwd_cuda);
  m.impl("norm_bwd", &fastlm::norm_bwd_cuda);
  m.impl("embedding_fwd", &fastlm::embedding_fwd_cuda);
  m.impl("tok_pos_embedding_fwd", &fastlm::tok_pos_embedding_fwd_cuda);
  m.impl("embedding_bwd", &fastlm::embedding_bwd_cuda);
  m.impl("attention_fwd", &fastlm::attention_fwd_cuda);
  m.impl("attention_bwd", &fastlm::attention_bwd_cuda);
  m.impl("decode_attention", &fastlm::decode_attention_cuda);
  m.impl("quant_matmul", &fastlm::quant_matmul_cuda);
  m.impl("bias_gelu_fwd", &fastlm::bias_gelu_fwd_cuda);
  m.impl("bias_gelu_bwd", &fastlm::bias_gelu_bwd_cuda);
  m.impl("rotary_fwd", &fastlm::rotary_fwd_cuda);
  m.impl("rotary_pos_fwd", &fastlm::rotary_pos_fwd_cuda);
  m.impl("silu_mul_fwd", &fastlm::silu_mul_fwd_cuda);
  m.impl("silu_mul_bwd", &fastlm::silu_mul_bwd_cuda);
}
#endif
