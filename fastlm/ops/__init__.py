"""Functional ops: swap `torch.nn.functional.X` for `fastlm.ops.X`; each takes `backend=`, and
`use_backend(name)` sets it for every op called inside a block."""

from fastlm.backends import BACKENDS, use_backend
from fastlm.ops.activation import bias_gelu, linear_gelu, silu_mul
from fastlm.ops.attention import decode_attention, scaled_dot_product_attention
from fastlm.ops.cross_entropy import linear_cross_entropy
from fastlm.ops.embedding import embedding, token_position_embedding
from fastlm.ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastlm.ops.quant_matmul import quant_linear
from fastlm.ops.rotary import rotary_embedding

__all__ = [
    "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "embedding", "token_position_embedding",
    "scaled_dot_product_attention", "decode_attention", "quant_linear", "linear_cross_entropy",
    "bias_gelu", "linear_gelu", "silu_mul", "rotary_embedding", "use_backend", "BACKENDS",
]
