"""Models bigger than memory: layer-by-layer PTQ, streamed shards, the memory plan."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nvfp4.cli import cli
from nvfp4.converter import layerwise
from nvfp4.converter import plan as plans
from nvfp4.converter.quantize import eligible_linears
from nvfp4.converter.shards import INDEX, Checkpoint, ShardWriter, Spec
from nvfp4.converter.stages import Requirements
from nvfp4.qad.config import QADConfig
from nvfp4.qad.stages import GlobalQAD


def convert(source, out, *args):
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(source),
            "-o",
            str(out),
            "--qad-steps",
            "0",
            "--calib-data",
            "random",
            "--calib-tokens",
            "256",
            *args,
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def files(out) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.suffix in (".safetensors", ".gguf", ".json") and p.name != "report.json"
    }


CASES = [
    ("llama", ["--scheme", "nvfp4-a16"]),
    ("llama", ["--scheme", "nvfp4", "--smooth-alpha", "0.5", "--scale-search", "mse-act", "--rounding", "gptq"]),
    ("qwen3_moe", ["--scheme", "nvfp4", "--smooth-alpha", "0.5", "--scale-search", "mse-act", "--rounding", "gptq"]),
    ("mixtral", ["--scheme", "nvfp4-a16", "--scale-search", "mse-act", "--rounding", "gptq"]),
    ("gemma3", ["--scheme", "nvfp4", "--smooth-alpha", "0.5", "--scale-search", "mse"]),
    ("phi3", ["--scheme", "nvfp4", "--expert-calibration", "routed", "--rounding", "gptq"]),
]


@pytest.mark.parametrize("family,args", CASES, ids=[f"{f}-{'-'.join(a[1::2])}" for f, a in CASES])
def test_layer_by_layer_writes_the_whole_model_paths_bytes(family_dirs, family, args, tmp_path):
    whole = convert(family_dirs(family), tmp_path / "whole", *args)
    streamed = convert(family_dirs(family), tmp_path / "streamed", *args, "--layerwise")
    ours, theirs = files(whole), files(streamed)
    assert ours.keys() == theirs.keys() and len([k for k in ours if k.endswith((".safetensors", ".gguf"))]) == 3
    assert [k for k in ours if ours[k] != theirs[k]] == []
    reports = [json.loads((out / "report.json").read_text()) for out in (whole, streamed)]
    assert "quantize, calibrate, export (layer by layer)" in reports[1]["timings_seconds"]
    kl = [report["accuracy"]["results"]["NVFP4"]["prose_kl"] for report in reports]
    assert kl[0] == pytest.approx(kl[1], rel=1e-3, abs=1e-6), "the streamed evaluation measures what the whole one does"


def test_at_most_one_decoder_layer_is_held_at_a_time(family_dirs, tmp_path, monkeypatch):
    held = []
    real_layer = layerwise.ShardedModel.layer

    def layer(self, index):
        held.append(
            sum(any(not p.is_meta for p in decoder_layer.parameters()) for decoder_layer in self.decoder.layers)
        )
        return real_layer(self, index)

    monkeypatch.setattr(layerwise.ShardedModel, "layer", layer)
    convert(family_dirs("qwen3"), tmp_path / "out", "--scheme", "nvfp4", "--layerwise", "--targets", "modelopt")
    assert held == [0, 0], "a decoder layer was still loaded when the next one was read"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_input_folders_convert_as_one_file_does(family_dirs, tmp_path, dtype):
    """Hugging Face's shards with their index, bf16 or fp16, untied head: both paths read them, same bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = family_dirs("mistral")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    assert not model.config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(source)
    folders = {}
    for kind, shard in (("one", "10GB"), ("sharded", "2MB")):  # one name: the GGUF records the folder's
        folders[kind] = tmp_path / kind / "model"
        model.save_pretrained(folders[kind], max_shard_size=shard)
        tokenizer.save_pretrained(folders[kind])
    assert (folders["sharded"] / INDEX).is_file() and len(list(folders["sharded"].glob("*.safetensors"))) > 2
    outputs = [
        files(convert(folders["one"], tmp_path / "out-one", "--scheme", "nvfp4")),
        files(convert(folders["sharded"], tmp_path / "out-sharded", "--scheme", "nvfp4", "--layerwise")),
        files(convert(folders["sharded"], tmp_path / "out-whole", "--scheme", "nvfp4")),
    ]
    weights = lambda out: {k: v for k, v in out.items() if k.endswith((".safetensors", ".gguf"))}  # noqa: E731
    assert weights(outputs[0]) == weights(outputs[1]) == weights(outputs[2])


def test_a_pickle_only_folder_is_refused(family_dirs, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(family_dirs("llama"), folder)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    result = CliRunner().invoke(cli, ["convert", str(folder), "-o", str(tmp_path / "out"), "--layerwise"])
    assert result.exit_code == 2 and "pickled checkpoints are not loaded" in result.output


def test_shard_writer_lays_out_shards_and_an_index_that_safetensors_and_transformers_read(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    )
    state = {name: tensor.detach().to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    writer = ShardWriter(tmp_path, [Spec(n, t.dtype, tuple(t.shape)) for n, t in state.items()], max_shard_bytes=40_000)
    with pytest.raises(ValueError, match="expected"):
        writer.write("lm_head.weight", state["lm_head.weight"])  # not the next declared tensor
    for name, tensor in state.items():
        writer.write(name, tensor)
    shards = writer.close()
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / INDEX).read_text())
    assert set(index["weight_map"]) == set(state)
    read = {name: tensor for shard in shards for name, tensor in load_file(shard).items()}
    assert all(torch.equal(read[name], tensor) for name, tensor in state.items())
    assert all(torch.equal(Checkpoint(tmp_path).get(name), tensor) for name, tensor in state.items())
    model.config.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(
        torch.equal(reloaded.state_dict()[name], tensor) for name, tensor in state.items() if name != "lm_head.weight"
    )


def test_dry_run_prints_the_plan_and_writes_nothing(family_dirs, tmp_path):
    result = CliRunner().invoke(
        cli, ["convert", str(family_dirs("qwen3_moe")), "-o", str(tmp_path / "out"), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    for row in (
        "PTQ, whole model",
        "PTQ, layer by layer",
        "QAD, per device",
        "disk: modelopt",
        "disk: QAD checkpoints",
    ):
        assert row in result.output
    assert not list(tmp_path.iterdir())


WHOLE_MODEL_QAD = GlobalQAD(QADConfig(steps=1)).requirements


def test_qad_that_does_not_fit_is_refused_with_what_would(family_dirs, tmp_path, monkeypatch):
    model = plans.skeleton(family_dirs("llama"))
    from nvfp4.converter.config import QuantConfig

    needs = plans.Needs(QuantConfig(), ("modelopt",), 2048, WHOLE_MODEL_QAD, device="cuda")
    shape = plans.ModelShape.of(model, eligible_linears(model, needs.quant))
    one = plans.qad_per_device(shape, needs)
    two = plans.qad_per_device(
        shape, plans.Needs(QuantConfig(), ("modelopt",), 2048, WHOLE_MODEL_QAD, device="cuda", world_size=2)
    )
    assert two < one  # states shard over the ranks
    plan = plans.Plan(shape, needs, memory=int((one + two) / 2 / plans.HEADROOM), disk=10**12)
    with pytest.raises(plans.UserError, match=r"--qad-steps 0 .*torchrun --nproc-per-node 2"):
        plan.choose(layerwise=False)
    assert plans.Plan(shape, needs, memory=10**12, disk=10**12).choose(layerwise=False) == "whole"
    with pytest.raises(plans.UserError, match="not enough disk space"):
        plans.Plan(shape, needs, memory=10**12, disk=1).choose(layerwise=False)
    ptq = plans.Needs(QuantConfig(), ("modelopt",), 2048)
    tight = plans.Plan(shape, ptq, memory=int(plans.ptq_layerwise(shape, ptq) / plans.HEADROOM) + 1, disk=10**12)
    assert (
        plans.ptq_whole(shape, ptq) > plans.ptq_layerwise(shape, ptq) and tight.choose(layerwise=False) == "layerwise"
    )


def test_layer_local_qad_in_memory_is_planned_above_ptq_and_streams_where_that_does_not_fit(family_dirs):
    from nvfp4.converter.config import QuantConfig

    model = plans.skeleton(family_dirs("llama"))
    ptq = plans.Needs(QuantConfig(), ("modelopt",), 2048)
    layer_qad = plans.Needs(QuantConfig(), ("modelopt",), 2048, Requirements(whole_model=False, per_layer=True))
    shape = plans.ModelShape.of(model, eligible_linears(model, ptq.quant))
    assert plans.ptq_whole(shape, layer_qad) > plans.ptq_whole(shape, ptq)
    memory = int(plans.ptq_whole(shape, ptq) / plans.HEADROOM) + 1  # PTQ fits whole, layer-local QAD does not
    assert plans.Plan(shape, ptq, memory=memory, disk=10**12).choose(layerwise=False) == "whole"
    assert plans.Plan(shape, layer_qad, memory=memory, disk=10**12).choose(layerwise=False) == "layerwise"


def test_layerwise_refuses_qad(family_dirs, tmp_path):
    result = CliRunner().invoke(
        cli, ["convert", str(family_dirs("llama")), "-o", str(tmp_path / "out"), "--layerwise", "--qad-steps", "2"]
    )
    assert result.exit_code == 2 and "--qad-steps 0" in result.output
