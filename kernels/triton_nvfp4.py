"""Triton NVFP4 kernels: quantize+pack, fake-quantize (QAD forward), the learned block scales' backward
and the W4A16 GEMM.

Bit-identical to kernels/numerics.py for quantize and fake-quantize: the FP8 block scale is rounded
arithmetically (no reliance on a hardware cvt's rounding mode) and divisions use `tl.div_rn`
(IEEE round-to-nearest, like torch). Runs natively on CUDA and on CPU tensors under TRITON_INTERPRET=1.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from nvfp4.kernels.numerics import block_multiplier, log_scale_chain

BLOCKS_PER_PROGRAM = 64


@triton.jit
def _e4m3_round(s):
    """s in [2^-9, 448] (fp32) -> (value exactly representable in e4m3, its byte), ties to even."""
    bits = s.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    v = s / step  # exact: division by a power of two
    q = tl.floor(v)
    frac = v - q
    odd = (q.to(tl.int32) & 1) == 1
    q = tl.where((frac > 0.5) | ((frac == 0.5) & odd), q + 1.0, q)
    value = q * step
    qi = q.to(tl.int32)
    byte = tl.where(qi == 16, ((exponent + 8) << 3), tl.where(qi < 8, qi, ((exponent + 7) << 3) | (qi - 8)))
    return value, byte.to(tl.uint8)


@triton.jit
def _e2m1_codes(scaled):
    a = tl.abs(scaled)
    code = (
        (a > 0.25).to(tl.uint8)
        + (a >= 0.75).to(tl.uint8)
        + (a > 1.25).to(tl.uint8)
        + (a >= 1.75).to(tl.uint8)
        + (a > 2.5).to(tl.uint8)
        + (a >= 3.5).to(tl.uint8)
        + (a > 5.0).to(tl.uint8)
    )
    return code | ((scaled < 0).to(tl.uint8) << 3)


@triton.jit
def _e2m1_values(code):
    c = (code & 7).to(tl.float32)
    magnitude = tl.where(c < 4, c * 0.5, tl.where(c < 6, c - 2.0, tl.where(c == 6, 4.0, 6.0)))
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def _block_scales(x, gscale):
    """x [B, 16] fp32 -> (block multiplier float(scale) * s2 [B], scale bytes [B])."""
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.div_rn(amax, 6.0 * gscale)
    s = tl.where(s == 0, 1.0, s)
    s = tl.minimum(tl.maximum(s, 0.001953125), 448.0)
    value, byte = _e4m3_round(s)
    return value * gscale, byte


@triton.jit
def _quantize_kernel(x_ptr, packed_ptr, scales_ptr, gscale_ptr, n_blocks, BLOCKS: tl.constexpr):
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    live = blocks < n_blocks
    x = tl.load(x_ptr + blocks[:, None] * 16 + tl.arange(0, 16)[None, :], mask=live[:, None], other=0.0).to(tl.float32)
    multiplier, byte = _block_scales(x, tl.load(gscale_ptr))
    codes = _e2m1_codes(tl.div_rn(x, multiplier[:, None]))
    even, odd = tl.split(tl.reshape(codes, (BLOCKS, 8, 2)))
    tl.store(packed_ptr + blocks[:, None] * 8 + tl.arange(0, 8)[None, :], even | (odd << 4), mask=live[:, None])
    tl.store(scales_ptr + blocks, byte, mask=live)


@triton.jit
def _fake_quantize_kernel(
    x_ptr, out_ptr, gscale_ptr, multiplier_ptr, n_blocks, BLOCKS: tl.constexpr, GIVEN_SCALES: tl.constexpr
):
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    live = blocks < n_blocks
    offsets = blocks[:, None] * 16 + tl.arange(0, 16)[None, :]
    x = tl.load(x_ptr + offsets, mask=live[:, None], other=0.0).to(tl.float32)
    if GIVEN_SCALES:
        multiplier = tl.load(multiplier_ptr + blocks, mask=live, other=1.0)
    else:
        multiplier, _ = _block_scales(x, tl.load(gscale_ptr))
    values = _e2m1_values(_e2m1_codes(tl.div_rn(x, multiplier[:, None])))
    tl.store(out_ptr + offsets, values * multiplier[:, None], mask=live[:, None])


@triton.jit
def _scale_gradient_kernel(
    x_ptr, grad_ptr, multiplier_ptr, chain_ptr, grad_x_ptr, grad_log_ptr, n_blocks, BLOCKS: tl.constexpr
):
    """numerics.scale_gradient_ref per block of 16: grad_x = grad where |u| <= 6 (u = x / m), and
    d/d log(scale) = m * sum grad * (q - u unclipped, q clipped) * the log-scale chain factor."""
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    live = blocks < n_blocks
    offsets = blocks[:, None] * 16 + tl.arange(0, 16)[None, :]
    x = tl.load(x_ptr + offsets, mask=live[:, None], other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=live[:, None], other=0.0).to(tl.float32)
    multiplier = tl.load(multiplier_ptr + blocks, mask=live, other=1.0)
    scaled = tl.div_rn(x, multiplier[:, None])
    inside = tl.abs(scaled) <= 6.0
    values = _e2m1_values(_e2m1_codes(scaled))
    tl.store(grad_x_ptr + offsets, tl.where(inside, grad, 0.0), mask=live[:, None])
    grad_log_m = tl.sum(grad * (values - tl.where(inside, scaled, 0.0)), axis=1) * multiplier
    tl.store(grad_log_ptr + blocks, grad_log_m * tl.load(chain_ptr + blocks, mask=live, other=0.0), mask=live)


def _grid_blocks(x: Tensor) -> tuple[Tensor, int]:
    if x.shape[-1] % 16:
        raise ValueError(f"NVFP4 needs the last dimension divisible by 16, got shape {tuple(x.shape)}")
    flat = x.contiguous()
    return flat, flat.numel() // 16


def quantize_triton(x: Tensor, gscale: Tensor) -> tuple[Tensor, Tensor]:
    """x [N, K] -> (packed uint8 [N, K/2], scales float8_e4m3fn [N, K/16])."""
    flat, n_blocks = _grid_blocks(x)
    packed = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(*x.shape[:-1], x.shape[-1] // 16, dtype=torch.uint8, device=x.device)
    gscale = gscale.float().reshape(1).to(x.device)
    _quantize_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
        flat, packed, scales, gscale, n_blocks, BLOCKS=BLOCKS_PER_PROGRAM
    )
    return packed, scales.view(torch.float8_e4m3fn)


def fake_quantize_triton(x: Tensor, gscale: Tensor, scales: Tensor | None = None) -> Tensor:
    """dequantize(quantize(x)) in x.dtype, without materialising codes; given e4m3 `scales` [..., K/16]
    (a scale search's, or learned ones) are used as they are, else ModelOpt's amax rule.

    The kernel writes fp32 and torch casts, so bf16/fp16 rounding is torch's own (the reference's).
    """
    flat, n_blocks = _grid_blocks(x)
    out = torch.empty(flat.shape, dtype=torch.float32, device=x.device)
    gscale = gscale.float().reshape(1).to(x.device)
    multiplier = gscale if scales is None else block_multiplier(scales, gscale).reshape(-1).contiguous()
    _fake_quantize_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
        flat, out, gscale, multiplier, n_blocks, BLOCKS=BLOCKS_PER_PROGRAM, GIVEN_SCALES=scales is not None
    )
    return out.to(x.dtype)


def scale_gradient_triton(
    x: Tensor, grad: Tensor, scale: Tensor, scales: Tensor, gscale: Tensor
) -> tuple[Tensor, Tensor]:
    """Backward of fake_quantize_triton(x, gscale, scales) for block scales learned as logarithms: `scale` the
    fp32 exp of the logarithms [..., K/16], `scales` its e4m3 rounding. -> (grad_x fp32, grad_log_scales fp32),
    as numerics.scale_gradient_ref (grad_x exactly; the block sums in another order)."""
    flat, n_blocks = _grid_blocks(x)
    grad = grad.contiguous()
    gscale = gscale.float().reshape(1).to(x.device)
    multiplier = block_multiplier(scales, gscale).reshape(-1).contiguous()
    chain = log_scale_chain(scale.float(), scales).reshape(-1).contiguous()
    grad_x = torch.empty(flat.shape, dtype=torch.float32, device=x.device)
    grad_log = torch.empty(scale.shape, dtype=torch.float32, device=x.device)
    _scale_gradient_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
        flat, grad, multiplier, chain, grad_x, grad_log, n_blocks, BLOCKS=BLOCKS_PER_PROGRAM
    )
    return grad_x, grad_log


@triton.jit
def _dequantized_tile(packed_ptr, scales_ptr, offs_n, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] / s2 as fp32 [BLOCK_N, BLOCK_K], dequantized in registers.

    code value x block scale has at most 5 significant bits in [2^-10, 2688], so it is exact in
    bf16 and fp16 too: tensor-core dots lose nothing, and s2 is applied once to the accumulator.
    """
    half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    live = (offs_n[:, None] < N) & (half[None, :] < K // 2)
    byte = tl.load(packed_ptr + offs_n[:, None] * (K // 2) + half[None, :], mask=live, other=0)
    codes = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_K))
    groups = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    scale_live = (offs_n[:, None] < N) & (groups[None, :] < K // 16)
    scale = tl.load(scales_ptr + offs_n[:, None] * (K // 16) + groups[None, :], mask=scale_live, other=0.0).to(
        tl.float32
    )
    multiplier = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCK_K // 16, 16)), (BLOCK_N, BLOCK_K))
    return _e2m1_values(codes) * multiplier


@triton.jit
def _matmul_kernel(
    x_ptr,
    packed_ptr,
    scales_ptr,
    gscale_ptr,
    y_ptr,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HALF_DOT: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gscale = tl.load(gscale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0
        )
        w = _dequantized_tile(packed_ptr, scales_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K)
        if HALF_DOT:  # tensor cores in x's 16-bit dtype; w is exact in it
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
        else:  # fp32 products of 16-bit x and w are exact too; "ieee": no silent TF32 for fp32 x
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
    acc = acc * gscale
    tl.store(
        y_ptr + offs_m[:, None] * N + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@triton.jit
def _gemv_kernel(
    x_ptr, packed_ptr, scales_ptr, gscale_ptr, y_ptr, M, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Decode (small M): one row of x per program, no tensor-core padding; weights stream once per row."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gscale = tl.load(gscale_ptr)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * K + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _dequantized_tile(packed_ptr, scales_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K)
        acc += tl.sum(w * x[None, :], axis=1)
    acc = acc * gscale
    tl.store(y_ptr + m * N + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def matmul_w4a16_triton(x: Tensor, packed: Tensor, scales: Tensor, gscale: Tensor) -> Tensor:
    """x [M, K] (bf16/fp16/fp32) @ W^T, W [N, K] as NVFP4 -> [M, N] in x.dtype; fp32 accumulation."""
    M, K = x.shape
    N = packed.shape[0]
    if K % 16 or packed.shape[1] * 2 != K:
        raise ValueError(
            f"x [M, K={K}] does not match packed weight {tuple(packed.shape)} (K must be a multiple of 16)"
        )
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    gscale = gscale.float().reshape(1).to(x.device)
    packed, scales = packed.contiguous(), scales.contiguous()
    # K tails (K % BLOCK_K != 0) are masked, so any K divisible by 16 works with any tile.
    if M == 1:  # decode GEMV: narrow N tiles so K=N=4096 still gives 256 programs to stream weights
        _gemv_kernel[(M, triton.cdiv(N, 16))](x, packed, scales, gscale, y, M, N, K, BLOCK_N=16, BLOCK_K=256)
    else:
        block_m = 16 if M <= 16 else 64
        block_n = 32 if M <= 16 else 64
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        # the interpreter's bf16 tl.dot returns garbage (triton 3.9), so CPU tensors take the fp32 dot
        half_dot = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
        _matmul_kernel[grid](
            x, packed, scales, gscale, y, M, N, K, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, HALF_DOT=half_dot
        )
    return y
