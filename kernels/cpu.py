"""CPU fast path: the C kernels in cpu_nvfp4.c, built once with the system compiler and loaded via ctypes.

Falls back to the torch reference (kernels.numerics) where no C compiler is available.
"""

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("cpu_nvfp4.c")
GEMV_MAX_BATCH = 16  # beyond this, dequantize once into a buffer and let BLAS do the GEMM
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def _build_dir() -> Path:
    return Path(os.environ.get("NVFP4_CACHE", Path.home() / ".cache" / "nvfp4")) / "kernels"


@cache
def library() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or os.environ.get("NVFP4_NO_C_KERNELS"):
        return None
    digest = build_key(compiler)
    target = _build_dir() / f"cpu_nvfp4-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, str(_SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("C kernels unavailable, using torch: %s", result.stderr.strip()[:500])
                return None
            built.rename(target)
    lib = ctypes.CDLL(str(target))
    pointer, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.nvfp4_dequantize.argtypes = [pointer, pointer, f32, pointer, i64, i64]
    lib.nvfp4_gemv.argtypes = [pointer, i64, pointer, pointer, f32, pointer, i64, i64]
    lib.nvfp4_set_threads.argtypes = [ctypes.c_int]
    lib.nvfp4_quantize.argtypes = [pointer, f32, pointer, pointer, ctypes.c_int, i64, i64]
    lib.nvfp4_fake_quantize.argtypes = [pointer, f32, pointer, pointer, i64, i64]
    lib.bf16_gemv.argtypes = [pointer, i64, pointer, pointer, i64, i64]
    lib.int8_block_gemv.argtypes = [pointer, i64, pointer, pointer, pointer, i64, i64]
    lib.nvfp4_scale_gradient.argtypes = [pointer, pointer, pointer, pointer, f32, pointer, pointer, i64, i64]
    lib.kl_rows.argtypes = [pointer, pointer, pointer, pointer, i64, i64]
    lib.decode_attention.argtypes = [pointer] * 7 + [f32, pointer] + [i64] * 5
    return lib


def build_key(compiler: str) -> str:
    """The cache key of a build: the source, the flags, and what the compiler makes of them on this CPU
    (`-###` prints its version and `-march=native` expanded to this CPU's target and features), so a cache
    shared with another CPU never hands it a library built for instructions it lacks."""
    probe = subprocess.run([compiler, *FLAGS, "-###", "-E", "-x", "c", os.devnull], capture_output=True, text=True)
    return hashlib.sha256(_SOURCE.read_bytes() + " ".join(FLAGS).encode() + probe.stderr.encode()).hexdigest()[:16]


def available() -> bool:
    return library() is not None


def _sync_threads(lib: ctypes.CDLL) -> None:
    lib.nvfp4_set_threads(torch.get_num_threads())


def dequantize_into(out: Tensor, packed: Tensor, scales: Tensor, gscale: Tensor) -> Tensor:
    """Write dequantize(packed, scales, gscale) into the fp32 buffer `out` [N, K]; bit-identical to the reference."""
    lib = library()
    rows, cols = packed.shape[0], packed.shape[1] * 2
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (rows, cols)
    _sync_threads(lib)
    lib.nvfp4_dequantize(packed.data_ptr(), scales.view(torch.uint8).data_ptr(), float(gscale), out.data_ptr(), rows, cols)
    return out


_workspace = threading.local()


def dequantize_workspace(packed: Tensor, scales: Tensor, gscale: Tensor) -> Tensor:
    """The dequantized weight in the calling thread's buffer, reused by every weight that thread dequantizes
    (it grows to the largest one): a prefill never holds a dequantized copy of more than one weight, and
    engines in separate threads never share a buffer."""
    rows, cols = packed.shape[0], packed.shape[1] * 2
    buffer = getattr(_workspace, "fp32", None)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = _workspace.fp32 = torch.empty(rows * cols, dtype=torch.float32)
    return dequantize_into(buffer[: rows * cols].view(rows, cols), packed, scales, gscale)


def gemv(x: Tensor, packed: Tensor, scales: Tensor, gscale: Tensor) -> Tensor:
    """x fp32 [M <= 16, K] -> x @ W^T [M, N] reading the packed weight directly."""
    lib = library()
    x = x.contiguous()
    rows, cols = packed.shape[0], packed.shape[1] * 2
    assert x.dtype == torch.float32 and x.shape[-1] == cols and x.shape[0] <= GEMV_MAX_BATCH
    y = torch.empty(x.shape[0], rows, dtype=torch.float32)
    _sync_threads(lib)
    lib.nvfp4_gemv(x.data_ptr(), x.shape[0], packed.data_ptr(), scales.view(torch.uint8).data_ptr(), float(gscale),
                   y.data_ptr(), rows, cols)
    return y


def bf16_gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x fp32 [M <= 16, K] -> x @ W^T [M, N] for a bf16 W [N, K], read as bf16 (half an fp32 copy's bytes)."""
    lib = library()
    x, weight = x.contiguous(), weight.contiguous()
    assert x.dtype == torch.float32 and weight.dtype == torch.bfloat16 and x.shape[0] <= GEMV_MAX_BATCH
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    _sync_threads(lib)
    lib.bf16_gemv(x.data_ptr(), x.shape[0], weight.data_ptr(), y.data_ptr(), weight.shape[0], weight.shape[1])
    return y


def int8_block_gemv(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """x fp32 [M <= 16, K] -> x @ W^T [M, N] for W = bf16(codes int8 [N, K] * scales fp16 [N, K/32])."""
    lib = library()
    x = x.contiguous()
    assert x.dtype == torch.float32 and codes.dtype == torch.int8 and scales.dtype == torch.float16
    assert x.shape[0] <= GEMV_MAX_BATCH and codes.shape[1] == x.shape[1] == scales.shape[1] * 32
    y = torch.empty(x.shape[0], codes.shape[0], dtype=torch.float32)
    _sync_threads(lib)
    lib.int8_block_gemv(x.data_ptr(), x.shape[0], codes.contiguous().data_ptr(), scales.contiguous().data_ptr(),
                        y.data_ptr(), codes.shape[0], codes.shape[1])
    return y


def quantize(x: Tensor, gscale: Tensor, scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [N, K] -> (packed u8 [N, K/2], scales e4m3 [N, K/16]); bit-identical to numerics.quantize_ref."""
    lib = library()
    x32 = x.detach().float().contiguous()
    rows, cols = x32.shape
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8)
    out_scales = torch.empty(rows, cols // 16, dtype=torch.uint8) if scales is None else scales.view(torch.uint8).clone()
    _sync_threads(lib)
    lib.nvfp4_quantize(x32.data_ptr(), float(gscale), packed.data_ptr(), out_scales.data_ptr(), int(scales is not None), rows, cols)
    return packed, out_scales.view(torch.float8_e4m3fn)


def fake_quantize(x: Tensor, gscale: Tensor, scales: Tensor | None = None) -> Tensor:
    """x [N, K] -> dequantize(quantize(x)) fp32 in one pass; bit-identical to the two C kernels in a row."""
    lib = library()
    x32 = x.detach().float().contiguous()
    rows, cols = x32.shape
    out = torch.empty(rows, cols, dtype=torch.float32)
    fixed = None if scales is None else scales.view(torch.uint8).contiguous()
    _sync_threads(lib)
    lib.nvfp4_fake_quantize(x32.data_ptr(), float(gscale), None if fixed is None else fixed.data_ptr(),
                            out.data_ptr(), rows, cols)
    return out


def scale_gradient(x: Tensor, grad: Tensor, scale: Tensor, scales: Tensor, gscale: Tensor) -> tuple[Tensor, Tensor]:
    """x, grad fp32 [N, K], learned block scales fp32 [N, K/16] and their e4m3 rounding `scales` ->
    (grad_x, grad_log_scales) as numerics.scale_gradient_ref."""
    lib = library()
    x32, grad32 = x.detach().float().contiguous(), grad.float().contiguous()
    rows, cols = x32.shape
    grad_x = torch.empty_like(x32)
    grad_log = torch.empty(rows, cols // 16, dtype=torch.float32)
    _sync_threads(lib)
    lib.nvfp4_scale_gradient(x32.data_ptr(), grad32.data_ptr(), scale.float().contiguous().data_ptr(),
                             scales.view(torch.uint8).contiguous().data_ptr(), float(gscale), grad_x.data_ptr(),
                             grad_log.data_ptr(), rows, cols)
    return grad_x, grad_log


def kl_rows(teacher: Tensor, student: Tensor, with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Teacher and student logits fp32 [N, V] -> (KL(softmax(t) || softmax(s)) per row [N], and with
    `with_grad` its gradient w.r.t. the student logits, softmax(s) - softmax(t) [N, V])."""
    lib = library()
    teacher, student = teacher.contiguous(), student.contiguous()
    assert teacher.dtype == student.dtype == torch.float32 and teacher.shape == student.shape and teacher.dim() == 2
    kl = torch.empty(teacher.shape[0], dtype=torch.float32)
    grad = torch.empty_like(student) if with_grad else None
    _sync_threads(lib)
    lib.kl_rows(teacher.data_ptr(), student.data_ptr(), kl.data_ptr(), None if grad is None else grad.data_ptr(),
                *teacher.shape)
    return kl, grad


def decode_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                     positions: Tensor, scale: float) -> Tensor:
    """One decode token per sequence: q [B, H, D], k, v [B, KVH, D] fp32; writes k, v into the caches
    [slots, KVH, max_len, D] at (slots[b], positions[b]) and attends over positions 0..positions[b] -> [B, H, D]."""
    lib = library()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    assert q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype == torch.float32
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slots.dtype == positions.dtype == torch.int64
    (batch, heads, dim), (_, kv_heads, max_len, _) = q.shape, k_cache.shape
    out = torch.empty_like(q)
    _sync_threads(lib)
    lib.decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                         slots.data_ptr(), positions.data_ptr(), scale, out.data_ptr(), batch, heads, kv_heads, max_len, dim)
    return out
