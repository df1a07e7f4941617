"""LoRA: a trainable low-rank update beside frozen linear layers.

    apply_lora(model, rank=8)            # every attention and MLP matrix; everything else frozen
    ...train...                          # only the adapters (and what the caller unfreezes) learn
    adapters = lora_state_dict(model)    # the adapters alone, a few hundred KB
    merge_lora(model)                    # back to plain nn.Linear layers, the same outputs

A LoRALinear computes base(x) + (alpha / rank) * x A^T B^T, with A (rank, in) drawn like
nn.Linear's weight and B (out, rank) zero, so a fresh adapter leaves the model's outputs as they
were. The base may be an nn.Linear or a fastlm QuantLinear (an int8/int4 frozen weight: QLoRA's
recipe); merging a quantized base gives a float layer holding dequant(W) + (alpha / rank) B A.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fastlm.nn import QuantLinear

# The names of the attention and MLP matrices in fastlm's Transformer blocks (GELU and SwiGLU).
TARGETS = ("qkv", "proj", "fc", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear | QuantLinear):
            raise TypeError(f"LoRALinear: base must be a torch.nn.Linear or fastlm QuantLinear, got "
                            f"{type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRALinear: rank must be a positive int, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"LoRALinear: alpha must be finite, got {alpha}")
        self.base, self.rank, self.alpha = base, rank, alpha
        self.in_features, self.out_features = base.in_features, base.out_features
        for p in base.parameters():
            p.requires_grad_(False)
        if isinstance(base, nn.Linear):
            dtype, device = base.weight.dtype, base.weight.device
        else:  # a quantized weight has its own dtype; the layer's inputs have the bias's
            dtype = base.bias.dtype if base.bias is not None else torch.float32
            device = base.qweight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight(self):
        """The base's weight (a QuantizedWeight for a quantized base), for code that reads a
        layer's device or dtype from it."""
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def delta(self) -> Tensor:
        """The update (out, in) the adapter adds to the base's weight."""
        return (self.lora_b @ self.lora_a) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes (without dropout)."""
        base = self.base
        w = base.dequantize(self.lora_a.dtype) if isinstance(base, QuantLinear) else base.weight.detach()
        out = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=self.lora_a.device, dtype=self.lora_a.dtype)
        with torch.no_grad():
            out.weight.copy_(w + self.delta())
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
               targets: Iterable[str] = TARGETS) -> nn.Module:
    """Freeze every parameter of model and wrap, in place, each nn.Linear / QuantLinear whose
    name ends in one of `targets` in a LoRALinear; return the model."""
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear | QuantLinear) and n.rpartition(".")[2] in targets]
    if not found:
        raise ValueError(f"apply_lora: no nn.Linear or QuantLinear named {', '.join(targets)} in the model")
    for name, mod in found:
        _replace(model, name, LoRALinear(mod, rank, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace, in place, every LoRALinear of model by the nn.Linear it amounts to; return the model."""
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        _replace(model, name, mod.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors alone, under their names in model.state_dict()."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
