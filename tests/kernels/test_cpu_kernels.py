"""The C CPU kernels (kernels/cpu_nvfp4.c) against the torch reference."""

import pytest
import torch

from nvfp4.kernels import cpu
from nvfp4.kernels import numerics as nv
from nvfp4.kernels.linear import NVFP4PackedLinear, PackedWeight
from nvfp4.kernels.ops import linear_w4a16
from support.numerics import sqnr

SHAPES = [(16, 16), (48, 96), (100, 160), (1536, 576), (576, 1536)]


def test_c_kernels_build_here():
    assert cpu.available(), "a C compiler is on every machine we support; the build must succeed"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 1e3])
def test_prefill_dequantization_is_bit_identical(shape, magnitude):
    w = torch.randn(shape) * magnitude
    w[0, :16] = 0
    w[-1, -16:] = -0.0
    packed, scales, gscale = nv.quantize_ref(w)
    x = torch.randn(40, shape[1])  # past 16 rows: the C++ kernel dequantizes into its buffer, then the same BLAS call
    expected = torch.nn.functional.linear(x, nv.dequantize_ref(packed, scales, gscale))
    assert torch.equal(linear_w4a16(x, packed, scales, gscale), expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_gemv_matches_dense_matmul(shape, batch):
    packed, scales, gscale = nv.quantize_ref(torch.randn(shape))
    x = torch.randn(batch, shape[1])
    expected = (x.double() @ nv.dequantize_ref(packed, scales, gscale).double().T).float()
    got = linear_w4a16(x, packed, scales, gscale)  # up to 16 rows: the C GEMV on the packed bytes
    assert sqnr(expected, got) > 120, f"{shape=} {batch=}"  # only fp32 summation order differs


@pytest.mark.parametrize("cols", [64, 576, 100], ids=lambda c: f"K{c}")  # 100: a tail past the last 8
@pytest.mark.parametrize("rows", [1, 3, 16, 40, 90], ids=lambda r: f"M{r}")
def test_bf16_weight_linear_matches_fp32_matmul(rows, cols):
    from nvfp4.kernels.ops import linear_bf16_weight

    weight = torch.randn(300, cols).bfloat16()
    x = torch.randn(rows, cols)
    expected = (x.double() @ weight.double().T).float()
    got = linear_bf16_weight(x, weight)  # C GEMV up to 64 rows, 16 at a time; beyond, an fp32 upcast
    assert got.shape == expected.shape and sqnr(expected, got) > 120, f"{rows=} {cols=}"


@pytest.mark.parametrize("tokens", [1, 5, 40], ids=["decode", "small-batch", "prefill"])
def test_packed_linear_equals_dense_linear_on_dequantized_weight(tokens):
    w, bias = torch.randn(96, 160), torch.randn(96)
    packed = PackedWeight(*nv.quantize_ref(w))
    layer = NVFP4PackedLinear(packed, bias)
    x = torch.randn(2, tokens, 160)
    expected = torch.nn.functional.linear(x, nv.dequantize_ref(packed.packed, packed.scales, packed.gscale), bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)


def test_the_decode_ops_cpu_kernels_are_the_cpp_ones_here():
    """With a C++ compiler (every machine we support) kernels/cpu_ops.cpp is built against this torch and registers
    the CPU kernels of linear_w4a16 and decode_attention: a decode step calls them with no Python between."""
    assert cpu.torch_ops()
    for op in ("linear_w4a16", "decode_attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nvfp4::{op}", "CPU")


def test_linear_w4a16_keeps_leading_dims():
    packed, scales, gscale = nv.quantize_ref(torch.randn(32, 64))
    assert linear_w4a16(torch.randn(2, 3, 64), packed, scales, gscale).shape == (2, 3, 32)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_c_quantize_is_bit_identical(shape, magnitude, dtype):
    w = (torch.randn(shape) * magnitude).to(dtype)
    w[0, :16] = 0.0
    w[-1, :16] = -0.0
    w[0, 16:] *= 1e-7  # blocks whose scale underflows FP8
    packed, scales, gscale = nv.quantize_ref(w)
    ours = cpu.quantize(w, gscale)
    assert torch.equal(ours[0], packed) and torch.equal(ours[1].view(torch.uint8), scales.view(torch.uint8))
    assert torch.equal(cpu.quantize(w, gscale, scales)[0], packed), "fixed-scale path"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e4])
def test_c_fake_quantize_is_bit_identical(shape, magnitude):
    w = torch.randn(shape) * magnitude
    w[0, :16] = 0.0
    w[-1, :16] = -0.0
    w[0, 16:] *= 1e-7  # blocks whose scale underflows FP8
    packed, scales, gscale = nv.quantize_ref(w)
    assert torch.equal(cpu.fake_quantize(w, gscale), nv.dequantize_ref(packed, scales, gscale))
    fixed = (scales.float() * 2).clamp(max=448).to(torch.float8_e4m3fn)  # other scales than the amax rule's
    assert torch.equal(cpu.fake_quantize(w, gscale, fixed), nv.fake_quantize_ref(w, gscale, fixed)), "fixed-scale path"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_c_scale_gradient_matches_the_reference(shape):
    torch.manual_seed(0)
    w, upstream = torch.randn(shape), torch.randn(shape)
    gscale = nv.global_scale(nv.tensor_amax(w))
    # around the amax rule's scales: some blocks clip, some have room
    scale = nv.block_scales(w, gscale).float() * torch.empty(shape[0], shape[1] // 16).uniform_(0.5, 1.5)
    scale[0, 0], scale[-1, -1] = 1e-4, 500.0  # held at e4m3's bounds: no gradient
    grad_w, grad_log = cpu.scale_gradient(w, upstream, scale, nv.e4m3_scales(scale), gscale)
    expected_w, expected_log = nv.scale_gradient_ref(w, upstream, scale, gscale)
    assert torch.equal(grad_w, expected_w) and (grad_w == 0).any()
    held = (scale < 2**-9) | (scale > 448)
    assert held[0, 0] and held[-1, -1] and torch.equal(grad_log == 0, held)
    torch.testing.assert_close(grad_log, expected_log, rtol=1e-4, atol=1e-6 * expected_log.abs().max().item())


def test_c_e4m3_rounding_matches_torch_over_the_whole_range():
    grid = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # every code in (0, 448]
    ties = (grid[:-1] + grid[1:]) / 2  # exact midpoints: round to the even code
    near = torch.cat([ties, torch.nextafter(ties, torch.tensor(0.0)), torch.nextafter(ties, torch.tensor(448.0))])
    values = torch.cat([torch.logspace(-9 * 0.30103, 2.6513, 100_000), grid, near]).clamp(2**-9, 448)  # 2^-9 .. 448
    blocks = torch.zeros(len(values), 16)
    blocks[:, 0] = values * 6  # block amax 6 v with s2 = 1 -> block scale v
    _, scales = cpu.quantize(blocks, torch.tensor(1.0))
    assert torch.equal(scales.view(torch.uint8)[:, 0], (values * 6 / 6).to(torch.float8_e4m3fn).view(torch.uint8))


def test_c_exact_ties_round_to_even():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    w = torch.zeros(len(ties), 16)
    w[:, 0], w[:, 1], w[:, 2] = 6.0, ties, -ties
    packed, _ = cpu.quantize(w, torch.tensor(1.0))
    codes = nv.unpack_codes(packed)
    assert codes[:, 1].tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert codes[:, 2].tolist() == [8, 10, 10, 12, 12, 14, 14]


def test_the_build_cache_key_follows_the_cpu_that_march_native_targets(monkeypatch):
    """A cache shared by two machines must not give one the other's -march=native build (SIGILL)."""
    import shutil
    import subprocess

    from nvfp4.kernels import cpu

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")  # the C kernels themselves are skipped then too
    here = cpu.build_key(compiler)
    real_run = subprocess.run

    def other_cpu(argv, **kwargs):
        result = real_run(argv, **kwargs)
        result.stderr = result.stderr.replace("-mavx2", "-mno-avx2")
        return result

    monkeypatch.setattr(cpu.subprocess, "run", other_cpu)
    assert "-march=native" in cpu.FLAGS and cpu.build_key(compiler) != here
