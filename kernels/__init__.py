"""NVFP4 numerics and kernels: the only place the format is implemented."""

from nvfp4.kernels.numerics import BLOCK, activation_global_scale, global_scale, shared_global_scale, tensor_amax
from nvfp4.kernels.ops import dequantize, fake_quantize, fake_quantize_activation, linear_w4a16, quantize

__all__ = [
    "BLOCK",
    "activation_global_scale",
    "dequantize",
    "fake_quantize",
    "fake_quantize_activation",
    "global_scale",
    "linear_w4a16",
    "quantize",
    "shared_global_scale",
    "tensor_amax",
]
