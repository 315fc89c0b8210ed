"""One function per NVFP4 operation for callers: Triton on CUDA, the torch reference elsewhere."""

import torch
from torch import Tensor

from nvfp4.kernels import numerics as ref


def _use_c(x: Tensor) -> bool:
    from nvfp4.kernels import cpu

    return x.device.type == "cpu" and x.dim() >= 1 and cpu.available()


def _use_triton(x: Tensor) -> bool:
    if not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def quantize(x: Tensor, gscale: Tensor | None = None, scales: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, K] -> (packed uint8 [N, K/2], scales e4m3 [N, K/16], gscale fp32 scalar)."""
    if gscale is None:
        gscale = ref.global_scale(ref.tensor_amax(x))
    if scales is None and x.dim() == 2 and _use_triton(x):
        from nvfp4.kernels.triton_nvfp4 import quantize_triton

        packed, scales = quantize_triton(x, gscale)
        return packed, scales, gscale
    if x.dim() == 2 and _use_c(x):
        from nvfp4.kernels import cpu

        packed, scales = cpu.quantize(x, gscale, scales)
        return packed, scales, gscale
    return ref.quantize_ref(x, gscale, scales)


def dequantize(packed: Tensor, scales: Tensor, gscale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return ref.dequantize_ref(packed, scales, gscale, dtype)


def _fake_quantize_forward(x: Tensor, gscale: Tensor, scales: Tensor | None) -> Tensor:
    if x.dim() >= 1 and x.shape[-1] % ref.BLOCK == 0 and _use_triton(x):  # any [..., K] activation, or a weight
        from nvfp4.kernels.triton_nvfp4 import fake_quantize_triton

        return fake_quantize_triton(x, gscale, scales)
    if _use_c(x) and x.shape[-1] % ref.BLOCK == 0:
        from nvfp4.kernels import cpu

        flat = x.detach().reshape(-1, x.shape[-1])
        out = cpu.fake_quantize(flat, gscale, None if scales is None else scales.reshape(-1, scales.shape[-1]))
        return out.reshape(x.shape).to(x.dtype)
    return ref.fake_quantize_ref(x, gscale, scales)


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gscale: Tensor, scales: Tensor | None) -> Tensor:
        return _fake_quantize_forward(x, gscale, scales)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None  # straight-through: d fq(x) / dx = 1


def fake_quantize(x: Tensor, gscale: Tensor, scales: Tensor | None = None) -> Tensor:
    """dequantize(quantize(x)) exactly in the forward pass, identity gradient in the backward pass.

    With ``scales`` fixed (e.g. from a scale search) only the codes are re-derived.
    """
    return _FakeQuantizeSTE.apply(x, gscale, scales)


def _scale_gradient(x: Tensor, grad: Tensor, scale: Tensor, scales: Tensor, gscale: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() == 2 and _use_triton(x):
        from nvfp4.kernels.triton_nvfp4 import scale_gradient_triton

        return scale_gradient_triton(x, grad, scale, scales, gscale)
    if x.dim() == 2 and _use_c(x):
        from nvfp4.kernels import cpu

        return cpu.scale_gradient(x, grad, scale, scales, gscale)
    return ref.scale_gradient_ref(x, grad, scale, gscale)


class _LearnedScalesFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, log_scales: Tensor, gscale: Tensor) -> Tensor:
        scale = log_scales.detach().float().exp()  # = scales_from_log, keeping the fp32 scale for the backward
        scales = ref.e4m3_scales(scale)
        ctx.save_for_backward(x, scale, scales, gscale)
        ctx.log_dtype = log_scales.dtype
        return _fake_quantize_forward(x, gscale, scales)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, scale, scales, gscale = ctx.saved_tensors
        grad_x, grad_log = _scale_gradient(x, grad, scale, scales, gscale)
        return grad_x.to(x.dtype), grad_log.to(ctx.log_dtype), None


def fake_quantize_learned(x: Tensor, gscale: Tensor, log_scales: Tensor) -> Tensor:
    """fake_quantize(x, gscale, scales_from_log(log_scales)) in the forward pass; in the backward the
    gradient reaches x (straight through, zero where a value clips) and the block scales' logarithms."""
    return _LearnedScalesFakeQuantize.apply(x, log_scales, gscale)


def fake_quantize_activation(x: Tensor, input_gscale: Tensor) -> Tensor:
    """W4A4 activations: dynamic per-16 block scales under the static global input scale."""
    return fake_quantize(x, input_gscale)


def _cpu_weight(packed: Tensor, scales: Tensor, gscale: Tensor, workspace: dict | None) -> Tensor:
    """The dequantized weight in a buffer reused by every layer sharing `workspace` (no resident copy)."""
    from nvfp4.kernels import cpu

    rows, cols = packed.shape[0], packed.shape[1] * 2
    workspace = {} if workspace is None else workspace
    buffer = workspace.get("fp32")
    if buffer is None or buffer.numel() < rows * cols:
        buffer = workspace["fp32"] = torch.empty(rows * cols, dtype=torch.float32)
    return cpu.dequantize_into(buffer[: rows * cols].view(rows, cols), packed, scales, gscale)


def linear_w4a16(
    x: Tensor, packed: Tensor, scales: Tensor, gscale: Tensor, bias: Tensor | None = None, workspace: dict | None = None
) -> Tensor:
    """y = x @ W^T with W [N, K] stored as NVFP4; x [..., K] -> [..., N].

    CUDA: Triton GEMM on the packed bytes. CPU: a C GEMV on the packed bytes for small batches
    (decode), else dequantize into the shared `workspace` buffer and run BLAS (prefill).
    """
    x2d = x.reshape(-1, x.shape[-1])
    if _use_triton(x):
        from nvfp4.kernels.triton_nvfp4 import matmul_w4a16_triton

        y = matmul_w4a16_triton(x2d, packed, scales, gscale)
    elif _use_c(x):
        from nvfp4.kernels import cpu

        if x.dtype == torch.float32 and x2d.shape[0] <= cpu.GEMV_MAX_BATCH:
            y = cpu.gemv(x2d, packed, scales, gscale)
        else:
            y = torch.nn.functional.linear(x2d, _cpu_weight(packed, scales, gscale, workspace).to(x.dtype))
    else:  # no C compiler, or a device without Triton: the torch reference
        y = torch.nn.functional.linear(x2d, ref.dequantize_ref(packed, scales, gscale).to(x.dtype))
    y = y.reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def linear_bf16_weight(x: Tensor, weight: Tensor, max_gemv_rows: int = 64) -> Tensor:
    """y = x @ W^T for a weight held in bf16 and fp32 activations: on CPU a C GEMV reads the bf16
    bytes (16 rows of x per pass, up to `max_gemv_rows`); otherwise W is upcast for the call."""
    x2d = x.reshape(-1, x.shape[-1])
    if _use_c(x) and x.dtype == torch.float32 and x2d.shape[0] <= max_gemv_rows:
        from nvfp4.kernels import cpu

        y = torch.cat([cpu.bf16_gemv(part, weight) for part in x2d.split(cpu.GEMV_MAX_BATCH)])
    else:
        y = torch.nn.functional.linear(x2d, weight.to(x.dtype))
    return y.reshape(*x.shape[:-1], -1)
