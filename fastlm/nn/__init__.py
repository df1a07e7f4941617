"""Drop-in modules: same constructor arguments and state_dict keys as their torch.nn twins."""

from fastlm.nn.attention import MultiheadAttention
from fastlm.nn.embedding import Embedding
from fastlm.nn.linear import QuantLinear
from fastlm.nn.mlp import MLP, SwiGLU
from fastlm.nn.norm import LayerNorm, RMSNorm
from fastlm.nn.self_attention import CausalSelfAttention

__all__ = ["LayerNorm", "RMSNorm", "Embedding", "MultiheadAttention", "CausalSelfAttention", "QuantLinear",
           "MLP", "SwiGLU"]
