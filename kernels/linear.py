"""NVFP4 linear modules: fake-quantized (QAD student, calibration) and packed (serving)."""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nvfp4.kernels import int8_blocks
from nvfp4.kernels.numerics import block_scales, scales_from_log
from nvfp4.kernels.ops import (
    fake_quantize,
    fake_quantize_activation,
    fake_quantize_learned,
    linear_bf16_weight,
    linear_w4a16,
    quantize,
)


@dataclass
class PackedWeight:
    """One quantized linear as every target stores it."""

    packed: Tensor  # uint8 [out, in/2], element 2i in the low nibble
    scales: Tensor  # float8_e4m3fn [out, in/16]
    gscale: Tensor  # fp32 scalar s2 (ModelOpt's weight_scale_2)
    input_gscale: Tensor | None = None  # fp32 scalar (W4A4 input_scale), None for weight-only


class NVFP4FakeQuantLinear(nn.Module):
    """Drop-in for nn.Linear whose forward uses dequant(quant(W)) (straight-through gradient).

    `weight_gscale` is fixed at quantize time (shared inside fused groups); `block_scales` is None
    for ModelOpt's amax rule (recomputed from W each forward) or a fixed e4m3 tensor from a scale
    search. `input_gscale` set (after calibration) turns on W4A4 activation fake-quantization.
    While `log_block_scales` is set (QAD learning the scales), the block scales are that parameter's
    e4m3 values; `fix_block_scales` makes them fixed `block_scales` again for export.

    Two temporary modes, each a context manager over many modules: `calibrating` (the original linear:
    weights and inputs unquantized, so recorded ranges are the teacher's) and `frozen` (each weight
    fake-quantized once and reused by every forward: evaluation).
    """

    def __init__(self, linear: nn.Linear, weight_gscale: Tensor, quantize_input: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.quantize_input = quantize_input
        self.register_buffer("weight_gscale", weight_gscale.detach().float().reshape(()).to(linear.weight.device))
        self.register_buffer("block_scales", None)
        self.register_buffer("input_gscale", None)
        self.register_parameter("log_block_scales", None)
        self.calibrating = False
        self.frozen_weight: Tensor | None = None

    def quantized_weight(self) -> Tensor:
        if self.frozen_weight is not None:
            return self.frozen_weight
        if self.log_block_scales is not None:
            return fake_quantize_learned(self.weight, self.weight_gscale, self.log_block_scales)
        return fake_quantize(self.weight, self.weight_gscale, self.block_scales)

    @torch.no_grad()
    def learn_block_scales(self) -> nn.Parameter:
        """Make the block scales trainable, as logarithms, from the ones in use (same output at the start)."""
        start = self.block_scales if self.block_scales is not None else block_scales(self.weight, self.weight_gscale)
        self.log_block_scales = nn.Parameter(start.float().log())
        return self.log_block_scales

    @torch.no_grad()
    def fix_block_scales(self) -> None:
        if self.log_block_scales is not None:
            self.block_scales = scales_from_log(self.log_block_scales)
            self.log_block_scales = None

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            return F.linear(x, self.weight, self.bias)
        if self.quantize_input and self.input_gscale is not None:
            x = fake_quantize_activation(x, self.input_gscale)
        return F.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def export(self) -> PackedWeight:
        packed, scales, gscale = quantize(self.weight.detach(), self.weight_gscale, self.block_scales)
        input_gscale = self.input_gscale.clone() if self.quantize_input and self.input_gscale is not None else None
        return PackedWeight(packed, scales, gscale.clone(), input_gscale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w4a4={self.quantize_input}"


@contextmanager
def calibrating(modules: Iterable[NVFP4FakeQuantLinear]) -> Iterator[None]:
    """The modules compute as the original linears inside the block."""
    modules = list(modules)
    for module in modules:
        module.calibrating = True
    try:
        yield
    finally:
        for module in modules:
            module.calibrating = False


@contextmanager
def frozen(modules: Iterable[NVFP4FakeQuantLinear]) -> Iterator[None]:
    """Each module's weight fake-quantized once on entry and reused by every forward inside the block."""
    modules = list(modules)
    with torch.no_grad():
        for module in modules:
            module.frozen_weight = module.quantized_weight().detach()
    try:
        yield
    finally:
        for module in modules:
            module.frozen_weight = None


class NVFP4PackedLinear(nn.Module):
    """Serving module: keeps 4-bit codes + scales resident; never holds a dequantized copy.

    CPU: a C GEMV reads the packed bytes for decode-sized batches; larger batches dequantize into one
    buffer per thread, shared by all layers. CUDA: the Triton W4A16 GEMM reads the packed bytes.
    """

    def __init__(self, weight: PackedWeight, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.packed.shape[0], weight.packed.shape[1] * 2
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("gscale", weight.gscale.float().reshape(()))
        self.register_buffer(
            "input_gscale", None if weight.input_gscale is None else weight.input_gscale.float().reshape(())
        )
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_gscale is not None:
            x = fake_quantize_activation(x, self.input_gscale)
        return linear_w4a16(x, self.packed, self.scales, self.gscale, self.bias)


class BF16HeldEmbedding(nn.Module):
    """An embedding whose table is held in bf16 and looked up into fp32 (exact: bf16 is a subset)."""

    def __init__(self, weight: Tensor, padding_idx: int | None = None):
        super().__init__()
        self.weight = _frozen(weight)
        self.padding_idx = padding_idx

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight).float()


class BF16HeldLinear(nn.Module):
    """A bias-free linear whose weight is held in bf16 and multiplied in fp32 (the vocabulary head)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = _frozen(weight)  # a tied head passes the embedding's own parameter
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        return linear_bf16_weight(x, self.weight)


class Int8BlockEmbedding(nn.Module):
    """An embedding whose bf16 table is held exactly as block-int8 (kernels.int8_blocks), looked up into fp32."""

    def __init__(self, codes: Tensor, scales: Tensor, padding_idx: int | None = None):
        super().__init__()
        self.codes, self.scales = _frozen(codes), _frozen(scales)
        self.padding_idx = padding_idx

    def forward(self, ids: Tensor) -> Tensor:
        return int8_blocks.values(F.embedding(ids, self.codes), F.embedding(ids, self.scales))


class Int8BlockLinear(nn.Module):
    """A bias-free linear whose bf16 weight is held exactly as block-int8 (a tied head shares the embedding's)."""

    def __init__(self, codes: Tensor, scales: Tensor):
        super().__init__()
        self.codes, self.scales = _frozen(codes), _frozen(scales)
        self.out_features, self.in_features = codes.shape

    def forward(self, x: Tensor) -> Tensor:
        return int8_blocks.linear(x, self.codes, self.scales)


def _frozen(weight: Tensor) -> nn.Parameter:
    return weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
