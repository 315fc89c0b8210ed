"""`nvfp4 convert`: output layout, report, atomic writes and one-line errors for bad input."""

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from nvfp4.cli import cli
from nvfp4.converter.pipeline import keep_freed_memory
from nvfp4.converter.writers import Writer, load_all_writers


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    # "[stage]" progress and the memory plan (its first line, then indented rows) are not errors
    lines = [
        line for line in result.output.splitlines() if line.strip() and not line.startswith(("[", "memory plan:", "  "))
    ]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def tiny_out(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "out"
    result = run(
        "convert",
        str(tiny_model_dir),
        "-o",
        str(out),
        "--qad-steps",
        "0",
        "--calib-data",
        "random",
        "--calib-tokens",
        "256",
    )
    assert result.exit_code == 0, result.output
    return out


def test_layout_and_report(tiny_out, tiny_model_dir):
    assert (tiny_out / "modelopt" / "hf_quant_config.json").is_file()
    assert (tiny_out / "vllm" / "config.json").is_file()
    assert (tiny_out / "llamacpp" / "model.gguf").is_file()
    report = json.loads((tiny_out / "report.json").read_text())
    assert report["scheme"] == "nvfp4" and report["source"] == str(tiny_model_dir.resolve())
    assert set(report["sizes_bytes"]) == {"bf16", "modelopt", "vllm", "llamacpp"}
    assert {"load", "quantize", "calibrate", "export"} <= set(report["timings_seconds"])
    assert set(report["export_seconds"]) == {"modelopt", "vllm", "llamacpp"}
    assert report["accuracy"]["results"], "accuracy vs the teacher is missing"
    assert "modelopt" in (tiny_out / "report.md").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert (tiny_out.stat().st_mode & 0o777) == 0o777 & ~umask, "OUT must be readable as the umask says"
    assert not list(tiny_out.parent.glob(".out.*")), "temporary folders were left behind"


def test_existing_out_needs_force(tiny_out, tiny_model_dir):
    assert_one_line_error(run("convert", str(tiny_model_dir), "-o", str(tiny_out), "--qad-steps", "0"), "--force")


@pytest.mark.parametrize("target", ["source", "parent", "stranger"])
def test_force_replaces_only_an_earlier_output_never_the_source(tiny_model_dir, tmp_path, target):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    source = tmp_path / "models" / "tiny"
    out = {"source": source, "parent": tmp_path / "models", "stranger": tmp_path / "notes"}[target]
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("mine")
    result = run("convert", str(source), "-o", str(out), "--qad-steps", "0", "--force")
    assert_one_line_error(result, "holds the source model" if target != "stranger" else "not an earlier convert output")
    assert (out / "keep.txt").read_text() == "mine" and (source / "config.json").is_file()


def test_resume_refuses_checkpoints_of_another_origin(tmp_path):
    from nvfp4.converter.pipeline import claim_workdir
    from nvfp4.errors import UserError

    claim_workdir(tmp_path, "a" * 64, resume=False)
    claim_workdir(tmp_path, "a" * 64, resume=True)  # the same model, quantization and calibration
    with pytest.raises(UserError, match="belong to another model"):
        claim_workdir(tmp_path, "b" * 64, resume=True)
    claim_workdir(tmp_path, "b" * 64, resume=False)  # a fresh run takes the folder over
    assert (tmp_path / "origin.sha256").read_text() == "b" * 64


def test_origin_changes_with_the_source_and_the_quantization(tiny_model_dir, tmp_path):
    from dataclasses import replace

    from nvfp4.converter.pipeline import ConvertConfig, origin

    shutil.copytree(tiny_model_dir, tmp_path / "a")
    cfg = ConvertConfig(source=str(tmp_path / "a"), out=tmp_path / "out")
    first = origin(cfg, tmp_path / "a")
    assert origin(cfg, tmp_path / "a") == first
    assert origin(replace(cfg, calib_tokens=cfg.calib_tokens + 1), tmp_path / "a") != first
    config = tmp_path / "a" / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    assert origin(cfg, tmp_path / "a") != first


def test_missing_model_path(tmp_path):
    assert_one_line_error(run("convert", str(tmp_path / "nope"), "-o", str(tmp_path / "o")), "does not exist")


def test_not_a_causal_lm(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert_one_line_error(
        run("convert", str(tmp_path / "bert"), "-o", str(tmp_path / "o")), "unsupported model architecture BertModel"
    )


def test_corrupt_safetensors(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_line_error(
        run("convert", str(broken), "-o", str(tmp_path / "o"), "--qad-steps", "0"), "cannot load model"
    )


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--targets", "modelopt,onnx"], "unknown target"),
        (["--qad-steps", "-1"], "--qad-steps must be >= 0"),
        (["--qad-scale-lr", "-0.1"], "--qad-scale-lr must be >= 0"),
        (["--calib-tokens", "0"], "--calib-tokens must be positive"),
        (["--smooth-alpha", "1.5"], "--smooth-alpha must be in [0, 1), got 1.5"),
    ],
)
def test_bad_options(tiny_model_dir, tmp_path, args, fragment):
    assert_one_line_error(run("convert", str(tiny_model_dir), "-o", str(tmp_path / "o"), *args), fragment)


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failure_leaves_no_half_written_out(tiny_model_dir, tmp_path, monkeypatch, failure):
    load_all_writers()

    def explode(self, *args):
        raise failure

    monkeypatch.setattr(Writer.targets["vllm"], "write", explode)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["convert", str(tiny_model_dir), "-o", str(out), "--qad-steps", "0", "--scheme", "nvfp4-a16", "--no-eval"]
    )
    assert result.exit_code != 0
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"


def test_keep_freed_memory_takes_effect_on_glibc():
    assert platform.libc_ver()[0] == "glibc", "Linux with glibc is what convert is tuned for"
    assert keep_freed_memory() is True


def test_recipe_reruns_a_convert_byte_for_byte(tiny_out, tiny_model_dir, tmp_path):
    first = json.loads((tiny_out / "report.json").read_text())
    assert first["recipe"]["training"] is None and first["recipe"]["calib_data"] == "random"
    out = tmp_path / "again"
    result = run("convert", str(tiny_model_dir), "-o", str(out), "--recipe", str(tiny_out / "report.json"), "--no-eval")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["recipe"] == first["recipe"]
    for target, name in (("modelopt", "model.safetensors"), ("llamacpp", "model.gguf")):
        assert (out / target / name).read_bytes() == (tiny_out / target / name).read_bytes(), target


def test_flags_given_override_the_recipe_and_training_settings_round_trip(tiny_out, tiny_model_dir, tmp_path):
    out = tmp_path / "a16"
    result = run(
        "convert",
        str(tiny_model_dir),
        "-o",
        str(out),
        "--recipe",
        str(tiny_out / "report.json"),
        "--scheme",
        "nvfp4-a16",
        "--targets",
        "modelopt",
        "--qad-steps",
        "2",
        "--qad-seq-len",
        "16",
        "--qad-data",
        "random",
        "--no-eval",
    )
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "report.json").read_text())["recipe"]
    first = json.loads((tiny_out / "report.json").read_text())["recipe"]
    assert recipe["quant"]["scheme"] == "nvfp4-a16" and recipe["targets"] == ["modelopt"]
    assert recipe["calib_tokens"] == first["calib_tokens"] and recipe["quant"]["rounding"] == first["quant"]["rounding"]
    assert recipe["training"]["steps"] == 2 and recipe["training"]["seq_len"] == 16
    again = tmp_path / "again"
    result = run("convert", str(tiny_model_dir), "-o", str(again), "--recipe", str(out / "report.json"), "--no-eval")
    assert result.exit_code == 0, result.output
    assert json.loads((again / "report.json").read_text())["recipe"] == recipe
    assert json.loads((again / "report.json").read_text())["qad"]["steps"] == 2


def test_recipe_json_round_trip_and_bad_recipes(tmp_path):
    from nvfp4.converter.config import QuantConfig
    from nvfp4.converter.recipe import ConvertRecipe
    from nvfp4.errors import UserError

    recipe = ConvertRecipe(
        QuantConfig(scheme="nvfp4-a16", exclude=("*.mlp.*",)), ("vllm",), "prompts", 64, 3, "float16", {"steps": 5}
    )
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe.to_dict()))
    assert ConvertRecipe.load(path) == recipe
    path.write_text(json.dumps({**recipe.to_dict(), "targets": ["onnx"]}))
    with pytest.raises(UserError, match="`targets`") as caught:
        ConvertRecipe.load(path)
    assert caught.value.field == "targets"
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="holds no recipe"):
        ConvertRecipe.load(path)


def test_a_bad_recipe_is_one_line(tiny_model_dir, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"quant": {"scheme": "int3"}}))
    assert_one_line_error(
        run("convert", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--recipe", str(recipe)),
        "unknown --scheme 'int3'",
    )


def test_sigterm_during_convert_leaves_nothing_behind(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-P",
        "-m",
        "nvfp4.cli",
        "convert",
        str(tiny_model_dir),
        "-o",
        str(out),
        "--qad-steps",
        "0",
        "--calib-data",
        "random",
        "--calib-tokens",
        "64",
        "--no-eval",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "convert ended before its temporary output appeared"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"


def test_every_file_is_synced_before_out_is_renamed_into_place(tiny_model_dir, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    result = run(
        "convert",
        str(tiny_model_dir),
        "-o",
        str(tmp_path / "out"),
        "--qad-steps",
        "0",
        "--calib-data",
        "random",
        "--calib-tokens",
        "64",
        "--no-eval",
        "--targets",
        "modelopt",
    )
    assert result.exit_code == 0, result.output
    entries = list((tmp_path / "out").rglob("*"))
    assert len(synced) >= len(entries) + 1


def test_a_full_disk_during_a_qad_checkpoint_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full)
    result = run(
        "convert",
        str(tiny_model_dir),
        "-o",
        str(tmp_path / "out"),
        "--qad-steps",
        "2",
        "--qad-seq-len",
        "16",
        "--qad-data",
        "random",
        "--calib-data",
        "random",
        "--calib-tokens",
        "64",
        "--no-eval",
        "--scheme",
        "nvfp4-a16",
        "--targets",
        "modelopt",
    )
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "cannot write the QAD checkpoint" in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
