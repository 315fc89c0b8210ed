"""CPU fast path: the C kernels in cpu_nvfp4.c and the C++ CPU kernels of the decode ops (cpu_ops.cpp), built once
into one library with the system compilers; the C++ part registers itself with torch's dispatcher when the
library loads, the C kernels are called through ctypes.

Falls back to the torch reference (kernels.numerics) where no C compiler is available.
"""

import atexit
import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("cpu_nvfp4.c")
_TORCH_OPS = Path(__file__).with_name("cpu_ops.cpp")
GEMV_MAX_BATCH = 16  # beyond this, dequantize once into a buffer and let BLAS do the GEMM (also in cpu_ops.cpp)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC")


def _build_dir() -> Path:
    return Path(os.environ.get("NVFP4_CACHE", Path.home() / ".cache" / "nvfp4")) / "kernels"


@dataclass(frozen=True)
class _Build:
    """One way to build the library: its compile commands (in a temporary folder) and what keys its cache entry."""

    name: str
    commands: list[list[str]]
    key: bytes


def _builds(compiler: str) -> list[_Build]:
    """The C kernels with the CPU kernels of torch.ops.nvfp4 (cpu_ops.cpp, torch's headers, ABI flag and libraries:
    the torch build is part of the key), else the C kernels alone (those ops then run torch code)."""
    c_only = _Build("cpu_nvfp4", [[compiler, *FLAGS, "-shared", str(_SOURCE), "-o", "{out}", "-lm"]], b"")
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None or not _TORCH_OPS.is_file():
        return [c_only]
    from torch.utils import cpp_extension

    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    libraries = [flag for path in cpp_extension.library_paths() for flag in (f"-L{path}", f"-Wl,-rpath,{path}")]
    link = [
        cxx,
        *FLAGS,
        "-shared",
        "-std=c++20",
        abi,
        *includes,
        str(_TORCH_OPS),
        "{tmp}/kernels.o",
        "-o",
        "{out}",
        *libraries,
        "-lc10",
        "-ltorch_cpu",
        "-lm",
    ]
    key = _TORCH_OPS.read_bytes() + f"{torch.__version__} {abi} {cxx} {_compiler_facts(cxx)}".encode()
    return [
        _Build("cpu_nvfp4_ops", [[compiler, *FLAGS, "-c", str(_SOURCE), "-o", "{tmp}/kernels.o"], link], key),
        c_only,
    ]


@cache
def library() -> ctypes.CDLL | None:
    """The C kernels, built once per source, flags, compiler and CPU (and torch build, for the torch ops) and cached;
    loading the library registers its torch ops' CPU kernels."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or os.environ.get("NVFP4_NO_C_KERNELS"):
        return None
    folder = _trusted_build_dir()
    for build in _builds(compiler):
        lib = _load_or_build(build, folder / f"{build.name}-{build_key(compiler, build.key)}.so")
        if lib is not None:
            return _bind(lib, torch_ops=build.name.endswith("_ops"))
    return None


def _trusted_build_dir() -> Path:
    """The cache of built libraries; where another user could write to it (and plant a library whose constructor
    would run in this process), a private temporary folder for this process instead."""
    folder = _build_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = _writable_by_others(folder.stat())
    except OSError as error:
        why = str(error)
    if why is None:
        return folder
    private = Path(tempfile.mkdtemp(prefix="nvfp4-kernels-"))
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    log.warning(
        "not loading compiled kernels from %s: %s; building them in %s for this run (run `chmod go-w` on it "
        "or set NVFP4_CACHE to a folder only you can write to)",
        folder,
        why,
        private,
    )
    return private


def _writable_by_others(info: os.stat_result) -> str | None:
    if info.st_uid != os.getuid():
        return f"it belongs to uid {info.st_uid}"
    if info.st_mode & 0o022:
        return f"others can write to it (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _load_or_build(build: _Build, target: Path) -> ctypes.CDLL | None:
    """The cached library when its bytes are the ones built (the recorded hash), else a fresh build of it."""
    if target.exists():
        if not _as_built(target):
            log.warning("%s is not the library built there (no hash, or another one): rebuilding it", target)
        else:
            try:
                return ctypes.CDLL(str(target))
            except OSError as error:
                log.warning("cannot load %s (%s): rebuilding it", target, error)
    if not _compile(build, target):
        return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as error:
        log.warning("%s unavailable: its fresh build does not load (%s)", build.name, error)
        return None


def _hash_record(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _as_built(target: Path) -> bool:
    """Whether target's bytes hash to the digest recorded when it was built, both files writable by us alone."""
    try:
        if any(_writable_by_others(path.stat()) for path in (target, _hash_record(target))):
            return False
        return hashlib.sha256(target.read_bytes()).hexdigest() == _hash_record(target).read_text().strip()
    except OSError:
        return False


def _compile(build: _Build, target: Path) -> bool:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        for command in build.commands:
            result = subprocess.run([arg.format(tmp=tmp, out=built) for arg in command], capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("%s unavailable: %s", build.name, result.stderr.strip()[-500:])
                return False
        built.chmod(0o755)
        record = Path(tmp) / "sha256"
        record.write_text(hashlib.sha256(built.read_bytes()).hexdigest() + "\n")
        record.chmod(0o644)
        built.rename(target)
        record.rename(_hash_record(target))
    return True


def _bind(lib: ctypes.CDLL, torch_ops: bool) -> ctypes.CDLL:
    pointer, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.nvfp4_set_threads.argtypes = [ctypes.c_int]
    lib.nvfp4_quantize.argtypes = [pointer, f32, pointer, pointer, ctypes.c_int, i64, i64]
    lib.nvfp4_fake_quantize.argtypes = [pointer, f32, pointer, pointer, i64, i64]
    lib.bf16_gemv.argtypes = [pointer, i64, pointer, pointer, i64, i64]
    lib.int8_block_gemv.argtypes = [pointer, i64, pointer, pointer, pointer, i64, i64]
    lib.nvfp4_scale_gradient.argtypes = [pointer, pointer, pointer, pointer, f32, pointer, pointer, i64, i64]
    lib.kl_rows.argtypes = [pointer, pointer, pointer, pointer, i64, i64]
    lib.torch_ops = torch_ops
    return lib


def _compiler_facts(compiler: str) -> str:
    """What the compiler makes of the flags on this CPU: `-###` prints its version and `-march=native` expanded to
    this CPU's target and features."""
    return subprocess.run(
        [compiler, *FLAGS, "-###", "-E", "-x", "c", os.devnull], capture_output=True, text=True
    ).stderr


def build_key(compiler: str, extra: bytes = b"") -> str:
    """The cache key of a build: the source, the flags, and the compiler's view of this CPU, so a cache shared with
    another CPU never hands it a library built for instructions it lacks."""
    facts = _SOURCE.read_bytes() + " ".join(FLAGS).encode() + _compiler_facts(compiler).encode() + extra
    return hashlib.sha256(facts).hexdigest()[:16]


def torch_ops() -> bool:
    """Whether the library registered the CPU kernels of torch.ops.nvfp4.linear_w4a16 and decode_attention."""
    lib = library()
    return lib is not None and lib.torch_ops


def available() -> bool:
    return library() is not None


def _sync_threads(lib: ctypes.CDLL) -> None:
    lib.nvfp4_set_threads(torch.get_num_threads())


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
    lib.int8_block_gemv(
        x.data_ptr(),
        x.shape[0],
        codes.contiguous().data_ptr(),
        scales.contiguous().data_ptr(),
        y.data_ptr(),
        codes.shape[0],
        codes.shape[1],
    )
    return y


def quantize(x: Tensor, gscale: Tensor, scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [N, K] -> (packed u8 [N, K/2], scales e4m3 [N, K/16]); bit-identical to numerics.quantize_ref."""
    lib = library()
    x32 = x.detach().float().contiguous()
    rows, cols = x32.shape
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8)
    out_scales = (
        torch.empty(rows, cols // 16, dtype=torch.uint8) if scales is None else scales.view(torch.uint8).clone()
    )
    _sync_threads(lib)
    lib.nvfp4_quantize(
        x32.data_ptr(), float(gscale), packed.data_ptr(), out_scales.data_ptr(), int(scales is not None), rows, cols
    )
    return packed, out_scales.view(torch.float8_e4m3fn)


def fake_quantize(x: Tensor, gscale: Tensor, scales: Tensor | None = None) -> Tensor:
    """x [N, K] -> dequantize(quantize(x)) fp32 in one pass; bit-identical to the two C kernels in a row."""
    lib = library()
    x32 = x.detach().float().contiguous()
    rows, cols = x32.shape
    out = torch.empty(rows, cols, dtype=torch.float32)
    fixed = None if scales is None else scales.view(torch.uint8).contiguous()
    _sync_threads(lib)
    lib.nvfp4_fake_quantize(
        x32.data_ptr(), float(gscale), None if fixed is None else fixed.data_ptr(), out.data_ptr(), rows, cols
    )
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
    lib.nvfp4_scale_gradient(
        x32.data_ptr(),
        grad32.data_ptr(),
        scale.float().contiguous().data_ptr(),
        scales.view(torch.uint8).contiguous().data_ptr(),
        float(gscale),
        grad_x.data_ptr(),
        grad_log.data_ptr(),
        rows,
        cols,
    )
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
    lib.kl_rows(
        teacher.data_ptr(), student.data_ptr(), kl.data_ptr(), None if grad is None else grad.data_ptr(), *teacher.shape
    )
    return kl, grad
