"""GPTQ rounding onto the NVFP4 grid, under ModelOpt's amax block-scale rule or fixed block scales.

GPTQ (Frantar et al., 2022) rounds a linear's weight one input column at a time and moves each
column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the
layer's inputs (H = X^T X over calibration tokens), so that the layer's output error ||(W - Q) X||
is what gets minimised, not the weight error.

With the amax rule (no fixed scales), when a 16-column block is reached each row's block scale is
taken from the block's error-updated values, and the element that sets it is rounded to +-6: the
amax rule applied to the result then gives back the same scale and codes, so every exporter
writes GPTQ's rounding as ordinary NVFP4 with no extra state.

The result is returned as *latent* weights: each value lies inside the rounding interval of its
GPTQ code, where GPTQ's updated value was. ``fake_quantize(latent)`` is exactly GPTQ's rounding,
and QAD, whose steps are small (about the learning rate per step), can still move the borderline
values across. Weights placed on the grid points would sit as far from every boundary as
possible: a QAD pass at lr 1e-5 then changes nothing (measured, docs/BENCHMARKS.md).
"""

import torch
from torch import Tensor

from nvfp4.kernels import numerics

# rounding interval [low, high] of each E2M1 magnitude 0, 0.5, 1, 1.5, 2, 3, 4, 6 (in block-scale units)
_INTERVAL_LOW = (0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_INTERVAL_HIGH = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0)
_MARGIN = 1e-3  # latent values stay this far (in block-scale units) inside their interval: no ties
_CHUNK_ELEMENTS = 1 << 26  # matrices per call hold about this many weights (bounds the fp32 copies)


def gptq_round(
    weight: Tensor,
    hessian: Tensor,
    gscale: Tensor,
    scales: Tensor | None = None,
    damp: float = 0.01,
    lazy_block: int = 32,
) -> Tensor:
    """Latent weights whose NVFP4 quantization is GPTQ's rounding of `weight`.

    weight [B, N, K] (or [N, K]), hessian [B, K, K] (or [K, K], X^T X of the inputs, any positive
    multiple), gscale [B] (or scalar) s2 per matrix, scales e4m3 [B, N, K/16] fixed block scales or
    None for the amax rule. Matrices of one shape are processed together (one Python loop over the
    columns for all of them). -> fp32 latent weights, the shape of `weight`.
    """
    single = weight.dim() == 2
    if single:
        weight, hessian = weight.unsqueeze(0), hessian.unsqueeze(0)
        scales = None if scales is None else scales.unsqueeze(0)
    batch, rows, columns = weight.shape
    if columns % numerics.BLOCK or lazy_block % numerics.BLOCK:
        raise ValueError(f"GPTQ for NVFP4 needs K and the lazy block divisible by 16, got K={columns}, {lazy_block}")
    gscale = torch.as_tensor(gscale, dtype=torch.float32).reshape(-1).expand(batch).to(weight.device)
    step = max(1, _CHUNK_ELEMENTS // (rows * columns))
    out = [
        _gptq_chunk(
            weight[i : i + step],
            hessian[i : i + step],
            gscale[i : i + step],
            None if scales is None else scales[i : i + step],
            damp,
            lazy_block,
        )
        for i in range(0, batch, step)
    ]
    latent = torch.cat(out)
    return latent[0] if single else latent


def _inverse_hessian_factor(hessian: Tensor, weight_t: Tensor, damp: float) -> Tensor:
    """Upper triangular U with U^T U = H^-1 (damped), per matrix; dead inputs (never active) are
    zeroed in `weight_t` [B, K, N] and given a unit diagonal.

    With J the order reversal, J H J = L L^T gives H = A A^T for the upper A = J L J, so U = A^-1:
    one Cholesky and one triangular solve, instead of inverting H and factoring the inverse."""
    hessian = hessian.detach().float().clone()
    diagonal = hessian.diagonal(dim1=-2, dim2=-1)
    dead = diagonal == 0
    weight_t[dead] = 0
    diagonal[dead] = 1
    diagonal += damp * diagonal.mean(-1, keepdim=True)
    lower = torch.linalg.cholesky(hessian.flip(-1, -2))
    identity = torch.eye(hessian.shape[-1], device=hessian.device).expand_as(lower)
    return torch.linalg.solve_triangular(lower, identity, upper=False).flip(-1, -2)


def _gptq_chunk(
    weight: Tensor, hessian: Tensor, gscale: Tensor, scales: Tensor | None, damp: float, lazy_block: int
) -> Tensor:
    work = weight.detach().float().transpose(1, 2).contiguous()  # [B, K, N]: input column k is work[:, k]
    factor = _inverse_hessian_factor(hessian, work, damp)  # [B, K, K]
    table = _Intervals(work.device)
    latent = torch.empty_like(work)
    columns = work.shape[1]
    gscale = gscale.view(-1, 1)
    for start in range(0, columns, lazy_block):
        end = min(start + lazy_block, columns)
        errors = torch.empty(work.shape[0], end - start, work.shape[2], device=work.device)
        for block in range(start, end, numerics.BLOCK):
            unit, lead, zero = _block_rule(
                work[:, block : block + numerics.BLOCK],
                gscale,
                None if scales is None else scales[:, :, block // numerics.BLOCK],
            )
            for k in range(block, block + numerics.BLOCK):
                value = work[:, k] / unit  # [B, N] in block-scale units
                code, inside = table.round(value, pinned=lead == k - block, zero=zero)
                latent[:, k] = inside * unit
                torch.div(work[:, k] - code * unit, factor[:, k, k].unsqueeze(-1), out=errors[:, k - start])
                work[:, k + 1 : end].addcmul_(
                    factor[:, k, k + 1 : end].unsqueeze(-1), errors[:, k - start].unsqueeze(1), value=-1
                )
        work[:, end:].baddbmm_(factor[:, start:end, end:].transpose(1, 2), errors, alpha=-1)
    return latent.transpose(1, 2).contiguous()


def _block_rule(block: Tensor, gscale: Tensor, fixed: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of a 16-column block [B, 16, N]: (scale * s2 [B, N], index of the element pinned to +-6
    (-1: none), all-zero block mask). Fixed scales pin nothing: they do not follow the block's amax."""
    if fixed is not None:
        unit = fixed.float() * gscale
        return unit, torch.full_like(unit, -1, dtype=torch.long), torch.zeros_like(unit, dtype=torch.bool)
    magnitude = block.abs()
    amax, lead = magnitude.max(1)
    scale = numerics.block_scales(block.transpose(1, 2), gscale.view(-1, 1, 1)).float()  # [B, N, 1]
    unit = scale.squeeze(-1) * gscale
    # below the smallest FP8 scale the amax maps under 6: nothing to pin, the clamp gives the scale back
    clamped = amax / (numerics.E2M1_MAX * gscale) < numerics.E4M3_MIN_SUBNORMAL
    return unit, torch.where(clamped, -1, lead), amax == 0


class _Intervals:
    """E2M1 rounding of block-scale units with each code's rounding interval, by table lookup on the code."""

    def __init__(self, device: torch.device):
        self.magnitude = torch.tensor(numerics.E2M1_VALUES[:8], device=device)
        self.low = torch.tensor(_INTERVAL_LOW, device=device) + _MARGIN
        self.high = torch.tensor(_INTERVAL_HIGH, device=device) - _MARGIN
        self.low[0] = 0.0
        self.high[-1] = numerics.E2M1_MAX  # up to 6 itself: never above the pinned amax

    def round(self, value: Tensor, pinned: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
        """-> (code values, latent values inside their code's interval), both in block-scale units.
        Pinned elements take +-6, all-zero blocks 0 (their latent is the code itself)."""
        index = (numerics.encode_e2m1(value) & 7).long()
        index = torch.where(pinned, len(_INTERVAL_LOW) - 1, index).masked_fill_(zero, 0)
        negative = value < 0
        code = self.magnitude[index]
        inside = torch.where(pinned | zero, code, value.abs().clamp(min=self.low[index], max=self.high[index]))
        return torch.where(negative, -code, code), torch.where(negative, -inside, inside)
