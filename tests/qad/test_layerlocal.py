"""Layer-local distillation (--qad-mode layer, layer+global): each layer trained to match its teacher layer."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from nvfp4.cli import cli
from nvfp4.converter.config import QuantConfig
from nvfp4.converter.layerwise import capture_layer_inputs, run_layer
from nvfp4.converter.models import load_causal_lm
from nvfp4.converter.quantize import quantize, quantized_modules
from nvfp4.qad.config import QADConfig
from nvfp4.qad.layerlocal import distill_layers, train_layer
from support.families import TINY


def sequences(vocab: int, count: int = 6, length: int = 32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, length), generator=generator) for _ in range(count)]


def test_training_a_layer_lowers_its_output_error_and_leaves_fixed_e4m3_scales(family_dirs):
    teacher, _, _ = load_causal_lm(family_dirs("llama"))
    student = quantize(copy.deepcopy(teacher), QuantConfig(scheme="nvfp4-a16"))
    inputs, arguments = capture_layer_inputs(teacher, sequences(teacher.config.vocab_size))
    targets = run_layer(teacher.model.layers[0], inputs, arguments[0])
    layer = student.model.layers[0]
    before = quantized_modules(layer)["self_attn.q_proj"].export()
    result = train_layer(layer, inputs, targets, arguments[0], QADConfig(), None, 60)
    assert result.steps == 60 and result.last_loss < 0.7 * result.first_loss, result
    module = quantized_modules(layer)["self_attn.q_proj"]
    assert module.log_block_scales is None and module.block_scales.dtype == torch.float8_e4m3fn
    assert not torch.equal(module.export().packed, before.packed)
    assert not any(m.weight.requires_grad or m.weight.grad is not None for m in quantized_modules(layer).values())


def test_distilling_every_layer_brings_the_student_closer_to_the_teacher(family_dirs):
    teacher, _, _ = load_causal_lm(family_dirs("qwen3_moe"))
    student = quantize(copy.deepcopy(teacher), QuantConfig(scheme="nvfp4"))
    from nvfp4.converter.quantize import calibrate

    data = sequences(teacher.config.vocab_size)
    calibrate(student, data, QuantConfig(scheme="nvfp4"))
    ids = torch.cat(data)

    def kl() -> float:
        with torch.no_grad():
            t, s = teacher(ids).logits.log_softmax(-1), student(ids).logits.log_softmax(-1)
        return (t.exp() * (t - s)).sum(-1).mean().item()

    start = kl()
    summary = distill_layers(student, teacher, data, QADConfig(steps=30), None)
    assert summary["layers"] == 2 and summary["steps"] == 60
    assert all(a < b for a, b in zip(summary["relative_error_after"], summary["relative_error_before"]))
    assert kl() < start


@pytest.mark.parametrize("family", list(TINY))
def test_every_family_converts_with_layer_and_global_qad(family_dirs, family, tmp_path):
    """The defaults serve any family (a smoke pass): layer-local, then global, two steps each, all targets."""
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(family_dirs(family)),
            "-o",
            str(out),
            "--scheme",
            "nvfp4",
            "--qad-mode",
            "layer+global",
            "--qad-steps",
            "2",
            "--qad-seq-len",
            "16",
            "--qad-data",
            "random",
            "--calib-data",
            "random",
            "--calib-tokens",
            "128",
            "--no-eval",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["qad"]["steps"] == 2 and report["qad"]["layer_local"]["steps"] == 2 * 2


def test_layer_mode_streams_with_the_layer_by_layer_ptq_and_its_outputs_verify(family_dirs, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(family_dirs("llama")),
            "-o",
            str(out),
            "--scheme",
            "nvfp4",
            "--qad-mode",
            "layer",
            "--qad-steps",
            "5",
            "--calib-data",
            "random",
            "--calib-tokens",
            "256",
            "--layerwise",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert "quantize, calibrate, export (layer by layer)" in report["timings_seconds"]
    assert report["qad"]["layer_local"]["steps"] == 2 * 5
    verified = CliRunner().invoke(cli, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(family_dirs("llama")),
            "-o",
            str(tmp_path / "g"),
            "--layerwise",
            "--qad-mode",
            "layer+global",
            "--qad-steps",
            "2",
        ],
    )
    assert result.exit_code == 2 and "--qad-mode layer" in result.output


def test_layer_local_qad_under_torchrun_is_refused_before_any_work(family_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(family_dirs("llama")),
            "-o",
            str(tmp_path / "out"),
            "--qad-mode",
            "layer+global",
            "--qad-steps",
            "2",
        ],
    )
    assert result.exit_code == 2 and "without torchrun" in result.output and not (tmp_path / "out").exists()
