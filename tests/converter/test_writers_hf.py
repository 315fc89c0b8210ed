"""trtllm (ModelOpt unified) and vllm (compressed-tensors) targets against the reference producers."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from nvfp4.converter.checkpoint import load_nvfp4_checkpoint
from nvfp4.converter.config import QuantConfig
from nvfp4.converter.models import load_causal_lm
from nvfp4.converter.quantize import calibrate, quantize
from nvfp4.converter.writers import load_all_writers
from support.oracles import assert_same_quantized_tensors, calibration_batch, modelopt_export

SCHEMES = ["nvfp4", "nvfp4-a16"]


def our_export(model_dir, scheme, tmp_path, target):
    teacher, tokenizer, _ = load_causal_lm(model_dir)
    student = quantize(copy.deepcopy(teacher), QuantConfig(scheme=scheme))
    calibrate(student, [calibration_batch(teacher.config.vocab_size)], QuantConfig(scheme=scheme))
    out = tmp_path / target
    out.mkdir()
    load_all_writers()[target](QuantConfig(scheme=scheme), torch.float32).write(student, tokenizer, model_dir, out)
    return student, out


def check_against_modelopt(model_dir, scheme, tmp_path):
    student, ours = our_export(model_dir, scheme, tmp_path, "modelopt")
    theirs = modelopt_export(model_dir, tmp_path / "modelopt", scheme, calibration_batch(student.config.vocab_size))
    assert_same_quantized_tensors(load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors"))
    our_quant = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
    their_quant = json.loads((theirs / "hf_quant_config.json").read_text())["quantization"]
    assert our_quant == their_quant
    our_config = json.loads((ours / "config.json").read_text())["quantization_config"]
    their_config = json.loads((theirs / "config.json").read_text())["quantization_config"]
    assert our_config["config_groups"] == their_config["config_groups"]
    assert our_config["ignore"] == their_config["ignore"] and our_config["quant_method"] == "modelopt"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_student_bytes_equal_modelopt_export_tiny(tiny_model_dir, scheme, tmp_path):
    check_against_modelopt(tiny_model_dir, scheme, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_student_bytes_equal_modelopt_export_default_model(default_model_dir, scheme, tmp_path):
    check_against_modelopt(default_model_dir, scheme, tmp_path)


def student_logits(student, ids):
    with torch.no_grad():
        return student(ids).logits


@pytest.mark.parametrize("scheme", SCHEMES)
def test_checkpoint_loader_reproduces_student(tiny_model_dir, scheme, tmp_path):
    student, out = our_export(tiny_model_dir, scheme, tmp_path, "modelopt")
    model, _ = load_nvfp4_checkpoint(out)
    ids = torch.randint(0, 1000, (2, 24))
    torch.testing.assert_close(student_logits(model, ids), student_logits(student, ids), rtol=1e-4, atol=1e-4)
    packed = sum(b.numel() for n, b in model.named_buffers() if n.endswith(".packed"))
    assert packed * 2 == sum(m.weight.numel() for m in student.modules() if hasattr(m, "weight_gscale"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_vllm_target_loads_in_transformers_and_matches_student(tiny_model_dir, scheme, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    student, out = our_export(tiny_model_dir, scheme, tmp_path, "vllm")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized" and "scale_dtype" not in json.dumps(config)
    assert config["ignore"] == ["lm_head"]
    tensors = load_file(out / "model.safetensors")
    q, k = (
        tensors["model.layers.0.self_attn.q_proj.weight_global_scale"],
        tensors["model.layers.0.self_attn.k_proj.weight_global_scale"],
    )
    assert torch.equal(q, k), "fused q/k/v must share one global scale"
    reloaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    for name, module in student.named_modules():
        if hasattr(module, "weight_gscale") and module.quantize_input:
            ulp = torch.finfo(torch.float32).eps * (1 / module.input_gscale)
            assert (tensors[f"{name}.input_global_scale"] - 1 / module.input_gscale).abs() <= ulp, name
            module.quantize_input = False  # transformers' decompressed model runs activations unquantized
    ids = torch.randint(0, 1000, (2, 24))
    ours, theirs = student_logits(student, ids), student_logits(reloaded, ids)
    # compressed-tensors dequantizes through bf16 (scale / global_scale rounded to 8 mantissa bits)
    assert (ours - theirs).abs().max() < 5e-3 * ours.abs().max(), "compressed-tensors reload differs from the student"


def test_vllm_packed_equals_compressed_tensors_compressor_except_exact_ties(tiny_model_dir, tmp_path):
    """compressed-tensors' own packer, given our scales and global scale, writes our weight_packed, except
    on exact rounding ties where its x / (scale / global) rounds differently from x / (scale * s2)."""
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4

    from nvfp4.kernels.numerics import unpack_codes
    from support.numerics import near_rounding_boundary

    student, out = our_export(tiny_model_dir, "nvfp4-a16", tmp_path, "vllm")
    tensors = load_file(out / "model.safetensors")
    checked = 0
    for name, module in student.named_modules():
        if hasattr(module, "weight_gscale"):
            w, scales = module.weight.detach(), tensors[f"{name}.weight_scale"]
            theirs = quantize_and_pack_fp4(w, scales.float(), global_scale=tensors[f"{name}.weight_global_scale"])
            differs = unpack_codes(theirs) != unpack_codes(tensors[f"{name}.weight_packed"])
            scaled = (w.unflatten(-1, (-1, 16)) / (scales.float() * module.weight_gscale).unsqueeze(-1)).flatten(-2)
            assert bool(near_rounding_boundary(scaled[differs]).all()), f"{name}: a non-tie code differs"
            assert differs.float().mean() < 0.01, name
            checked += 1
    assert checked == 14


def test_vllm_global_scales_are_compressed_tensors_gparam_of_the_group_amax(tiny_model_dir, tmp_path):
    """weight_global_scale = compressed-tensors' generate_gparam(group amax), one value per fused group."""
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    from nvfp4.converter.groups import fused_groups
    from nvfp4.converter.quantize import quantized_modules

    student, out = our_export(tiny_model_dir, "nvfp4-a16", tmp_path, "vllm")
    tensors = load_file(out / "model.safetensors")
    modules = quantized_modules(student)
    exact = 0
    for group in fused_groups(modules):
        amax = torch.stack([modules[n].weight.detach().abs().amax() for n in group]).amax().float().reshape(1)
        theirs = generate_gparam(-amax, amax)
        ours = [tensors[f"{n}.weight_global_scale"] for n in group]
        assert all(torch.equal(o, ours[0]) for o in ours), group
        assert ours[0].dtype == torch.float32 and ours[0].shape == (1,)
        assert (ours[0] - theirs).abs() <= 2 * torch.finfo(torch.float32).eps * theirs, group  # two roundings apart
        exact += int(torch.equal(ours[0], theirs))
    assert exact >= len(fused_groups(modules)) // 2, "most groups should match generate_gparam exactly"


def test_packed_weights_are_shared_between_targets_until_the_student_changes(tiny_model_dir):
    from nvfp4.converter.quantize import export_weights
    from nvfp4.converter.writers import packed_weights

    teacher, _, _ = load_causal_lm(tiny_model_dir)
    student = quantize(teacher, QuantConfig(scheme="nvfp4"))
    first = packed_weights(student)
    assert packed_weights(student) is first
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(-1)  # in place, as an optimizer step would
    after_edit = packed_weights(student)
    assert after_edit is not first
    assert not torch.equal(
        after_edit["model.layers.0.mlp.down_proj"].packed, first["model.layers.0.mlp.down_proj"].packed
    )
    calibrate(student, [calibration_batch(teacher.config.vocab_size)], QuantConfig(scheme="nvfp4"))  # sets input scales
    calibrated = packed_weights(student)
    assert calibrated is not after_edit and calibrated["model.layers.0.mlp.down_proj"].input_gscale is not None
    fresh = export_weights(student)
    assert all(torch.equal(fresh[n].packed, calibrated[n].packed) for n in fresh)
