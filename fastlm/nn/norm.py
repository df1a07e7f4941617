"""LayerNorm and RMSNorm: the torch modules, running fastlm.ops.

They subclass the torch modules and add no state, so constructor arguments, parameters and
state_dict keys are torch's own, and fastlm.patch can swap a module's class in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm import ops


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input: Tensor) -> Tensor:
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    def forward(self, input: Tensor) -> Tensor:
        return ops.rms_norm(input, self.normalized_shape, self.weight, self.eps)
