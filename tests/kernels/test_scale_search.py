"""Block-scale search (`--scale-search mse|mse-act`): never worse than amax, equal to brute force, wired in."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4.converter.config import QuantConfig
from nvfp4.converter.quantize import calibrate, export_weights, quantize, quantized_modules
from nvfp4.kernels import numerics
from nvfp4.kernels.scale_search import FACTOR_RANGE, block_errors, search_block_scales

E4M3 = torch.float8_e4m3fn


def errors64(
    w: torch.Tensor, gscale: torch.Tensor, scales: torch.Tensor, act: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-block squared error in float64, from the reference fake-quant (independent of the search's sums)."""
    diff = w.double() - numerics.fake_quantize_ref(w.float(), gscale, scales).double()
    error = diff.square() * (1 if act is None else act.double())
    return error.unflatten(-1, (-1, 16)).sum(-1)


def assert_not_worse(searched: torch.Tensor, amax: torch.Tensor) -> None:
    worse = searched > amax * (1 + 1e-5) + 1e-300
    assert not worse.any(), (
        f"{int(worse.sum())} blocks worse than amax; worst {searched[worse][:4]} vs {amax[worse][:4]}"
    )


magnitude = st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e6, 1e30])
block = st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=16, max_size=16)


@settings(max_examples=60, deadline=None)
@given(
    blocks=st.lists(st.tuples(magnitude, block), min_size=1, max_size=8),
    group_boost=st.sampled_from([1.0, 1.0, 1e3, 1e9]),
    act_seed=st.integers(0, 2**16),
)
def test_search_never_worse_than_amax(blocks, group_boost, act_seed):
    # group_boost > 1: a fused-group s2 taken from a much larger sibling, so block scales underflow/clamp
    w = torch.tensor([[m * v for v in values] for m, values in blocks], dtype=torch.float32)
    gscale = numerics.global_scale(numerics.tensor_amax(w).clamp(min=1e-30) * group_boost)
    amax_scales = numerics.block_scales(w, gscale)
    act = torch.rand(16, generator=torch.Generator().manual_seed(act_seed)) ** 4
    for mode, weights in (("mse", None), ("mse-act", act)):
        scales = search_block_scales(w, gscale, mode, weights)
        assert scales.dtype == E4M3 and scales.shape == amax_scales.shape
        assert torch.isfinite(scales.float()).all()
        assert ((scales.float() >= numerics.E4M3_MIN_SUBNORMAL) & (scales.float() <= numerics.E4M3_MAX)).all()
        assert_not_worse(errors64(w, gscale, scales, weights), errors64(w, gscale, amax_scales, weights))


def _positive_e4m3() -> torch.Tensor:
    values = torch.arange(1, 0x7F, dtype=torch.uint8).view(E4M3).float()  # every finite positive FP8 value
    return values


def brute_force_best_errors(w: torch.Tensor, gscale: torch.Tensor, act: torch.Tensor | None) -> torch.Tensor:
    """Reference twin: per block, try every FP8 value in [fp8(lo s), fp8(hi s)] (FACTOR_RANGE) one by one."""
    fp8 = _positive_e4m3()
    blocks = w.unflatten(-1, (-1, 16))
    best = torch.empty(blocks.shape[:2], dtype=torch.float64)
    for r in range(blocks.shape[0]):
        for b in range(blocks.shape[1]):
            x = blocks[r, b].reshape(1, 16)
            a = None if act is None else act[b * 16 : (b + 1) * 16]
            amax_scale = float(x.abs().max() / (6 * gscale))
            low, high = (torch.tensor(amax_scale * f).clamp(2**-9, 448).to(E4M3).float() for f in FACTOR_RANGE)
            options = [numerics.block_scales(x, gscale)] + [v.reshape(1, 1).to(E4M3) for v in fp8 if low <= v <= high]
            best[r, b] = min(float(errors64(x, gscale, s, a)) for s in options)
    return best


@pytest.mark.parametrize("mode", ["mse", "mse-act"])
def test_search_matches_brute_force(mode):
    w = torch.randn(6, 48) * torch.logspace(-3, 1, 6).unsqueeze(1)
    w[2, 16:32] = 0  # an all-zero block
    gscale = numerics.global_scale(numerics.tensor_amax(w))
    act = torch.rand(48) ** 3 if mode == "mse-act" else None
    found = errors64(w, gscale, search_block_scales(w, gscale, mode, act), act)
    expected = brute_force_best_errors(w, gscale, act)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-30)


def test_mse_lowers_gaussian_weight_error():
    w = torch.randn(256, 512)
    gscale = numerics.global_scale(numerics.tensor_amax(w))
    amax = errors64(w, gscale, numerics.block_scales(w, gscale)).sum()
    mse = errors64(w, gscale, search_block_scales(w, gscale, "mse")).sum()
    assert amax / mse > 1.15, f"error ratio amax/mse {float(amax / mse):.3f}"  # measured 1.24


def test_mse_act_minimises_the_weighted_error():
    w = torch.randn(128, 256)
    act = torch.exp(2 * torch.randn(256))  # a few channels dominate, as in real activations
    gscale = numerics.global_scale(numerics.tensor_amax(w))
    plain, weighted = search_block_scales(w, gscale, "mse"), search_block_scales(w, gscale, "mse-act", act)
    assert not torch.equal(plain.view(torch.uint8), weighted.view(torch.uint8))
    assert_not_worse(errors64(w, gscale, weighted, act), errors64(w, gscale, plain, act))
    assert_not_worse(errors64(w, gscale, plain), errors64(w, gscale, weighted))


def test_chunking_does_not_change_the_result():
    w = torch.randn(37, 96)
    gscale = numerics.global_scale(numerics.tensor_amax(w) * 3)
    whole = search_block_scales(w, gscale, "mse")
    chunked = search_block_scales(w, gscale, "mse", chunk_elements=5 * 96)
    assert torch.equal(whole.view(torch.uint8), chunked.view(torch.uint8))


@pytest.mark.parametrize("exponent", [80, -100], ids=["huge", "tiny"])
def test_search_is_scale_invariant(exponent):
    # scaling W and s2 by 2**k leaves every code and block scale unchanged; fp32 squared errors of
    # 1e24-sized or 1e-30-sized weights would overflow / flush to zero if measured in raw units
    w = torch.randn(32, 64)
    gscale = numerics.global_scale(numerics.tensor_amax(w))
    expected = search_block_scales(w, gscale, "mse")
    scaled = search_block_scales(w * 2.0**exponent, gscale * 2.0**exponent, "mse")
    assert torch.equal(scaled.view(torch.uint8), expected.view(torch.uint8))
    assert not torch.equal(expected.view(torch.uint8), numerics.block_scales(w, gscale).view(torch.uint8))


def test_block_errors_agrees_with_float64():
    w = torch.randn(8, 64)
    gscale = numerics.global_scale(numerics.tensor_amax(w))
    scales = numerics.block_scales(w, gscale)
    torch.testing.assert_close(
        block_errors(w, gscale, scales).double(), errors64(w, gscale, scales), rtol=1e-4, atol=1e-9
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="best"), "unknown scale search mode"),
        (dict(mode="mse-act"), "needs per-input-channel activation statistics"),
        (dict(mode="mse-act", act_weight=torch.ones(16)), "act_weight must have shape (32,)"),
        (dict(mode="mse-act", act_weight=-torch.ones(32)), "non-negative"),
        (dict(mode="mse", act_weight=torch.ones(32)), "only used by scale search 'mse-act'"),
        (dict(mode="mse", factors=(1.1, 1.3)), "must contain 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        search_block_scales(torch.randn(4, 32), torch.tensor(0.01), **kwargs)


def test_weight_not_multiple_of_16():
    with pytest.raises(ValueError, match="divisible by 16"):
        search_block_scales(torch.randn(4, 24), torch.tensor(0.01), "mse")


@pytest.fixture(scope="module")
def tiny_teacher(tiny_model_dir):
    from nvfp4.converter.models import load_causal_lm

    model, _, _ = load_causal_lm(tiny_model_dir)
    return model


def model_weight_error(model: torch.nn.Module) -> float:
    return sum(
        float(errors64(m.weight.detach(), m.weight_gscale, m.export().scales).sum())
        for m in quantized_modules(model).values()
    )


@pytest.mark.parametrize("scheme", ["nvfp4", "nvfp4-a16"])
def test_quantize_with_mse_search(tiny_teacher, scheme):
    amax = quantize(copy.deepcopy(tiny_teacher), QuantConfig(scheme=scheme))
    mse = quantize(copy.deepcopy(tiny_teacher), QuantConfig(scheme=scheme, scale_search="mse"))
    exported = export_weights(mse)
    for name, module in quantized_modules(mse).items():
        assert module.block_scales is not None and module.block_scales.dtype == E4M3, name
        assert torch.equal(exported[name].scales.view(torch.uint8), module.block_scales.view(torch.uint8)), name
        # the student trains with the same fixed scales it exports (QAD starts from them)
        expected = numerics.fake_quantize_ref(module.weight.detach(), module.weight_gscale, module.block_scales)
        assert torch.equal(module.quantized_weight(), expected), name
        assert torch.equal(module.weight_gscale, quantized_modules(amax)[name].weight_gscale), f"{name}: s2 changed"
    layer = "model.layers.0.self_attn"
    assert len({float(quantized_modules(mse)[f"{layer}.{p}_proj"].weight_gscale) for p in "qkv"}) == 1
    assert model_weight_error(amax) / model_weight_error(mse) > 1.1


def input_mean_squares(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """E[x^2] per input channel of every linear, recorded independently of calibrate()."""
    sums, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):

            def hook(mod, inputs, name=name):
                x = inputs[0].detach().double().reshape(-1, mod.in_features)
                total, count = sums.get(name, (0, 0))
                sums[name] = (total + x.square().sum(0), count + x.shape[0])

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in hooks:
        h.remove()
    return {name: total / count for name, (total, count) in sums.items()}


@pytest.mark.parametrize("scheme", ["nvfp4", "nvfp4-a16"])
def test_mse_act_uses_calibration_statistics(tiny_teacher, scheme):
    batches = [
        torch.randint(0, tiny_teacher.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    stats = input_mean_squares(tiny_teacher, batches)
    mse = quantize(copy.deepcopy(tiny_teacher), QuantConfig(scheme=scheme, scale_search="mse"))
    act = quantize(copy.deepcopy(tiny_teacher), QuantConfig(scheme=scheme, scale_search="mse-act"))
    assert all(m.block_scales is None for m in quantized_modules(act).values())  # amax until calibrate() searches
    calibrate(act, batches, QuantConfig(scheme=scheme, scale_search="mse-act"))
    changed = 0
    for name, module in quantized_modules(act).items():
        reference = quantized_modules(mse)[name]
        changed += not torch.equal(module.block_scales.view(torch.uint8), reference.block_scales.view(torch.uint8))
        w, g = module.weight, module.weight_gscale
        assert_not_worse(
            errors64(w, g, module.block_scales, stats[name]), errors64(w, g, reference.block_scales, stats[name])
        )
        assert (module.input_gscale is not None) == (scheme == "nvfp4"), name
    assert changed > 0, "calibration did not re-search any block scale"


def test_qad_trains_from_fixed_searched_scales(tiny_teacher):
    student = quantize(copy.deepcopy(tiny_teacher), QuantConfig(scheme="nvfp4-a16", scale_search="mse"))
    before = {n: m.block_scales.view(torch.uint8).clone() for n, m in quantized_modules(student).items()}
    weights = {n: m.weight.detach().clone() for n, m in quantized_modules(student).items()}
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-2)
    ids = torch.randint(0, tiny_teacher.config.vocab_size, (1, 32))
    student(ids, labels=ids).loss.backward()
    optimizer.step()
    exported = export_weights(student)
    for name, module in quantized_modules(student).items():
        assert not torch.equal(module.weight, weights[name]), f"{name}: no gradient reached the weight"
        assert torch.equal(module.block_scales.view(torch.uint8), before[name]), f"{name}: scales moved"
        assert torch.equal(exported[name].scales.view(torch.uint8), before[name]), name


@pytest.fixture(scope="module")
def mse_student(tiny_model_dir, tiny_teacher):
    from transformers import AutoTokenizer

    from nvfp4.converter.calibration import calibration_batches

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    student = quantize(copy.deepcopy(tiny_teacher), QuantConfig(scale_search="mse"))
    calibrate(
        student, calibration_batches("random", tiny_teacher, tokenizer, 128, seed=0), QuantConfig(scale_search="mse")
    )
    return student, tokenizer


def test_llamacpp_export_of_mse_scales_reads_back(mse_student, tiny_model_dir, tmp_path):
    import gguf

    from nvfp4.converter.writers.gguf import GGUFWriter, permute_rows

    student, tokenizer = mse_student
    path = GGUFWriter(QuantConfig(scale_search="mse")).write(student, tokenizer, tiny_model_dir, tmp_path)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, student.config.num_hidden_layers)
    for name, module in quantized_modules(student).items():
        base = names.get_name(f"{name}.weight", try_suffixes=(".weight",)).removesuffix(".weight")
        t = tensors[f"{base}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.NVFP4, name
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(module.out_features, -1)
        got = values * float(tensors[f"{base}.scale"].data[0])
        expected = module.quantized_weight().detach()
        if name.endswith(("q_proj", "k_proj")):
            config = student.config
            expected = permute_rows(
                expected, config.num_attention_heads if name.endswith("q_proj") else config.num_key_value_heads
            )
        torch.testing.assert_close(got, expected, rtol=2e-7, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("target", ["modelopt", "vllm"])
def test_hf_export_of_mse_scales_carries_them(mse_student, tiny_model_dir, tmp_path, target):
    from safetensors.torch import load_file

    from nvfp4.converter.writers import load_all_writers

    student, tokenizer = mse_student
    load_all_writers()[target](QuantConfig(scale_search="mse"), torch.float32).write(
        student, tokenizer, tiny_model_dir, tmp_path
    )
    tensors = load_file(tmp_path / "model.safetensors")
    packed_key, gscale = (
        ("weight", "weight_scale_2") if target == "modelopt" else ("weight_packed", "weight_global_scale")
    )
    for name, module in quantized_modules(student).items():
        assert torch.equal(tensors[f"{name}.weight_scale"].view(torch.uint8), module.block_scales.view(torch.uint8)), (
            name
        )
        s2 = tensors[f"{name}.{gscale}"].reshape(())
        s2 = s2 if target == "modelopt" else 1 / s2  # compressed-tensors stores the reciprocal
        stored = numerics.dequantize_ref(tensors[f"{name}.{packed_key}"], tensors[f"{name}.weight_scale"], s2)
        torch.testing.assert_close(
            stored, module.quantized_weight().detach(), rtol=2e-7, atol=0, msg=lambda m: f"{name}: {m}"
        )


def test_vllm_export_of_mse_scales_reloads_in_transformers(mse_student, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from nvfp4.converter.writers import load_all_writers

    student, tokenizer = mse_student
    load_all_writers()["vllm"](QuantConfig(scale_search="mse"), torch.float32).write(
        student, tokenizer, tiny_model_dir, tmp_path
    )
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    for name, module in quantized_modules(student).items():
        theirs = reloaded.get_submodule(name).weight.detach().float()
        # compressed-tensors dequantizes through bf16; a different block scale would move values by >= 6%
        torch.testing.assert_close(
            theirs, module.quantized_weight().detach(), rtol=1e-2, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )


def test_convert_pipeline_with_mse_act(tiny_model_dir, tiny_teacher, tmp_path):
    import json

    from safetensors.torch import load_file

    from nvfp4.converter.calibration import calibration_batches
    from nvfp4.converter.pipeline import ConvertConfig, convert

    out = tmp_path / "out"
    cfg = QuantConfig(scheme="nvfp4-a16", scale_search="mse-act")
    convert(
        ConvertConfig(
            out=out,
            source=str(tiny_model_dir),
            quant=cfg,
            targets=("modelopt",),
            calib_data="random",
            calib_tokens=128,
            evaluate=False,
        )
    )
    report = json.loads((out / "report.json").read_text())
    assert report["quant_config"]["scale_search"] == "mse-act" and report["calibration"] is not None
    expected = quantize(copy.deepcopy(tiny_teacher), cfg)
    calibrate(expected, calibration_batches("random", tiny_teacher, None, 128, seed=0), cfg)
    tensors = load_file(out / "modelopt" / "model.safetensors")
    differs_from_amax = 0
    for name, module in quantized_modules(expected).items():
        written = tensors[f"{name}.weight_scale"].view(torch.uint8)
        assert torch.equal(written, module.block_scales.view(torch.uint8)), name
        differs_from_amax += not torch.equal(
            written, numerics.block_scales(module.weight, module.weight_gscale).view(torch.uint8)
        )
    assert differs_from_amax == len(quantized_modules(expected))
