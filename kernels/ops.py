"""One function per NVFP4 operation for callers: C kernels on CPU, Triton on CUDA, the torch reference elsewhere."""

import torch
import torch.nn.functional as F
from torch import Tensor

from nvfp4.kernels import cpu
from nvfp4.kernels import numerics as ref


def _use_c(x: Tensor) -> bool:
    return x.dim() >= 1 and cpu.available()


def _use_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# The operations are torch custom ops (torch.ops.nvfp4.*): one schema, a CPU kernel (C, else the reference), a
# CUDA kernel (Triton, else the reference) and a fake implementation giving shapes alone, so torch.compile and
# CUDA graphs trace through them. kernels/attention.py and kernels/int8_blocks.py add theirs to the namespace.
_LIB = torch.library.Library("nvfp4", "DEF")
_LIB.define("quantize(Tensor x, Tensor gscale, Tensor? scales) -> (Tensor, Tensor)")
_LIB.define("fake_quantize(Tensor x, Tensor gscale, Tensor? scales) -> Tensor")
_LIB.define("linear_w4a16(Tensor x, Tensor packed, Tensor scales, Tensor gscale) -> Tensor")


def _quantize_cpu(x: Tensor, gscale: Tensor, scales: Tensor | None) -> tuple[Tensor, Tensor]:
    if x.dim() == 2 and _use_c(x):
        return cpu.quantize(x, gscale, scales)
    return _quantize_reference(x, gscale, scales)


def _quantize_cuda(x: Tensor, gscale: Tensor, scales: Tensor | None) -> tuple[Tensor, Tensor]:
    if scales is None and x.dim() == 2 and _use_triton():
        from nvfp4.kernels.triton_nvfp4 import quantize_triton

        return quantize_triton(x, gscale)
    return _quantize_reference(x, gscale, scales)


def _quantize_reference(x: Tensor, gscale: Tensor, scales: Tensor | None) -> tuple[Tensor, Tensor]:
    packed, out_scales, _ = ref.quantize_ref(x, gscale, scales)
    return packed, out_scales if scales is None else out_scales.clone()  # an op's output never aliases its input


def _quantize_fake(x: Tensor, gscale: Tensor, scales: Tensor | None) -> tuple[Tensor, Tensor]:
    packed = x.new_empty(*x.shape[:-1], x.shape[-1] // 2, dtype=torch.uint8)
    return packed, x.new_empty(*x.shape[:-1], x.shape[-1] // ref.BLOCK, dtype=torch.float8_e4m3fn)


def _fake_quantize_cpu(x: Tensor, gscale: Tensor, scales: Tensor | None) -> Tensor:
    if _use_c(x) and x.shape[-1] % ref.BLOCK == 0:
        flat = x.detach().reshape(-1, x.shape[-1])
        out = cpu.fake_quantize(flat, gscale, None if scales is None else scales.reshape(-1, scales.shape[-1]))
        return out.reshape(x.shape).to(x.dtype)
    return ref.fake_quantize_ref(x, gscale, scales)


def _fake_quantize_cuda(x: Tensor, gscale: Tensor, scales: Tensor | None) -> Tensor:
    if x.dim() >= 1 and x.shape[-1] % ref.BLOCK == 0 and _use_triton():  # any [..., K] activation, or a weight
        from nvfp4.kernels.triton_nvfp4 import fake_quantize_triton

        return fake_quantize_triton(x, gscale, scales)
    return ref.fake_quantize_ref(x, gscale, scales)


def _linear_reference(x: Tensor, packed: Tensor, scales: Tensor, gscale: Tensor) -> Tensor:
    return F.linear(x, ref.dequantize_ref(packed, scales, gscale).to(x.dtype))


def _linear_cuda(x: Tensor, packed: Tensor, scales: Tensor, gscale: Tensor) -> Tensor:
    if _use_triton():
        from nvfp4.kernels.triton_nvfp4 import matmul_w4a16_triton

        return matmul_w4a16_triton(x, packed, scales, gscale)
    return _linear_reference(x, packed, scales, gscale)


def _linear_fake(x: Tensor, packed: Tensor, scales: Tensor, gscale: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])


def register(lib: torch.library.Library, name: str, cpu_kernel, cuda_kernel, fake) -> None:
    """An op's kernels: `cpu_kernel` on CPU (None: kernels/cpu_ops.cpp registered a C++ one), `cuda_kernel` on CUDA,
    `fake` for tracing (shapes alone)."""
    if cpu_kernel is not None:
        lib.impl(name, cpu_kernel, "CPU")
    lib.impl(name, cuda_kernel, "CUDA")
    torch.library.register_fake(f"nvfp4::{name}", fake, lib=lib)


register(_LIB, "quantize", _quantize_cpu, _quantize_cuda, _quantize_fake)
register(_LIB, "fake_quantize", _fake_quantize_cpu, _fake_quantize_cuda, lambda x, gscale, scales: torch.empty_like(x))
register(_LIB, "linear_w4a16", None if cpu.torch_ops() else _linear_reference, _linear_cuda, _linear_fake)


def quantize(x: Tensor, gscale: Tensor | None = None, scales: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, K] -> (packed uint8 [N, K/2], scales e4m3 [N, K/16], gscale fp32 scalar)."""
    if gscale is None:
        gscale = ref.global_scale(ref.tensor_amax(x))
    packed, scales = torch.ops.nvfp4.quantize(x.detach(), gscale, scales)
    return packed, scales, gscale


def dequantize(packed: Tensor, scales: Tensor, gscale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return ref.dequantize_ref(packed, scales, gscale, dtype)


def _fake_quantize_forward(x: Tensor, gscale: Tensor, scales: Tensor | None) -> Tensor:
    return torch.ops.nvfp4.fake_quantize(x.detach(), gscale, scales)


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
    if x.dim() == 2 and x.is_cuda and _use_triton():
        from nvfp4.kernels.triton_nvfp4 import scale_gradient_triton

        return scale_gradient_triton(x, grad, scale, scales, gscale)
    if x.dim() == 2 and x.device.type == "cpu" and _use_c(x):
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


def linear_w4a16(x: Tensor, packed: Tensor, scales: Tensor, gscale: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ W^T with W [N, K] stored as NVFP4; x [..., K] -> [..., N] (torch.ops.nvfp4.linear_w4a16).

    CUDA: Triton GEMM on the packed bytes. CPU: a C GEMV on the packed bytes for small batches
    (decode), else dequantize into one reused buffer and run BLAS (prefill).
    """
    y = torch.ops.nvfp4.linear_w4a16(x.reshape(-1, x.shape[-1]), packed, scales, gscale).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def linear_bf16_weight(x: Tensor, weight: Tensor) -> Tensor:
    """y = x @ W^T for a weight held in bf16 and fp32 activations (torch.ops.nvfp4.linear_bf16_weight): on CPU a
    C GEMV reads the bf16 bytes (16 rows of x per pass, up to 64 rows); otherwise W is upcast for the call."""
    return torch.ops.nvfp4.linear_bf16_weight(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], -1)


def _linear_bf16_weight(x: Tensor, weight: Tensor, max_gemv_rows: int = 64) -> Tensor:
    if x.device.type == "cpu" and _use_c(x) and x.dtype == torch.float32 and x.shape[0] <= max_gemv_rows:
        return torch.cat([cpu.bf16_gemv(part, weight) for part in x.split(cpu.GEMV_MAX_BATCH)])
    return F.linear(x, weight.to(x.dtype))


_LIB.define("linear_bf16_weight(Tensor x, Tensor weight) -> Tensor")
_LIB.impl("linear_bf16_weight", _linear_bf16_weight, "CompositeExplicitAutograd")
torch.library.register_fake(
    "nvfp4::linear_bf16_weight", lambda x, weight: x.new_empty(x.shape[0], weight.shape[0]), lib=_LIB
)
