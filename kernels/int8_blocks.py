"""Block-int8 tables: a bf16 tensor held losslessly as int8 codes and one fp16 scale per 32 values.

A tensor dequantized from a GGUF Q8_0 block (value = code * scale, then rounded to bf16) is exactly
`bf16(code * scale)` again, so serving it from the codes loses nothing and reads 8.5 bits per value
instead of 16. `exact_int8_blocks` finds the codes and scales, and answers None for any tensor that
is not of that form; nothing is ever approximated.
"""

import torch
from torch import Tensor

from nvfp4.kernels import cpu

BLOCK = 32
# amax/127 from a bf16-rounded amax is within 2^-9 (~4 fp16 steps) of the block's scale: the steps tried
# around it for the blocks the first guess misses
_SCALE_NEIGHBOURS = (-1, 1, -2, 2, -3, 3, -4, 4, -5, 5)


def values(codes: Tensor, scales: Tensor) -> Tensor:
    """codes int8 [..., K], scales fp16 [..., K/32] -> the bf16 numbers they hold, as fp32 [..., K]."""
    blocks = codes.float().unflatten(-1, (-1, BLOCK)) * scales.float().unsqueeze(-1)
    return blocks.bfloat16().float().flatten(-2)


def _codes_for(blocks: Tensor, scale: Tensor) -> Tensor:
    divisor = scale.float().unsqueeze(-1)
    nonzero = divisor > 0
    return torch.where(nonzero, blocks / torch.where(nonzero, divisor, 1.0), 0.0).round().clamp(-128, 127)


def _holds(blocks: Tensor, scales: Tensor) -> Tensor:
    """Per block: do codes at this scale give back its values exactly?"""
    return ((_codes_for(blocks, scales) * scales.float().unsqueeze(-1)).bfloat16().float() == blocks).all(-1)


def exact_int8_blocks(weight: Tensor, rows_per_chunk: int = 4096) -> tuple[Tensor, Tensor] | None:
    """(codes int8 [N, K], scales fp16 [N, K/32]) with values(codes, scales) == weight bit for bit, else None.

    Works `rows_per_chunk` rows at a time (bounded temporaries) and stops at the first chunk that
    is not of this form, so a tensor of any other origin costs one chunk's look."""
    if weight.dim() != 2 or weight.shape[1] % BLOCK or not weight.dtype.is_floating_point or weight.numel() == 0:
        return None
    codes, scales = [], []
    for rows in weight.detach().split(rows_per_chunk):
        found = _exact_chunk(rows.float().unflatten(-1, (-1, BLOCK)))
        if found is None:
            return None
        codes.append(found[0])
        scales.append(found[1])
    return torch.cat(codes), torch.cat(scales)


def _exact_chunk(blocks: Tensor) -> tuple[Tensor, Tensor] | None:
    if not torch.isfinite(blocks).all():
        return None
    first = (blocks.abs().amax(-1) / 127).half()  # Q8_0's rule
    if not torch.isfinite(first).all():
        return None
    scales, exact = first.clone(), _holds(blocks, first)
    if not (exact & (first > 0)).any():  # a Q8_0 source gets 15-100% of its non-zero blocks at the first
        return None  # guess; none: not of this form, and the neighbours need not be tried
    for step in _SCALE_NEIGHBOURS:  # only on the blocks still missed
        if exact.all():
            break
        missed = (~exact).nonzero(as_tuple=True)
        candidate = (first[missed].view(torch.int16) + step).clamp(min=0).view(torch.float16)
        hit = _holds(blocks[missed], candidate)
        scales[tuple(i[hit] for i in missed)] = candidate[hit]
        exact[tuple(i[hit] for i in missed)] = True
    if not exact.all():
        return None
    return _codes_for(blocks, scales).to(torch.int8).flatten(-2), scales


def linear(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """y = x @ W^T for W = values(codes, scales) and x [..., K] (torch.ops.nvfp4.linear_int8_blocks)."""
    return torch.ops.nvfp4.linear_int8_blocks(x.reshape(-1, x.shape[-1]), codes, scales).reshape(*x.shape[:-1], -1)


MAX_GEMV_ROWS = 64
ROWS_PER_CHUNK = 4096


def _linear(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """On CPU a C GEMV reads the codes (16 rows of x per pass, up to MAX_GEMV_ROWS); otherwise W is rebuilt
    ROWS_PER_CHUNK rows at a time."""
    if x.device.type == "cpu" and cpu.available() and x.dtype == torch.float32 and x.shape[0] <= MAX_GEMV_ROWS:
        return torch.cat([cpu.int8_block_gemv(part, codes, scales) for part in x.split(cpu.GEMV_MAX_BATCH)])
    chunks = zip(codes.split(ROWS_PER_CHUNK), scales.split(ROWS_PER_CHUNK))
    return torch.cat([x @ values(c, s).to(x.dtype).T for c, s in chunks], dim=-1)


_LIB = torch.library.Library("nvfp4", "FRAGMENT")
_LIB.define("linear_int8_blocks(Tensor x, Tensor codes, Tensor scales) -> Tensor")
_LIB.impl("linear_int8_blocks", _linear, "CompositeExplicitAutograd")
torch.library.register_fake(
    "nvfp4::linear_int8_blocks", lambda x, codes, scales: x.new_empty(x.shape[0], codes.shape[0]), lib=_LIB
)


def q8_0_round(x: Tensor) -> Tensor:
    """x rounded as llama.cpp's CPU kernels round a matmul's activations for 4-bit weights (GGUF Q8_0: blocks of
    32 along the last axis, codes round(x * 127 / amax), scale amax / 127 stored as fp16)."""
    blocks = x.float().unflatten(-1, (-1, BLOCK))
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, 0.0)
    codes = (blocks * inverse).round().clamp(-127, 127)
    return (codes * (amax / 127).half().float()).flatten(-2).to(x.dtype)
