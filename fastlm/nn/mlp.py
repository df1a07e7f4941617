"""The MLPs of a Transformer block.

    mlp = MLP(d_model=768, d_hidden=3072)     # parameters fc.weight, fc.bias, proj.weight, proj.bias
    y = mlp(x)

    mlp = SwiGLU(d_model=4096, d_hidden=11008)  # gate_proj, up_proj, down_proj (.weight each)
    y = mlp(x)                                  # down_proj(silu(gate_proj(x)) * up_proj(x))

MLP is GPT-2's: fc, tanh GELU, proj, dropout.

fc's bias add runs inside the GELU (fastlm.ops.linear_gelu) when fc is a plain nn.Linear or a
fastlm QuantLinear (after fastlm.quantize_), whose forward is exactly linear(x, weight, bias);
any other layer put in fc's place (an adapter, say) runs its own forward, then the GELU.

SwiGLU is the Llama family's (transformers' LlamaMLP, whose parameter names it shares, so a
checkpoint's mlp.* keys load as they are), with fastlm.ops.silu_mul fusing the activation and the
product into one pass. Its three projections are called as modules, so fastlm.quantize_ (or an
adapter) can swap any of them.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastlm import ops
from fastlm.nn.linear import QuantLinear

_LINEARS = (nn.Linear, QuantLinear)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, bias: bool = True, dropout: float = 0.0, *,
                 device=None, dtype=None):
        super().__init__()
        self.fc = nn.Linear(d_model, d_hidden, bias=bias, device=device, dtype=dtype)
        self.proj = nn.Linear(d_hidden, d_model, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        fc = self.fc
        if type(fc) in _LINEARS:  # exact types: a subclass may have a forward of its own
            h = ops.linear_gelu(x, fc.weight, fc.bias, approximate="tanh")
        else:
            h = ops.bias_gelu(fc(x), None, approximate="tanh")
        return self.dropout(self.proj(h))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, bias: bool = False, dropout: float = 0.0, *,
                 device=None, dtype=None):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x))))
