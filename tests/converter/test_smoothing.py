"""Channel smoothing (`--smooth-alpha`): the same function, the balanced ranges, and less activation error."""

import copy
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from nvfp4.converter.smoothing import input_channel_amax, smooth
from nvfp4.kernels.numerics import activation_global_scale
from nvfp4.kernels.ops import fake_quantize_activation
from support.families import TINY_CONFIG


def _tiny(architecture: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        architecture
    ]
    model = model_class(config_class(vocab_size=256, **TINY_CONFIG)).eval()
    with torch.no_grad():  # random init has flat channels and zero biases: give them outliers to smooth
        for norm in (m for n, m in model.named_modules() if n.endswith("layernorm")):
            norm.weight.copy_(torch.rand(norm.weight.shape) ** 4 * 8 + 0.05)
        for bias in (p for n, p in model.named_parameters() if n.endswith("bias")):
            bias.normal_()
    return model


def _batches(n: int = 2) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (1, 32)) for _ in range(n)]


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # qwen2: q/k/v biases, v_proj's folded with its rows
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_smoothing_keeps_the_function(architecture, alpha):
    model = _tiny(architecture)
    smoothed = copy.deepcopy(model)
    assert smooth(smoothed, _batches(), alpha) == 7 * TINY_CONFIG["num_hidden_layers"]
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        reference, logits = model(ids).logits, smoothed(ids).logits
    assert (logits - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert not torch.equal(
        smoothed.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight
    )


def test_smoothing_balances_each_channel_between_input_and_weights():
    """With alpha 0.5 the smoothed input's channel range over the weights' column range is one constant."""
    model, batches = _tiny("llama"), _batches()
    smooth(model, batches, 0.5)
    after = input_channel_amax(model, batches)
    layer = model.model.layers[1]
    for name, weights in (
        ("self_attn.q_proj", [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
        ("mlp.gate_proj", [layer.mlp.gate_proj, layer.mlp.up_proj]),
        ("mlp.down_proj", [layer.mlp.down_proj]),
    ):
        weight_amax = torch.stack([w.weight.abs().amax(0) for w in weights]).amax(0)
        ratio = (after[f"model.layers.1.{name}"] / weight_amax).log()
        assert ratio.std() < 1e-3, name


class OnePlusWeightNorm(nn.Module):  # Gemma's kind: x * (1 + w); dividing w does not divide the output
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(size))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_a_norm_that_cannot_absorb_the_scales_is_left_alone(caplog):
    model = _tiny("llama")
    model.model.layers[0].input_layernorm = OnePlusWeightNorm(TINY_CONFIG["hidden_size"])
    smoothed = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="nvfp4.converter.smoothing"):
        count = smooth(smoothed, _batches(), 0.5)
    assert count == 7 * TINY_CONFIG["num_hidden_layers"] - 3
    assert "not smoothing model.layers.0" in caplog.text and "q_proj/k_proj/v_proj" in caplog.text
    assert torch.equal(smoothed.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.allclose(smoothed(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5])
def test_alpha_outside_the_open_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be in"):
        smooth(_tiny("llama"), _batches(1), alpha)


def _activation_error(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean over decoder linears of the output error that NVFP4 activation rounding (calibrated global scale)
    causes, relative to the output: what the smoothing trades, since it moves range into the weights."""
    inputs: dict[str, list[torch.Tensor]] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, []).append(args[0].detach()))
        for n, m in linears.items()
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    errors = []
    for name, xs in inputs.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
        error = fake_quantize_activation(x, activation_global_scale(x.abs().amax())) - x
        weight = linears[name].weight.detach()
        errors.append(((error @ weight.T).norm() / (x @ weight.T).norm()).item())
    return sum(errors) / len(errors)


@pytest.mark.slow
def test_smoothing_lowers_the_default_models_activation_error(default_model_dir):
    from nvfp4.converter.calibration import calibration_batches
    from nvfp4.converter.models import load_causal_lm

    model, tokenizer, _ = load_causal_lm(default_model_dir, torch.float32, torch.device("cpu"), False)
    text = Path(__file__).parents[2] / "converter" / "data" / "calibration_prompts.txt"
    batches = calibration_batches(str(text), model, tokenizer, 1024, 0)
    before = _activation_error(model, batches)
    smooth(model, batches, 0.5)
    after = _activation_error(model, batches)
    assert after < 0.9 * before, (before, after)
