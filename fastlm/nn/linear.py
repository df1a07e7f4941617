"""QuantLinear: nn.Linear with a weight-only int8 or int4 quantized weight, running
fastlm.ops.quant_linear.

State: buffers qweight, scales and (asymmetric int4 only) zeros in the format of fastlm/quant.py,
and an ordinary trainable nn.Parameter bias. The state_dict therefore holds qweight, scales,
[zeros,] [bias]: a checkpoint saved from a QuantLinear (safetensors included) loads into a
QuantLinear built with the same arguments.

act_quant=True runs the CPU's integer path (fastlm.ops.quant_linear): x quantized to int8 per
block of 32 as well, for decode at the speed of reading the weights. The QuantizedWeight view of
the buffers is built once and kept while the buffers stay the same tensors (`.to()`, or assigning
a buffer, rebuilds it at the next call), so that a decode step builds no objects per layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastlm import ops, quant
from fastlm.quant import QuantizedWeight


class QuantLinear(torch.nn.Module):
    """y = x dequant(W)^T + b. The constructor quantizes a freshly initialised nn.Linear weight
    (so that a new layer is usable at once); `from_linear` quantizes a trained one. `dtype` is
    the bias's dtype (and that of the inputs the layer expects); the packed weight has its own."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 group_size: int = 128, symmetric: bool = True, device=None, dtype=None, *,
                 act_quant: bool = False, scale_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        group_size = quant.check_params("QuantLinear", bits, group_size, in_features)
        if bits == 8 and not symmetric:
            raise ValueError("QuantLinear: int8 is symmetric per output channel; asymmetric needs bits=4")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.act_quant = bits, group_size, symmetric, act_quant
        self._qw: QuantizedWeight | None = None
        self._dtype = dtype or torch.get_default_dtype()  # the inputs' dtype, when there is no bias
        n, k, groups = out_features, in_features, in_features // group_size
        meta = torch.device(device or "cpu").type == "meta"
        if meta:
            qtype = torch.int8 if bits == 8 else torch.uint8
            self.register_buffer("qweight", torch.empty(n, k if bits == 8 else k // 2, dtype=qtype, device=device))
            self.register_buffer("scales", torch.empty(n, groups, dtype=scale_dtype, device=device))
            zeros = None if symmetric else torch.empty(n, groups, dtype=scale_dtype, device=device)
        else:
            w = torch.empty(n, k, device=device, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's initialisation
            qw = quant.quantize(w, bits, group_size, symmetric, scale_dtype)
            self.register_buffer("qweight", qw.qweight)
            self.register_buffer("scales", qw.scales)
            zeros = qw.zeros
        self.register_buffer("zeros", zeros)
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(n, device=device, dtype=dtype))
            if not meta:
                bound = 1 / math.sqrt(k) if k > 0 else 0
                torch.nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits: int = 8, group_size: int = 128,
                    symmetric: bool = True, *, act_quant: bool = False,
                    scale_dtype: torch.dtype = torch.float32) -> QuantLinear:
        """A QuantLinear holding linear's weight, quantized, and a copy of its bias."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"QuantLinear.from_linear: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        qw = quant.quantize(linear.weight, bits, group_size, symmetric, scale_dtype)
        # Built on the meta device, so that no throwaway weight is initialised and quantized.
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=bits,
                  group_size=group_size, symmetric=symmetric, device="meta", dtype=linear.weight.dtype,
                  act_quant=act_quant, scale_dtype=scale_dtype)
        new.qweight, new.scales, new.zeros = qw.qweight, qw.scales, qw.zeros
        if linear.bias is not None:
            new.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return new

    @property
    def weight(self) -> QuantizedWeight:
        """The packed weight as a QuantizedWeight (the buffers themselves, no copy)."""
        qw = self._qw
        dtype = self.bias.dtype if self.bias is not None else self._dtype
        if (qw is None or qw.qweight is not self.qweight or qw.scales is not self.scales or qw.zeros is not self.zeros
                or qw.dtype != dtype):
            qw = self._qw = QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                            (self.out_features, self.in_features), dtype)
        return qw

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return quant.dequantize(self.weight, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return ops.quant_linear(input, self.weight, self.bias, act_quant=self.act_quant)

    def extra_repr(self) -> str:
        kind = f"int{self.bits}" + ("" if self.bits == 8 else f", group_size={self.group_size}")
        sym = "" if self.bits == 8 else (", symmetric" if self.symmetric else ", asymmetric")
        act = ", act_quant" if self.act_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {kind}{sym}{act}")
