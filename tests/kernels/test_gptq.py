"""GPTQ rounding (kernels/gptq.py): exact NVFP4 under the amax rule, better layer outputs than nearest rounding."""

import pytest
import torch

from nvfp4.kernels import numerics
from nvfp4.kernels.gptq import gptq_round


def _layer(rows: int, columns: int, tokens: int, seed: int, correlated: bool = True):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.05
    inputs = torch.randn(tokens, columns, generator=generator)
    if correlated:  # real activations: a few strong shared directions and outlier channels
        inputs = inputs + torch.randn(tokens, 4, generator=generator) @ torch.randn(4, columns, generator=generator)
        inputs[:, :3] *= 8
    return weight, inputs


def _output_error(weight, quantized, inputs) -> float:
    return ((weight - quantized) @ inputs.T).square().sum().item()


def _reference_gptq(weight, hessian, gscale, damp=0.01):
    """Column-by-column GPTQ as in the paper (no lazy blocks, no batching), amax rule with the pinned lead."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    for k in range(w.shape[1]):
        if k % 16 == 0:
            block = w[:, k : k + 16].float()
            unit = numerics.block_scales(block, gscale).float().squeeze(-1).double() * gscale.double()
            lead = block.abs().argmax(-1)
        value = (w[:, k] / unit).float()
        code = numerics.decode_e2m1(numerics.encode_e2m1(value)).double()
        code = torch.where(lead == k % 16, 6.0 * torch.sign(value).double(), code)
        codes[:, k] = code * unit
        error = (w[:, k] - codes[:, k]) / factor[k, k]
        w[:, k + 1 :] -= error.unsqueeze(1) * factor[k, k + 1 :].unsqueeze(0)
    return codes.float()


def test_uncorrelated_inputs_give_nearest_rounding():
    weight, _ = _layer(64, 128, 1, seed=0)
    gscale = numerics.global_scale(numerics.tensor_amax(weight))
    latent = gptq_round(weight, torch.eye(128), gscale)
    assert torch.equal(numerics.fake_quantize_ref(latent, gscale), numerics.fake_quantize_ref(weight, gscale))
    block_max = weight.abs().unflatten(-1, (-1, 16)).amax(-1, keepdim=True).expand(-1, -1, 16).flatten(-2)
    others = weight.abs() < block_max  # the block maxima are pinned to 6 block scales
    unmoved = torch.isclose(latent, weight, rtol=1e-5, atol=0)[others].float().mean().item()
    assert unmoved > 0.99, unmoved  # only values within the margin of a rounding boundary move


@pytest.mark.parametrize("rows,columns", [(48, 64), (100, 160), (32, 576)])
def test_rounding_is_gptq_and_the_amax_rule_gives_it_back(rows, columns):
    weight, inputs = _layer(rows, columns, 4 * columns, seed=rows)
    hessian = inputs.T @ inputs
    gscale = numerics.global_scale(numerics.tensor_amax(weight))
    latent = gptq_round(weight, hessian, gscale)
    exported = numerics.fake_quantize_ref(latent, gscale)
    reference = _reference_gptq(weight, hessian, gscale)
    agree = torch.isclose(exported, reference, rtol=1e-5, atol=0).float().mean().item()  # reference: float64
    assert agree > 0.995, f"{rows}x{columns}: {agree:.4f} of the codes equal the reference GPTQ"
    assert torch.equal(numerics.fake_quantize_ref(exported, gscale), exported)  # on the grid: scales come back


@pytest.mark.parametrize("fixed_scales", [False, True], ids=["amax", "fixed"])
def test_layer_output_error_below_nearest_rounding(fixed_scales):
    weight, inputs = _layer(96, 256, 1024, seed=3)
    gscale = numerics.global_scale(numerics.tensor_amax(weight))
    scales = numerics.block_scales(weight, gscale) if fixed_scales else None
    latent = gptq_round(weight, inputs.T @ inputs, gscale, scales)
    nearest = _output_error(weight, numerics.fake_quantize_ref(weight, gscale, scales), inputs)
    gptq = _output_error(weight, numerics.fake_quantize_ref(latent, gscale, scales), inputs)
    assert gptq < 0.7 * nearest, (gptq, nearest)


def test_batched_matrices_equal_one_at_a_time():
    layers = [_layer(40, 64, 256, seed=s) for s in range(3)]
    weights = torch.stack([w for w, _ in layers])
    hessians = torch.stack([x.T @ x for _, x in layers])
    gscales = torch.stack([numerics.global_scale(numerics.tensor_amax(w)) for w, _ in layers])
    batched = gptq_round(weights, hessians, gscales)
    for i in range(3):
        alone = gptq_round(weights[i], hessians[i], gscales[i])
        same = numerics.fake_quantize_ref(batched[i], gscales[i]) == numerics.fake_quantize_ref(alone, gscales[i])
        assert same.float().mean().item() > 0.999


def test_dead_inputs_and_zero_blocks_stay_finite_and_zero():
    weight, inputs = _layer(32, 64, 256, seed=5)
    inputs[:, 16:32] = 0  # an input block that never fires
    weight[:4, :16] = 0  # all-zero weight blocks where GPTQ starts (later ones receive rounding errors)
    gscale = numerics.global_scale(numerics.tensor_amax(weight))
    latent = gptq_round(weight, inputs.T @ inputs, gscale)
    assert torch.isfinite(latent).all()
    assert (latent[:, 16:32] == 0).all()  # a dead input's weights carry nothing: GPTQ zeroes them
    assert (numerics.fake_quantize_ref(latent, gscale)[:4, :16] == 0).all()


# ---------------------------------------------------------------- converter: --rounding gptq


@pytest.fixture(scope="module")
def tiny_teacher(tiny_model_dir):
    from nvfp4.converter.models import load_causal_lm

    model, _, _ = load_causal_lm(tiny_model_dir)
    return model


def _recorded_inputs(model, batches) -> dict[str, torch.Tensor]:
    """Every linear's inputs over the batches, recorded independently of calibrate()."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(
                module.register_forward_pre_hook(
                    lambda mod, inputs, name=name: seen.setdefault(name, []).append(
                        inputs[0].reshape(-1, mod.in_features)
                    )
                )
            )
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(x) for name, x in seen.items()}


@pytest.mark.parametrize("scheme", ["nvfp4", "nvfp4-a16"])
def test_calibrate_gptq_rounds_every_linear_with_lower_output_error(tiny_teacher, scheme):
    import copy

    from nvfp4.converter.config import QuantConfig
    from nvfp4.converter.quantize import calibrate, export_weights, quantize, quantized_modules

    batches = [
        torch.randint(0, tiny_teacher.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    inputs = _recorded_inputs(tiny_teacher, batches)
    nearest = quantize(copy.deepcopy(tiny_teacher), QuantConfig(scheme=scheme))
    gptq = quantize(copy.deepcopy(tiny_teacher), QuantConfig(scheme=scheme, rounding="gptq"))
    calibrate(nearest, batches, QuantConfig(scheme=scheme))
    calibrate(gptq, batches, QuantConfig(scheme=scheme, rounding="gptq"))
    exported = export_weights(gptq)
    for name, module in quantized_modules(gptq).items():
        original, x = tiny_teacher.get_submodule(name).weight.detach(), inputs[name]
        ours = module.quantized_weight().detach()
        assert _output_error(original, ours, x) < 0.9 * _output_error(
            original, quantized_modules(nearest)[name].quantized_weight().detach(), x
        ), name
        # the export is the amax rule on the latent weights: the same values the student computes with
        stored = numerics.dequantize_ref(exported[name].packed, exported[name].scales, exported[name].gscale)
        assert torch.equal(stored, ours), name
        assert torch.equal(module.weight_gscale, quantized_modules(nearest)[name].weight_gscale), f"{name}: s2 moved"
        if scheme == "nvfp4":
            assert torch.equal(module.input_gscale, quantized_modules(nearest)[name].input_gscale), name


def test_convert_cli_with_gptq_rounding(tiny_model_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from nvfp4.cli import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(tiny_model_dir),
            "-o",
            str(out),
            "--scheme",
            "nvfp4-a16",
            "--rounding",
            "gptq",
            "--qad-steps",
            "0",
            "--calib-data",
            "random",
            "--calib-tokens",
            "256",
            "--targets",
            "modelopt",
            "--no-eval",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["quant_config"]["rounding"] == "gptq" and report["calibration"] is not None
    assert "rounding: `gptq`" in (out / "report.md").read_text()
    bad = CliRunner().invoke(cli, ["convert", str(tiny_model_dir), "-o", str(tmp_path / "x"), "--rounding", "best"])
    assert bad.exit_code == 2 and "best" in bad.output


def test_gptq_hessian_bytes_count_one_matrix_per_fused_group(tiny_teacher):
    from nvfp4.converter.config import QuantConfig
    from nvfp4.converter.quantize import eligible_linears
    from nvfp4.converter.stages import GPTQRounding

    config = tiny_teacher.config
    hidden, intermediate = config.hidden_size, config.intermediate_size
    per_layer = (
        3 * hidden**2 + intermediate**2
    )  # q/k/v, o_proj, gate/up (input: hidden); down_proj (input: intermediate)
    linears = eligible_linears(tiny_teacher, QuantConfig(scheme="nvfp4-a16", rounding="gptq"))
    assert GPTQRounding.hessian_bytes(linears) == 4 * per_layer * config.num_hidden_layers


def test_the_plan_counts_gptqs_hessians_and_refuses_before_reading_a_weight(tiny_model_dir, tmp_path, monkeypatch):
    """Whole model: every layer's Hessians; layer by layer: one layer's. Without the memory, convert stops in one
    line naming --rounding nearest, and writes nothing."""
    from click.testing import CliRunner

    from nvfp4.cli import cli
    from nvfp4.converter import plan as plans
    from nvfp4.converter.config import QuantConfig
    from nvfp4.converter.quantize import eligible_linears

    model = plans.skeleton(tiny_model_dir)
    shapes = {}
    for rounding in ("nearest", "gptq"):
        needs = plans.Needs(QuantConfig(scheme="nvfp4-a16", rounding=rounding), ("modelopt",), 256, evaluate=False)
        shapes[rounding] = (plans.make_plan(model, eligible_linears(model, needs.quant), needs, tmp_path), needs)
    plan, needs = shapes["gptq"]
    assert plan.shape.hessians == 2 * plan.shape.layer_hessians > 0
    assert (
        plans.ptq_whole(plan.shape, needs) - plans.ptq_whole(shapes["nearest"][0].shape, shapes["nearest"][1])
        >= plan.shape.hessians
    )
    monkeypatch.setattr(plans, "available_memory", lambda device: 1024)
    out = tmp_path / "out"
    args = [
        "convert",
        str(tiny_model_dir),
        "-o",
        str(out),
        "--scheme",
        "nvfp4-a16",
        "--qad-steps",
        "0",
        "--calib-data",
        "random",
        "--calib-tokens",
        "256",
        "--targets",
        "modelopt",
        "--no-eval",
    ]
    result = CliRunner().invoke(cli, args + ["--rounding", "gptq"])
    assert result.exit_code == 2 and "--rounding nearest" in result.output, result.output
    assert result.output.count("error:") == 1 and "memory plan" in result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written
