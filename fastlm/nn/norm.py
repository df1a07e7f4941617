"""LayerNorm and RMSNorm: the torch modules, running fastlm.ops.

They subclass the torch modules and add no state, so constructor arguments, parameters and
state_dict keys are torch's own, and fastlm.patch can swap a module's class in place.

`forward(x, residual)` also takes the residual stream of a pre-norm block and returns
(norm(x + residual), x + residual) from one pass over memory (ops.add_layer_norm /
add_rms_norm); `forward(x)` is torch's. Under autocast a sub-layer's output x may be bf16 while
the residual stream stays float32: the sum is taken in the residual's precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm import ops


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if residual is None:
            return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return ops.add_layer_norm(input.to(residual.dtype), residual, self.normalized_shape, self.weight,
                                  self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if residual is None:
            return ops.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return ops.add_rms_norm(input.to(residual.dtype), residual, self.normalized_shape, self.weight, self.eps)
