"""Swap the torch modules inside any model for their fastlm twins, and back; quantize a model's
linear layers in place.

A fastlm module subclasses its torch twin without adding state, so the swap changes only the
object's class: parameters, buffers, hooks and identity stay, and an optimizer that already
holds the parameters keeps working. quantize_ replaces each nn.Linear by a new QuantLinear.

A Hugging Face transformers model is patched by fastlm.hf, which also swaps its attention, norms,
MLPs, rotary embedding and causal-LM loss (see that module); fastlm.hf.patch_report(model) says
what was swapped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastlm import hf, nn, quant

# torch class -> fastlm class. Only exact torch classes are swapped: a user's subclass may
# have its own forward that a swap would silently drop.
SWAPS: dict[type, type] = {
    torch.nn.LayerNorm: nn.LayerNorm,
    torch.nn.RMSNorm: nn.RMSNorm,
    torch.nn.Embedding: nn.Embedding,
    torch.nn.MultiheadAttention: nn.MultiheadAttention,
}


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Swap, in place, every swappable torch module in `model` (itself included); return it."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if hf.is_transformers_model(model):
        return hf.patch(model, SWAPS)
    for module in model.modules():
        fast = SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch: every fastlm module in `model` becomes its torch twin again."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    if hf.is_transformers_model(model):
        return hf.unpatch(model)
    back = {fast: slow for slow, fast in SWAPS.items()}
    for module in model.modules():
        slow = back.get(type(module))
        if slow is not None:
            module.__class__ = slow
    return model


def quantize_(model: torch.nn.Module, bits: int = 4, group_size: int = 128, symmetric: bool = True,
              skip: Callable[[str, torch.nn.Module], bool] | None = None, *,
              quantize_tied: bool = False, act_quant: bool = False,
              scale_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Replace every torch.nn.Linear of model, in place, by a fastlm.nn.QuantLinear holding its
    quantized weight (and its bias, still a float Parameter). Returns the model.

    skip(name, module) -> True leaves that layer alone. A Linear whose weight is the very
    Parameter of an nn.Embedding (a tied LM head) is left unquantized unless quantize_tied:
    quantizing it would untie the pair and keep a float copy for the embedding anyway (a
    transformers model's config then says so: fastlm.hf.untie).
    A layer whose in_features does not fit the format raises ValueError naming it (use skip).
    act_quant and scale_dtype are QuantLinear's: the CPU integer path (inputs quantized to int8
    per block of 32) and 16-bit scales (fastlm/quant.py).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"quantize_: model must be a torch.nn.Module, got {type(model).__name__}")
    quant.check_params("quantize_", bits, group_size)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    targets = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or (skip is not None and skip(name, mod)):
            continue
        if id(mod.weight) in tied and not quantize_tied:
            continue
        try:
            quant.check_params("quantize_", bits, group_size, mod.in_features)
        except ValueError as e:
            raise ValueError(f"quantize_: layer {name!r} ({mod.in_features} -> {mod.out_features}) cannot be "
                             f"quantized: {e}; leave it out with skip=") from None
        targets.append((name, mod))
    kw = dict(bits=bits, group_size=group_size, symmetric=symmetric, act_quant=act_quant, scale_dtype=scale_dtype)
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.QuantLinear.from_linear(mod, **kw))
    untied = [name for name, mod in targets if id(mod.weight) in tied]
    if untied and hf.is_transformers_model(model):
        hf.untie(model, untied)
    if quantize_tied:
        _quantize_tied_head(model, kw)
    return model


def _quantize_tied_head(model: torch.nn.Module, kw: dict) -> None:
    """fastlm's Transformer applies its token embedding as the output layer (no Linear to swap):
    with quantize_tied it gets a quantized copy in its lm_head slot, the largest single matrix of
    a decode step; the embedding lookup keeps the float table."""
    from fastlm.model import Transformer

    if not isinstance(model, Transformer) or model.lm_head is not None:
        return
    wte = model.wte.weight
    head = torch.nn.Linear(wte.shape[1], wte.shape[0], bias=False, device="meta")
    head.weight = wte
    try:
        quant.check_params("quantize_", kw["bits"], kw["group_size"], wte.shape[1])
    except ValueError as e:
        raise ValueError(f"quantize_: the tied output layer ({wte.shape[1]} -> {wte.shape[0]}) cannot be "
                         f"quantized: {e}") from None
    model.lm_head = nn.QuantLinear.from_linear(head, **kw)
