"""The C CPU kernels (kernels/cpu_nvfp4.c) against the torch reference."""

import pytest
import torch

from kernels import cpu, numerics as nv
from kernels.linear import NVFP4PackedLinear, PackedWeight
from kernels.ops import linear_w4a16
from tests.conftest import sqnr

SHAPES = [(16, 16), (48, 96), (100, 160), (1536, 576), (576, 1536)]


def test_c_kernels_build_here():
    assert cpu.available(), "a C compiler is on every machine we support; the build must succeed"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 1e3])
def test_dequantize_into_is_bit_identical(shape, magnitude):
    w = torch.randn(shape) * magnitude
    w[0, :16] = 0
    w[-1, -16:] = -0.0
    packed, scales, gscale = nv.quantize_ref(w)
    out = torch.empty(shape)
    assert torch.equal(cpu.dequantize_into(out, packed, scales, gscale), nv.dequantize_ref(packed, scales, gscale))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_gemv_matches_dense_matmul(shape, batch):
    packed, scales, gscale = nv.quantize_ref(torch.randn(shape))
    x = torch.randn(batch, shape[1])
    expected = (x.double() @ nv.dequantize_ref(packed, scales, gscale).double().T).float()
    got = cpu.gemv(x, packed, scales, gscale)
    assert sqnr(expected, got) > 120, f"{shape=} {batch=}"  # only fp32 summation order differs


@pytest.mark.parametrize("tokens", [1, 5, 40], ids=["decode", "small-batch", "prefill"])
def test_packed_linear_equals_dense_linear_on_dequantized_weight(tokens):
    w, bias = torch.randn(96, 160), torch.randn(96)
    packed = PackedWeight(*nv.quantize_ref(w))
    layer = NVFP4PackedLinear(packed, bias)
    x = torch.randn(2, tokens, 160)
    expected = torch.nn.functional.linear(x, nv.dequantize_ref(packed.packed, packed.scales, packed.gscale), bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)


def test_workspace_is_shared_not_grown_per_layer():
    workspace = {}
    layers = [NVFP4PackedLinear(PackedWeight(*nv.quantize_ref(torch.randn(64, 64))), workspace=workspace) for _ in range(3)]
    x = torch.randn(40, 64)  # a prefill-sized batch takes the dequantize-into-buffer path
    for layer in layers:
        layer(x)
    assert list(workspace) == ["fp32"] and workspace["fp32"].numel() == 64 * 64


def test_linear_w4a16_keeps_leading_dims():
    packed, scales, gscale = nv.quantize_ref(torch.randn(32, 64))
    assert linear_w4a16(torch.randn(2, 3, 64), packed, scales, gscale).shape == (2, 3, 32)
