"""converter/stages.py: a PTQ algorithm is one registered class, seen by QuantConfig, the CLI and both paths."""

import copy

import pytest
import torch

from nvfp4.converter.config import CHOICES, QuantConfig
from nvfp4.converter.models import load_causal_lm
from nvfp4.converter.quantize import calibrate, quantize, quantized_modules
from nvfp4.converter.stages import PTQ_STAGES, PTQStage, ptq_stages, register_ptq_stage
from nvfp4.errors import UserError
from nvfp4.kernels.numerics import block_scales


@pytest.fixture
def halved_scales():
    """A toy scale search: every block scale at half the amax rule's (registered for the test, then removed)."""

    @register_ptq_stage
    class HalvedScales(PTQStage):
        name = "halved"
        option = "scale_search"
        observes = True
        seen = 0

        def observe(self, name, module, x):
            HalvedScales.seen += 1

        def after_calibration(self, modules):
            for module in modules.values():
                module.block_scales = (block_scales(module.weight, module.weight_gscale).float() / 2).to(
                    torch.float8_e4m3fn
                )

    yield HalvedScales
    del PTQ_STAGES["halved"]
    CHOICES["scale_search"].remove("halved")


def test_a_registered_stage_is_a_choice_and_runs_in_calibration(halved_scales, tiny_model_dir):
    teacher, _, _ = load_causal_lm(tiny_model_dir)
    cfg = QuantConfig(scheme="nvfp4-a16", scale_search="halved")
    assert [type(stage) for stage in ptq_stages(cfg)] == [halved_scales]
    student = quantize(copy.deepcopy(teacher), cfg)
    calibrate(student, [torch.randint(3, 100, (1, 16))], cfg)
    assert halved_scales.seen == len(quantized_modules(student))
    for module in quantized_modules(student).values():
        expected = (block_scales(module.weight, module.weight_gscale).float() / 2).to(torch.float8_e4m3fn)
        assert torch.equal(module.block_scales.view(torch.uint8), expected.view(torch.uint8))


def test_an_unregistered_choice_is_a_field_error():
    with pytest.raises(UserError, match="unknown `scale_search` 'halved'") as caught:
        QuantConfig(scale_search="halved")
    assert caught.value.field == "scale_search"


def test_the_shipped_stages_and_what_selects_them():
    assert CHOICES == {"scale_search": ["amax", "mse", "mse-act"], "rounding": ["nearest", "gptq"]}
    names = lambda cfg: [stage.name for stage in ptq_stages(cfg)]  # noqa: E731
    assert names(QuantConfig()) == ["input-scales"]
    assert names(QuantConfig(scheme="nvfp4-a16")) == []
    assert names(QuantConfig(scale_search="mse-act", rounding="gptq")) == ["input-scales", "mse-act", "gptq"]
