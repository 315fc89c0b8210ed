"""NVFP4 reference numerics against hand-computed tables, ModelOpt and compressed-tensors (bit for bit)."""

import pytest
import torch

from nvfp4.kernels import numerics as nv
from nvfp4.kernels.ops import fake_quantize, fake_quantize_activation, fake_quantize_learned
from support.numerics import FLOORS, near_rounding_boundary, sqnr

SHAPES = [(16, 16), (64, 128), (100, 96), (33, 160), (8, 1024)]
MAGNITUDES = [1e-6, 1e-3, 1.0, 30.0, 1e4]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def modelopt_quantize(w: torch.Tensor, gscale: torch.Tensor | None = None):
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    qtensor, scales, gscale = NVFP4QTensor.quantize(w.clone(), 16, weights_scaling_factor_2=gscale)
    return qtensor._quantized_data, scales, gscale


def assert_bit_identical(ours, theirs, context: str) -> None:
    packed, scales, gscale = ours
    their_packed, their_scales, their_gscale = theirs
    bad = (packed != their_packed).sum().item()
    assert bad == 0, f"{context}: {bad} packed bytes differ"
    assert torch.equal(scales.view(torch.uint8), their_scales.view(torch.uint8)), f"{context}: block scales differ"
    assert torch.equal(gscale.float(), their_gscale.float()), f"{context}: global scale differs"


def test_e2m1_code_table_round_trips():
    codes = torch.arange(16, dtype=torch.uint8)
    values = nv.decode_e2m1(codes)
    assert values[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert torch.equal(nv.encode_e2m1(values[1:8]), codes[1:8])
    assert torch.equal(nv.encode_e2m1(values[9:]), codes[9:])


@pytest.mark.parametrize(
    "value,code",
    [
        (0.25, 0),
        (0.75, 2),
        (1.25, 2),
        (1.75, 4),
        (2.5, 4),
        (3.5, 6),
        (5.0, 6),
        (0.2499, 0),
        (0.2501, 1),
        (5.0001, 7),
        (6.0, 7),
        (7.5, 7),
        (1e30, 7),
        (-0.25, 8),
        (-0.75, 10),
        (-3.5, 14),
        (-100.0, 15),
    ],
)
def test_e2m1_rounds_ties_to_even_and_saturates(value, code):
    assert nv.encode_e2m1(torch.tensor([value])).item() == code


def test_negative_zero_and_small_negatives():
    # ModelOpt sets the sign bit for any x < 0, so -0.1 -> code 8, but -0.0 -> code 0.
    assert nv.encode_e2m1(torch.tensor([-0.0, -0.1, 0.1])).tolist() == [0, 8, 0]


def test_pack_puts_even_element_in_low_nibble():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    packed = nv.pack_codes(codes)
    assert packed.tolist() == [[0x21, 0x43]]
    assert torch.equal(nv.unpack_codes(packed), codes)


def test_block_scale_rules():
    gscale = torch.tensor(1.0)
    blocks = torch.zeros(4, 16)
    blocks[1, 3] = 6.0  # scale exactly 1.0
    blocks[2, 0] = 1e-9  # underflows FP8: clamped to 2**-9
    blocks[3, 5] = 1e9  # overflows: clamped to 448
    scales = nv.block_scales(blocks.reshape(1, 64), gscale).float().flatten().tolist()
    assert scales == [1.0, 1.0, 2.0**-9, 448.0]


@pytest.mark.parametrize("multiple", [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
@pytest.mark.parametrize("block_scale", [1.0, 0.5, 2.0, 0.1875])
def test_exact_ties_match_modelopt(multiple, block_scale):
    gscale = torch.tensor(1.0)
    w = torch.full((2, 16), multiple * block_scale)
    w[:, 0] = 6.0 * block_scale  # pins the block scale (all chosen scales are exact in E4M3)
    w[1] = -w[1]
    ours = nv.quantize_ref(w, gscale)
    assert_bit_identical(ours, modelopt_quantize(w, gscale), f"tie {multiple} x {block_scale}")
    expected_even = {0.25: 0, 0.75: 2, 1.25: 2, 1.75: 4, 2.5: 4, 3.5: 6, 5.0: 6}[multiple]
    assert nv.unpack_codes(ours[0])[0, 1].item() == expected_even


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_identical_to_modelopt(shape, magnitude, dtype):
    w = (torch.randn(shape) * magnitude).to(dtype)
    w[0, :16] = 0.0  # all-zero block -> scale 1.0
    w[-1, :16] = -0.0
    w[0, 16:32] *= 1e-6  # a block far below the tensor amax: its scale underflows FP8
    ours = nv.quantize_ref(w)
    assert_bit_identical(ours, modelopt_quantize(w), f"{shape=} {magnitude=} {dtype=}")


def test_huge_outlier_saturates_like_modelopt():
    w = torch.randn(32, 64)
    w[3, 7] = 3e38
    assert_bit_identical(nv.quantize_ref(w), modelopt_quantize(w), "outlier")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
def test_dequantize_matches_modelopt(shape, magnitude):
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    w = torch.randn(shape) * magnitude
    qtensor, scales, gscale = NVFP4QTensor.quantize(w.clone(), 16)
    theirs = qtensor.dequantize(dtype=torch.float32, scale=scales, double_scale=gscale, block_sizes={-1: 16})
    assert torch.equal(nv.dequantize_ref(*nv.quantize_ref(w)), theirs)


def compressed_tensors_pack(w: torch.Tensor):
    """What compressed-tensors writes for w: its own global scale, block scales and packing."""
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    global_scale = generate_gparam(w.min(), w.max())
    args = QuantizationArgs(
        num_bits=4,
        type="float",
        strategy="tensor_group",
        group_size=16,
        symmetric=True,
        dynamic=False,
        scale_dtype=torch.float8_e4m3fn,
    )
    blocks = w.float().unflatten(-1, (-1, 16))
    scales, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale)
    packed = quantize_and_pack_fp4(w, scales.float(), global_scale=global_scale)
    return packed, scales.to(torch.float8_e4m3fn), global_scale


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_bit_identical_to_compressed_tensors(shape, magnitude):
    w = torch.randn(shape) * magnitude
    packed, scales, gscale = nv.quantize_ref(w)
    their_packed, their_scales, their_global = compressed_tensors_pack(w)
    assert torch.equal(packed, their_packed), f"{(packed != their_packed).sum()} bytes differ"
    assert torch.equal(scales.view(torch.uint8), their_scales.view(torch.uint8))
    # compressed-tensors stores the reciprocal global scale, computed as 448 * 6 / amax.
    assert torch.equal(nv.reciprocal_global_scale(nv.tensor_amax(w)), their_global.reshape(()))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fake_quantize_forward_equals_dequantize_of_quantize(shape, dtype):
    w = torch.randn(shape).to(dtype)
    packed, scales, gscale = nv.quantize_ref(w)
    assert torch.equal(fake_quantize(w, gscale), nv.dequantize_ref(packed, scales, gscale, dtype))


def test_fake_quantize_gradient_is_straight_through():
    w = torch.randn(8, 32, requires_grad=True)
    upstream = torch.randn(8, 32)
    fake_quantize(w, nv.global_scale(nv.tensor_amax(w))).backward(upstream)
    assert torch.equal(w.grad, upstream)


def _lsq_by_autograd(w: torch.Tensor, gscale: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """LSQ written as a differentiable torch expression: e4m3 and e2m1 rounding straight through,
    clipping at +-6 not (an independent formulation of what fake_quantize_learned's backward computes)."""
    scale = log_scales.exp().clamp(nv.E4M3_MIN_SUBNORMAL, nv.E4M3_MAX)
    scale = scale + (scale.to(torch.float8_e4m3fn).float() - scale).detach()
    multiplier = (scale * gscale).unsqueeze(-1)
    scaled = w.unflatten(-1, (-1, 16)) / multiplier
    codes = nv.fake_quantize_ref(w.detach(), gscale, scale.detach().to(torch.float8_e4m3fn)).unflatten(-1, (-1, 16))
    clipped = scaled.clamp(-6, 6)
    return ((clipped + (codes / multiplier.detach() - clipped).detach()) * multiplier).flatten(-2)


@pytest.mark.parametrize("shape", [(8, 32), (48, 96)], ids=str)
def test_learned_scale_gradient_is_lsq(shape):
    """Forward: fake_quantize with the learned e4m3 scales; backward: the LSQ gradient, including clipped
    values (scales shrunk below the amax rule's) and a scale held at e4m3's upper bound (no gradient)."""
    torch.manual_seed(0)
    w = torch.randn(shape)
    gscale = nv.global_scale(nv.tensor_amax(w))
    start = nv.block_scales(w, gscale).float()
    start[0] *= 0.4  # row 0 clips
    start[1, 0] = 600.0  # past 448: clamped, no gradient
    upstream = torch.randn(shape)
    grads = []
    for quantize in (fake_quantize_learned, _lsq_by_autograd):
        x, log_scales = w.clone().requires_grad_(True), start.log().requires_grad_(True)
        out = quantize(x, gscale, log_scales)
        out.backward(upstream)
        grads.append((out.detach(), x.grad, log_scales.grad))
    (out, grad_w, grad_log), (expected_out, expected_w, expected_log) = grads
    assert torch.equal(out, fake_quantize(w, gscale, nv.scales_from_log(start.log())))
    torch.testing.assert_close(out, expected_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_w, expected_w, rtol=1e-6, atol=0)  # the same, up to the formula's roundings
    assert torch.equal(grad_w == 0, expected_w == 0) and (grad_w[0] == 0).sum() > (grad_w[2:] == 0).sum() / len(
        grad_w[2:]
    )
    torch.testing.assert_close(grad_log, expected_log, rtol=1e-4, atol=1e-6)
    assert grad_log[1, 0] == 0 and (grad_log[2:] != 0).any()


def test_learned_scales_start_where_the_fixed_ones_are():
    torch.manual_seed(1)
    w = torch.randn(16, 64) * 0.02
    w[3, :16] = 0.0  # an all-zero block: scale 1.0
    gscale = nv.global_scale(nv.tensor_amax(w))
    scales = nv.block_scales(w, gscale)
    assert torch.equal(nv.scales_from_log(scales.float().log()).view(torch.uint8), scales.view(torch.uint8))


def test_activation_fake_quant_uses_static_global_and_dynamic_blocks():
    x = torch.randn(3, 5, 64)
    input_gscale = nv.activation_global_scale(x.abs().amax() * 2)  # calibrated on a wider range
    out = fake_quantize_activation(x, input_gscale)
    expected = nv.dequantize_ref(*nv.quantize_ref(x, input_gscale))
    assert torch.equal(out, expected)
    assert sqnr(x, out) >= FLOORS["nvfp4_roundtrip_any"]


def test_shared_global_scale_is_max_of_group():
    q, k, v = torch.randn(64, 32), torch.randn(16, 32) * 5, torch.randn(16, 32) * 0.1
    shared = nv.shared_global_scale([q, k, v])
    assert torch.equal(shared, nv.global_scale(k.abs().amax()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sqnr_floor_on_gaussian_weights(dtype):
    w = torch.randn(256, 512).to(dtype)
    assert sqnr(w.float(), nv.dequantize_ref(*nv.quantize_ref(w))) >= FLOORS["nvfp4_weight_gaussian"]


def test_rejects_rows_not_multiple_of_16():
    with pytest.raises(ValueError, match="divisible by 16"):
        nv.quantize_ref(torch.randn(4, 24))


def test_packing_bit_identical_to_compressed_tensors():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    codes[codes == 8] = 0  # compressed-tensors packs from values, where -0.0 and 0.0 are one code
    assert torch.equal(pack_fp4_to_uint8(nv.decode_e2m1(codes)), nv.pack_codes(codes))


@pytest.mark.slow
def test_default_model_weights_bit_identical(default_model_dir):
    """All 210 linears: bit-identical to ModelOpt. compressed-tensors, given the same scales, divides
    by (scale / global) instead of multiplying (scale * s2); it may only disagree on exact ties."""
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4
    from safetensors.torch import load_file

    state = load_file(default_model_dir / "model.safetensors")
    linears = [name for name in state if name.endswith("proj.weight")]
    assert len(linears) == 210
    disagreements = total = 0
    for name in linears:
        w = state[name]
        packed, scales, gscale = nv.quantize_ref(w)
        assert_bit_identical((packed, scales, gscale), modelopt_quantize(w), name)
        theirs = nv.unpack_codes(quantize_and_pack_fp4(w, scales.float(), global_scale=(1 / gscale).reshape(1)))
        differs = theirs != nv.unpack_codes(packed)
        scaled = (w.float().unflatten(-1, (-1, 16)) / (scales.float() * gscale).unsqueeze(-1)).flatten(-2)
        assert bool(near_rounding_boundary(scaled[differs]).all()), f"{name}: a non-tie code differs"
        disagreements += int(differs.sum())
        total += differs.numel()
    assert disagreements / total < 0.005, f"{disagreements} of {total} codes differ"
