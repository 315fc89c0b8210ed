"""Block-scale search: pick, per 16-element block, the FP8 scale with the least (weighted) squared error.

ModelOpt's amax rule (sb = fp8(block_amax / (6 * s2))) maps the block maximum exactly onto 6, which
wastes the coarse top of the E2M1 grid on one value. Trying the FP8 values reachable from
factors 0.4..1.5 around the amax scale and keeping the best one lowers the weight error
(docs/BENCHMARKS.md; 0.4..1.5 measured better than the first 0.7..1.3: above 1 the block maximum can
land on a lower E2M1 point such as 4, below 1 the largest values clip in exchange for a finer grid).
The amax scale is always a candidate and only a strictly smaller error replaces it, so the result is
never worse per block. Errors use the exact NVFP4 numerics
(`ops.fake_quantize` with the candidate scales: the C kernel on CPU, elsewhere
`numerics.fake_quantize_ref`, bit-identical); the global scale s2 is left untouched,
so fused groups keep their shared s2.

`mse-act` weights each input channel's squared error by a calibration statistic (E[x_j^2]), which
is the expected output error of the linear when channels are uncorrelated.
"""

import torch
from torch import Tensor

from nvfp4.kernels import numerics
from nvfp4.kernels.ops import fake_quantize

SEARCH_MODES = ("mse", "mse-act")
FACTOR_RANGE = (0.4, 1.5)
_E4M3_MIN_CODE, _E4M3_MAX_CODE = 0x01, 0x7E  # 2**-9 and 448 (0x7F is NaN); positive codes sort like values
_CHUNK_ELEMENTS = 1 << 22  # rows per chunk hold about this many weights: bounds the temporaries


def search_block_scales(
    weight: Tensor,
    gscale: Tensor,
    mode: str,
    act_weight: Tensor | None = None,
    factors: tuple[float, float] | None = None,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> Tensor:  # weight [out, in], act_weight [in] -> e4m3 [out, in/16]
    """Least-squared-error FP8 block scales under the fixed global scale `gscale`; candidates from
    factors[0] to factors[1] times the amax scale (default FACTOR_RANGE).

    Vectorised over every block of a chunk of rows; the Python loop runs over candidate steps only.
    """
    factors = factors or FACTOR_RANGE
    _check_inputs(weight, mode, act_weight, factors)
    weight = weight.detach()
    gscale = gscale.detach().float().reshape(()).to(weight.device)
    if act_weight is not None:
        act_weight = act_weight.detach().float().to(weight.device)
    rows = max(1, chunk_elements // weight.shape[1])
    codes = [_search_rows(chunk.float(), gscale, act_weight, factors) for chunk in weight.split(rows)]
    return torch.cat(codes).view(torch.float8_e4m3fn)


def block_errors(weight: Tensor, gscale: Tensor, scales: Tensor, act_weight: Tensor | None = None) -> Tensor:
    """Per-block (weighted) squared error of NVFP4 with the given scales: [out, in] -> fp32 [out, in/16]."""
    return _block_errors(weight.detach().float(), gscale, scales, act_weight, unit=1.0)


def _block_errors(
    weight: Tensor, gscale: Tensor, scales: Tensor, act_weight: Tensor | None, unit: Tensor | float
) -> Tensor:
    # the search measures errors in units of s2 so that fp32 squares neither overflow nor flush to zero
    error = ((weight - fake_quantize(weight, gscale, scales)) / unit).square()
    if act_weight is not None:
        error = error * act_weight.float().to(error.device)
    return error.unflatten(-1, (-1, numerics.BLOCK)).sum(-1)


def _search_rows(weight: Tensor, gscale: Tensor, act_weight: Tensor | None, factors: tuple[float, float]) -> Tensor:
    """-> uint8 bit patterns of the chosen e4m3 scales (where/cat lack float8 kernels on some devices)."""
    best = numerics.block_scales(weight, gscale).view(torch.uint8)
    best_error = _block_errors(weight, gscale, best.view(torch.float8_e4m3fn), act_weight, gscale)
    amax_scale = weight.unflatten(-1, (-1, numerics.BLOCK)).abs().amax(-1) / (numerics.E2M1_MAX * gscale)
    low, high = (_e4m3_code(amax_scale * f) for f in factors)
    for step in range(int((high - low).max()) + 1):
        # every FP8 value between fp8(0.4 s) and fp8(1.5 s), walked by code; blocks with a shorter range repeat their top
        candidate = torch.minimum(low + step, high).to(torch.uint8)
        error = _block_errors(weight, gscale, candidate.view(torch.float8_e4m3fn), act_weight, gscale)
        better = error < best_error
        best = torch.where(better, candidate, best)
        best_error = torch.where(better, error, best_error)
    return best


def _e4m3_code(scale: Tensor) -> Tensor:  # fp32 -> int16 bit pattern of the clamped, rounded e4m3 value
    clamped = scale.clamp(min=numerics.E4M3_MIN_SUBNORMAL, max=numerics.E4M3_MAX)
    return clamped.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16).clamp(_E4M3_MIN_CODE, _E4M3_MAX_CODE)


def _check_inputs(weight: Tensor, mode: str, act_weight: Tensor | None, factors: tuple[float, float]) -> None:
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown scale search mode {mode!r}; choose one of {', '.join(SEARCH_MODES)}")
    if weight.dim() != 2 or weight.shape[1] % numerics.BLOCK:
        raise ValueError(f"expected a 2-D weight with in_features divisible by 16, got shape {tuple(weight.shape)}")
    if not 0 < factors[0] <= 1 <= factors[1]:
        raise ValueError(f"factor range must contain 1 and be positive, got {factors}")
    if mode == "mse-act":
        if act_weight is None:
            raise ValueError("scale search 'mse-act' needs per-input-channel activation statistics (act_weight)")
        if act_weight.shape != (weight.shape[1],):
            raise ValueError(f"act_weight must have shape ({weight.shape[1]},), got {tuple(act_weight.shape)}")
        if not torch.isfinite(act_weight).all() or (act_weight < 0).any():
            raise ValueError("act_weight must be finite and non-negative")
    elif act_weight is not None:
        raise ValueError("act_weight is only used by scale search 'mse-act'")
