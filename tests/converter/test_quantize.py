"""converter/quantize.py: fused groups share scales, exclusion, the in_features % 16 rule, calibration."""

import copy

import pytest
import torch
from torch import nn

from nvfp4.converter.config import QuantConfig
from nvfp4.converter.models import load_causal_lm
from nvfp4.converter.quantize import calibrate, eligible_linears, quantize, quantized_modules
from nvfp4.errors import UserError
from nvfp4.kernels import numerics
from nvfp4.kernels.linear import NVFP4FakeQuantLinear

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    model, _, _ = load_causal_lm(tiny_model_dir)
    return model


def batches(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, 24), generator=generator) for _ in range(2)]


def test_fused_groups_share_the_group_max_global_scale(teacher):
    original = {n: m.weight.detach().clone() for n, m in teacher.named_modules() if isinstance(m, nn.Linear)}
    modules = quantized_modules(quantize(copy.deepcopy(teacher), QuantConfig()))
    for layer in range(teacher.config.num_hidden_layers):
        for parent, group in [("self_attn", GROUPS[0]), ("mlp", GROUPS[1])]:
            names = [f"model.layers.{layer}.{parent}.{leaf}" for leaf in group]
            group_amax = max(original[n].abs().max().item() for n in names)
            for name in names:
                assert modules[name].weight_gscale.item() == numerics.global_scale(group_amax).item(), name
        for alone in (f"model.layers.{layer}.self_attn.o_proj", f"model.layers.{layer}.mlp.down_proj"):
            assert modules[alone].weight_gscale.item() == numerics.global_scale(original[alone].abs().max()).item()
    # a shared s2 differs from at least one member's own s2 (else the test proves nothing)
    q, k = (original[f"model.layers.0.self_attn.{p}"].abs().max() for p in ("q_proj", "k_proj"))
    assert q != k


def test_default_exclusion_keeps_lm_head_and_quantizes_every_other_linear(teacher):
    student = quantize(copy.deepcopy(teacher), QuantConfig())
    kinds = {n: type(m) for n, m in student.named_modules() if isinstance(m, (nn.Linear, NVFP4FakeQuantLinear))}
    assert kinds.pop("lm_head") is nn.Linear
    assert kinds and all(kind is NVFP4FakeQuantLinear for kind in kinds.values())


def test_user_exclusion_patterns_and_whole_fused_groups(teacher):
    cfg = QuantConfig(exclude=("model.layers.1.*",))
    chosen = set(eligible_linears(teacher, cfg))
    assert not any(n.startswith("model.layers.1.") for n in chosen)
    assert {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj"} <= chosen
    # excluding k_proj alone would split the q/k/v group that engines fuse: refused, naming the group
    with pytest.raises(UserError, match="fused group model.layers.0.self_attn.q_proj, .*k_proj, .*v_proj"):
        eligible_linears(teacher, QuantConfig(exclude=("model.layers.0.self_attn.k_proj",)))
    assert not any(
        ".layers.0.self_attn." in n for n in eligible_linears(teacher, QuantConfig(exclude=("*.layers.0.self_attn.*",)))
    )


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.fine = nn.Linear(32, 16)
        self.odd = nn.Linear(20, 16)

    def forward(self, x):
        return self.odd(self.fine(x)[..., :4].repeat(1, 5))


def test_in_features_not_multiple_of_16_is_refused_unless_excluded():
    with pytest.raises(UserError, match=r"cannot quantize odd \(in_features 20\).*--exclude"):
        quantize(Odd(), QuantConfig(scheme="nvfp4-a16"))
    model = quantize(Odd(), QuantConfig(scheme="nvfp4-a16", exclude=("odd",)))
    assert isinstance(model.fine, NVFP4FakeQuantLinear) and type(model.odd) is nn.Linear
    assert model(torch.randn(3, 32)).shape == (3, 16)


def test_calibration_matches_modelopt_input_amax(teacher):
    import modelopt.torch.quantization as mtq

    calibration = batches(teacher.config.vocab_size)
    cfg = QuantConfig(scheme="nvfp4")
    student = quantize(copy.deepcopy(teacher), cfg)
    head_calls = []
    student.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    calibrate(student, calibration, cfg)
    assert not head_calls, "calibration ran the vocabulary head, which feeds no quantizer"
    reference = copy.deepcopy(teacher)

    def forward_loop(model):
        for batch in calibration:
            model(batch)

    mtq.quantize(reference, mtq.NVFP4_DEFAULT_CFG, forward_loop=forward_loop)
    theirs = {
        n: m.input_quantizer.amax.float().reshape(())
        for n, m in reference.named_modules()
        if hasattr(m, "input_quantizer") and m.input_quantizer.is_enabled and m.input_quantizer.amax is not None
    }
    ours = quantized_modules(student)
    assert set(theirs) == set(ours)
    for name, module in ours.items():
        parent, _, leaf = name.rpartition(".")
        group = next((g for g in GROUPS if leaf in g), (leaf,))
        amax = torch.stack([theirs[f"{parent}.{member}"] for member in group]).amax()  # export unifies fused inputs
        assert torch.equal(module.input_gscale, numerics.activation_global_scale(amax)), name


def test_weight_only_scheme_never_quantizes_activations(teacher):
    cfg = QuantConfig(scheme="nvfp4-a16")
    student = quantize(copy.deepcopy(teacher), cfg)
    calibrate(student, batches(teacher.config.vocab_size), cfg)
    assert all(not m.quantize_input and m.input_gscale is None for m in quantized_modules(student).values())
