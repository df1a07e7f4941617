"""fastlm: fused kernels for Transformer language models.

    import fastlm
    y = fastlm.ops.layer_norm(x, (768,), w, b)      # drop-in for F.layer_norm
    model = fastlm.patch(model)                       # swap torch modules for fastlm's
    with fastlm.use_backend("torch"): ...             # run the reference path
"""

from fastlm import backends, nn, ops, quant
from fastlm.backends import BackendUnavailable, use_backend
from fastlm.patch import patch, quantize_, unpatch

__version__ = "0.1.0"

__all__ = ["ops", "nn", "backends", "patch", "unpatch", "use_backend", "BackendUnavailable", "quant", "quantize_",
           "__version__"]
