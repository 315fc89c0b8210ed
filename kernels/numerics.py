"""NVFP4 reference numerics: the one home of the format (pure torch, vectorised, CPU and CUDA).

Bit-identical to ModelOpt's ``NVFP4QTensor``:
  global scale  s2 = amax(W) / (6 * 448)                                  (fp32)
  block scale   sb = fp8_e4m3(clamp(block_amax / (6 * s2), 2**-9, 448)); all-zero block -> 1.0
  codes         e2m1(W / (float(sb) * s2)): round to nearest, ties to even, saturate at 6,
                sign in bit 3 (set for any value < 0, never for -0.0)
  packing       element 2i in the low nibble, 2i+1 in the high nibble
  dequant       value(code) * (float(sb) * s2)
"""

from collections.abc import Iterable

import torch
from torch import Tensor

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9

_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # midpoints between code values
_TIES_ROUNDING_UP = (0.75, 1.75, 3.5)  # midpoints whose upper neighbour has the even code
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _table(values: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def tensor_amax(x: Tensor) -> Tensor:  # -> fp32 scalar
    return x.detach().abs().amax().float()


def global_scale(amax: Tensor | float) -> Tensor:  # -> fp32 scalar s2
    return torch.as_tensor(amax, dtype=torch.float32) / (E2M1_MAX * E4M3_MAX)


def shared_global_scale(tensors: Iterable[Tensor]) -> Tensor:
    """One s2 for a fused group (q/k/v, gate/up): engines fuse these matrices and need one scale."""
    return global_scale(torch.stack([tensor_amax(t) for t in tensors]).amax())


def _blocks(x: Tensor) -> Tensor:  # [..., K] -> [..., K/16, 16]
    if x.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 needs the last dimension divisible by {BLOCK}, got shape {tuple(x.shape)}")
    return x.unflatten(-1, (-1, BLOCK))


def block_scales(x: Tensor, gscale: Tensor) -> Tensor:  # x [..., K] -> e4m3 [..., K/16]
    block_amax = _blocks(x).abs().amax(-1).float()
    scale = block_amax / (E2M1_MAX * gscale.to(block_amax.device))
    return e4m3_scales(torch.where(scale == 0, torch.ones_like(scale), scale))


def e4m3_scales(scale: Tensor) -> Tensor:
    """fp32 block scales -> the e4m3 values stored: clamped to [2^-9, 448], rounded to nearest."""
    return scale.clamp(min=E4M3_MIN_SUBNORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)


def encode_e2m1(x: Tensor) -> Tensor:  # scaled values -> uint8 codes in [0, 15]
    magnitude = x.abs().float()
    bounds = _table(_E2M1_BOUNDS, x.device)
    code = torch.searchsorted(bounds, magnitude, out_int32=True).to(torch.uint8)
    ties_up = torch.zeros_like(code, dtype=torch.bool)
    for tie in _TIES_ROUNDING_UP:
        ties_up |= magnitude == tie
    return code + ties_up.to(torch.uint8) + ((x < 0).to(torch.uint8) << 3)


def decode_e2m1(codes: Tensor) -> Tensor:  # uint8 codes -> fp32 values
    return _table(E2M1_VALUES, codes.device)[codes.long()]


def pack_codes(codes: Tensor) -> Tensor:  # uint8 [..., K] -> uint8 [..., K/2]
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: Tensor) -> Tensor:  # uint8 [..., K/2] -> uint8 [..., K]
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def block_multiplier(scales: Tensor, gscale: Tensor) -> Tensor:  # e4m3 [..., K/16] -> float(sb) * s2 [..., K/16, 1]
    return (scales.float() * gscale.float().to(scales.device)).unsqueeze(-1)


def quantize_codes(x: Tensor, gscale: Tensor, scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (codes uint8 [..., K], scales e4m3 [..., K/16]); scales are computed when not given."""
    if scales is None:
        scales = block_scales(x, gscale)
    scaled = _blocks(x) / block_multiplier(scales, gscale)
    return encode_e2m1(scaled.flatten(-2)), scales


def quantize_ref(
    x: Tensor, gscale: Tensor | None = None, scales: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """x [..., K] -> (packed uint8 [..., K/2], scales e4m3 [..., K/16], gscale fp32 scalar)."""
    if gscale is None:
        gscale = global_scale(tensor_amax(x))
    codes, scales = quantize_codes(x, gscale, scales)
    return pack_codes(codes), scales, gscale


def dequantize_ref(packed: Tensor, scales: Tensor, gscale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(packed [..., K/2], scales [..., K/16], gscale) -> [..., K] in dtype."""
    values = decode_e2m1(unpack_codes(packed))
    return (_blocks(values) * block_multiplier(scales, gscale)).flatten(-2).to(dtype)


def fake_quantize_ref(x: Tensor, gscale: Tensor, scales: Tensor | None = None) -> Tensor:
    """dequantize(quantize(x)) in x's dtype, computed without packing."""
    codes, scales = quantize_codes(x.detach(), gscale, scales)
    values = decode_e2m1(codes)
    return (_blocks(values) * block_multiplier(scales, gscale)).flatten(-2).to(x.dtype)


def scales_from_log(log_scales: Tensor) -> Tensor:
    """Learned block scales (trained as logarithms) -> the e4m3 scales they stand for [..., K/16]."""
    return e4m3_scales(log_scales.detach().float().exp())


def scale_gradient_ref(x: Tensor, grad: Tensor, scale: Tensor, gscale: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of fake_quantize_ref(x, gscale, e4m3_scales(scale)) for block scales learned as logarithms
    (LSQ's straight-through rule), `scale` the fp32 exp of the logarithms:
    -> (d/dx: grad where |x/m| <= 6, else 0; d/d log(scale): the block's sum of grad * d(q m)/d log m),
    with m = s8 * s2, s8 = e4m3(scale), u = x/m, q = e2m1(u): d(q m)/d log m = m (q - u) unclipped, m q
    clipped; d log m / d log(scale) = scale / s8 (e4m3 rounding straight through), 0 where the scale is
    held at e4m3's bounds."""
    scales = e4m3_scales(scale)
    multiplier = block_multiplier(scales, gscale)
    scaled = _blocks(x.detach().float()) / multiplier
    inside = scaled.abs() <= E2M1_MAX
    values = decode_e2m1(encode_e2m1(scaled.flatten(-2))).unflatten(-1, (-1, BLOCK))
    blocks = _blocks(grad.float())
    grad_x = (blocks * inside).flatten(-2)
    grad_log_m = (blocks * (values - torch.where(inside, scaled, 0.0))).sum(-1) * multiplier.squeeze(-1)
    return grad_x, grad_log_m * log_scale_chain(scale, scales)


def log_scale_chain(scale: Tensor, scales: Tensor) -> Tensor:
    """d log m / d log(scale) per block: scale / e4m3(scale) (the rounding passed straight through), 0 where the
    scale is held at e4m3's bounds [2^-9, 448]."""
    in_range = (scale >= E4M3_MIN_SUBNORMAL) & (scale <= E4M3_MAX)
    return torch.where(in_range, scale / scales.float(), 0.0)


def activation_global_scale(calib_amax: Tensor | float) -> Tensor:
    """Static per-tensor input scale of W4A4 (what ModelOpt exports as ``input_scale``)."""
    return global_scale(calib_amax)


def reciprocal_global_scale(amax: Tensor | float) -> Tensor:
    """compressed-tensors stores 1 / s2, computed directly as 448 * 6 / amax (one rounding)."""
    return (E2M1_MAX * E4M3_MAX) / torch.as_tensor(amax, dtype=torch.float32)
