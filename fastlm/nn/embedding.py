"""Embedding: torch.nn.Embedding, running fastlm.ops.embedding.

Same constructor arguments (num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
scale_grad_by_freq, sparse, _weight, _freeze, device, dtype), parameters, state_dict and
from_pretrained. max_norm, scale_grad_by_freq and sparse=True are torch features that fastlm's
kernels do not implement: a module using any of them runs torch's path, with torch's results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import ops


class Embedding(torch.nn.Embedding):
    def forward(self, input: Tensor) -> Tensor:
        if self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            return F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)
        return ops.embedding(input, self.weight, self.padding_idx)
