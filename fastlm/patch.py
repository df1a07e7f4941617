"""Swap the torch modules inside any model for their fastlm twins, and back.

A fastlm module subclasses its torch twin without adding state, so the swap changes only the
object's class: parameters, buffers, hooks and identity stay, and an optimizer that already
holds the parameters keeps working.
"""

from __future__ import annotations

import torch

from fastlm import nn

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
    for module in model.modules():
        fast = SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch: every fastlm module in `model` becomes its torch twin again."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    back = {fast: slow for slow, fast in SWAPS.items()}
    for module in model.modules():
        slow = back.get(type(module))
        if slow is not None:
            module.__class__ = slow
    return model
