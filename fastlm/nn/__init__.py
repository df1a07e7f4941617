"""Drop-in modules: same constructor arguments and state_dict keys as their torch.nn twins."""

from fastlm.nn.embedding import Embedding
from fastlm.nn.norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "Embedding"]
