"""Held-out evaluation (converter/evaluate.py) and `nvfp4 eval`: metrics, table, JSON, errors."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from nvfp4.cli import cli
from nvfp4.converter.config import QuantConfig
from nvfp4.converter.evaluate import METRICS, build_eval_set, evaluate, format_table, frozen_fake_quant
from nvfp4.converter.models import load_causal_lm
from nvfp4.converter.quantize import quantize, quantized_modules


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    teacher, tokenizer, _ = load_causal_lm(tiny_model_dir)
    with torch.no_grad():  # confident predictions, so that greedy answers are stable under small changes
        for name, param in teacher.named_parameters():
            if "norm" not in name:
                param.mul_(8.0)
    data = build_eval_set(teacher, tokenizer, answer_tokens=16, greedy_tokens=8, prose_tokens=64)
    return teacher, tokenizer, data


def test_eval_set_holds_teacher_answers_and_prose(setup):
    _, tokenizer, data = setup
    assert len(data.chat) == 12 and len(data.prose) >= 2
    ids, prompt_len = data.chat[0]
    assert "<|im_start|>assistant" in tokenizer.decode(ids[0, :prompt_len]) and ids.shape[1] > prompt_len
    assert all(len(g) <= 8 for g in data.teacher_greedy)


def test_teacher_scores_perfectly_and_students_rank_by_damage(setup):
    teacher, tokenizer, data = setup
    ptq = quantize(copy.deepcopy(teacher), QuantConfig(scheme="nvfp4-a16"))
    noisy = copy.deepcopy(ptq)
    with torch.no_grad():
        for module in quantized_modules(noisy).values():
            module.weight.add_(0.5 * module.weight.std() * torch.randn_like(module.weight))
    results = evaluate(teacher, {"PTQ": ptq, "noisy": noisy}, tokenizer, data)
    assert list(results) == ["BF16", "PTQ", "noisy"] and set(results["PTQ"]) == set(METRICS)
    bf16 = results["BF16"]
    assert abs(bf16["chat_kl"]) < 1e-6 and abs(bf16["prose_kl"]) < 1e-6
    assert bf16["chat_top1"] == bf16["prose_top1"] == bf16["greedy_agreement"] == 1.0
    assert 0 < results["PTQ"]["chat_kl"] < results["noisy"]["chat_kl"]
    assert results["PTQ"]["prose_kl"] < results["noisy"]["prose_kl"]
    assert results["noisy"]["chat_top1"] < 1.0
    table = format_table(results)
    assert table.splitlines()[0].split()[:3] == ["model", "chat", "KL"]
    assert [row.split()[0] for row in table.splitlines()[2:]] == ["BF16", "PTQ", "noisy"]
    assert f"{results['PTQ']['chat_kl']:.4f}" in table
    long_names = format_table({"BF16": results["BF16"], "a16-mse-act-nearest-rounding": results["PTQ"]}).splitlines()
    assert len({len(line) for line in long_names}) == 1, long_names  # every row as wide as the header: aligned


def test_frozen_fake_quant_changes_nothing_but_speed(setup):
    teacher, _, data = setup
    student = quantize(copy.deepcopy(teacher), QuantConfig(scheme="nvfp4"))
    ids = data.chat[0][0]
    with torch.no_grad():
        live = student(ids).logits
        with frozen_fake_quant(student):
            frozen = student(ids).logits
    assert torch.equal(live, frozen)
    assert all("quantized_weight" not in vars(m) for m in quantized_modules(student).values())  # restored


def test_eval_command_on_a_converted_folder_writes_json(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    converted = runner.invoke(
        cli,
        [
            "convert",
            str(tiny_model_dir),
            "-o",
            str(out),
            "--qad-steps",
            "0",
            "--scheme",
            "nvfp4-a16",
            "--targets",
            "modelopt",
            "--no-eval",
        ],
    )
    assert converted.exit_code == 0, converted.output
    result = runner.invoke(
        cli, ["eval", str(tiny_model_dir), str(out), str(tiny_model_dir), "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert list(saved) == ["BF16", "out", tiny_model_dir.name]
    assert saved[tiny_model_dir.name]["chat_kl"] < 1e-6  # the teacher as a student
    assert saved["out"]["chat_kl"] > 1e-4  # the NVFP4 export differs from it
    assert "out" in result.output and "chat KL" in result.output


def test_eval_command_bad_student_is_one_line(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), str(tmp_path / "missing")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and "does not exist" in result.output
