"""NVFP4 numerics and kernels: the only place the format is implemented."""

import importlib.metadata
import warnings

from kernels.numerics import (
    BLOCK,
    activation_global_scale,
    global_scale,
    shared_global_scale,
    tensor_amax,
)
from kernels.ops import dequantize, fake_quantize, fake_quantize_activation, linear_w4a16, quantize

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


def warn_if_shadowing() -> bool:
    """Warn (and say so) where Hugging Face's `kernels` distribution is installed: this package takes its import
    name, so transformers' `from kernels import ...` (its model files, from transformers 5.25) fails."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    warnings.warn("Hugging Face's `kernels` package is installed, and this project's `kernels` package shadows it: "
                  "transformers will fail to import its models. Use transformers<5.25 and `pip uninstall kernels`.",
                  stacklevel=2)
    return True


warn_if_shadowing()
