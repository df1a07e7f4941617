// Argument checks shared by the CPU and CUDA entry points, so both backends word a broken
// contract alike. fastlm/ops/*.py validates user input first; these guard direct callers of
// torch.ops.fastlm_C.* from out-of-bounds memory access.
#pragma once

#include <ATen/ATen.h>

#include <optional>

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

}  // namespace fastlm
