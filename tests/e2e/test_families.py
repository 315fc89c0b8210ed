"""Every supported family (tests/support/families.py), every stage, every target, against the peers as oracles."""

import copy
import json
import time
from pathlib import Path

import gguf
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from nvfp4.cli import cli
from nvfp4.converter.config import QuantConfig
from nvfp4.converter.families import FAMILIES, family_of, hub_names
from nvfp4.converter.models import load_causal_lm
from nvfp4.converter.moe import Experts
from nvfp4.converter.quantize import calibrate, quantize, quantized_modules
from nvfp4.converter.verify import READERS, compare
from nvfp4.converter.writers import load_all_writers
from support.families import MOE, TINY, family
from support.oracles import (
    assert_gguf_quantized_equal,
    assert_same_quantized_tensors,
    calibration_batch,
    modelopt_export,
    reference_gguf,
)

ALL = list(TINY)
NVFP4 = gguf.GGMLQuantizationType.NVFP4
# llama.cpp (llama-cpp-python 0.3.36) loads these families' NVFP4 GGUFs but its graph for them passes no
# per-tensor scale to the feed-forward matmuls (its models/{qwen2,gemma3,phi3}.cpp): the logits come out NaN,
# for the GGUF its own converter writes too (Gemma 3). Their GGUFs are checked byte for byte instead.
LLAMA_CPP_DROPS_FFN_SCALES = ("qwen2", "gemma3", "phi3")
# llama.cpp's converter (same release) fails on these tiny models: Mixtral's per-expert w1/w2/w3 names; Phi-3 wants
# a tokenizer.model; Qwen2 does not recognise the pre-tokenizer transformers builds for a Qwen2 folder
LLAMA_CPP_CONVERTER_FAILS = ("mixtral", "phi3", "qwen2")


def student_of(model_dir, scheme: str, expert_calibration: str = "routed"):
    teacher, tokenizer, _ = load_causal_lm(model_dir)
    quant = QuantConfig(scheme=scheme, expert_calibration=expert_calibration)
    student = quantize(copy.deepcopy(teacher), quant)
    calibrate(student, [calibration_batch(teacher.config.vocab_size)], quant)
    return teacher, student, tokenizer, quant


def write(student, tokenizer, model_dir, quant, target, out):
    out.mkdir(parents=True)
    load_all_writers()[target](quant, torch.float32).write(student, tokenizer, model_dir, out)
    return out


def weight_only_logits(student, ids):
    saved = {n: m.input_gscale for n, m in quantized_modules(student).items()}
    for module in quantized_modules(student).values():
        module.input_gscale = None
    try:
        with torch.no_grad():
            return student(ids[None]).logits[0]
    finally:
        for name, module in quantized_modules(student).items():
            module.input_gscale = saved[name]


def hub_linears(student) -> set[str]:
    family = family_of(student.config)
    return {hub for name in quantized_modules(student) for hub in hub_names(family, name)}


def test_every_family_has_a_tiny_model_and_the_readme_its_row():
    from nvfp4.converter.families import support_table

    assert {family(name).name for name in TINY} == {f.name for f in FAMILIES}
    assert support_table() in (Path(__file__).parents[2] / "README.md").read_text(), "README's family table is stale"


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("scheme", ["nvfp4", "nvfp4-a16"])
def test_student_bytes_equal_modelopt_export(family_dirs, family, scheme, tmp_path):
    """ModelOpt 0.47's export of the same model and calibration batch: every quantized tensor (experts per
    expert, under the Hub's names) and hf_quant_config.json equal. MoE with ModelOpt's statistics
    (--expert-calibration routed)."""
    model_dir = family_dirs(family)
    _, student, tokenizer, quant = student_of(model_dir, scheme)
    ours = write(student, tokenizer, model_dir, quant, "modelopt", tmp_path / "ours")
    theirs = modelopt_export(model_dir, tmp_path / "modelopt", scheme, calibration_batch(student.config.vocab_size))
    assert_same_quantized_tensors(load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors"))
    ours_quant = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
    assert ours_quant == json.loads((theirs / "hf_quant_config.json").read_text())["quantization"]
    mine, ref = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(mine) == sorted(ref), f"tensor names differ: {sorted(set(mine) ^ set(ref))[:6]}"


def test_calibrating_all_experts_feeds_every_expert_every_token_and_changes_no_output():
    from nvfp4.converter.moe import ExpertMLP, calibrating_all_experts

    torch.manual_seed(0)
    experts = Experts(
        ExpertMLP(torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(32, 32, bias=False), torch.nn.SiLU())
        for _ in range(4)
    )
    rows = {}
    for index, expert in enumerate(experts):
        expert.down_proj.register_forward_pre_hook(
            lambda m, args, i=index: rows.__setitem__(i, rows.get(i, 0) + len(args[0]))
        )
    hidden, picked = torch.randn(10, 32), torch.tensor([[0, 1], [1, 2], [0, 2]] * 3 + [[0, 1]])  # expert 3: never
    weights = torch.rand(10, 2)
    routed = experts(hidden, picked, weights)
    assert rows == {0: 7, 1: 7, 2: 6}
    rows.clear()
    with calibrating_all_experts(torch.nn.Sequential(experts)):
        every = experts(hidden, picked, weights)
    assert rows == {0: 10, 1: 10, 2: 10, 3: 10} and torch.equal(every, routed)
    assert not experts.calibrate_all


@pytest.mark.parametrize("family", MOE)
def test_all_experts_of_a_layer_share_an_input_scale_covering_every_token(family_dirs, family):
    teacher, _, _ = load_causal_lm(family_dirs(family))
    batch = calibration_batch(teacher.config.vocab_size)
    scales = {}
    for mode in ("all", "routed"):
        student = quantize(copy.deepcopy(teacher), QuantConfig(scheme="nvfp4", expert_calibration=mode))
        calibrate(student, [batch], QuantConfig(scheme="nvfp4", expert_calibration=mode))
        scales[mode] = {n: float(m.input_gscale) for n, m in quantized_modules(student).items() if ".experts." in n}
    for mode in scales:
        for layer in range(2):
            for leaf in ("gate_up_proj", "down_proj"):
                values = {v for n, v in scales[mode].items() if f".layers.{layer}." in n and n.endswith(leaf)}
                assert len(values) == 1, (mode, layer, leaf)
    assert all(scales["all"][n] >= scales["routed"][n] for n in scales["all"])


@pytest.mark.parametrize("family", MOE)
def test_experts_forward_is_transformers_eager_loop(family_dirs, family):
    from transformers import AutoModelForCausalLM

    model_dir = family_dirs(family)
    # transformers' default kernel here is grouped_mm (other rounding); ModelOpt calibrates with the eager loop
    fused = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager").eval()
    ours, _, _ = load_causal_lm(model_dir)
    assert isinstance(ours.model.layers[0].mlp.experts, Experts)
    ids = calibration_batch(ours.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, fused(ids).logits)


def compressed_tensors_weight(tensors: dict, name: str) -> torch.Tensor:
    """compressed-tensors' own reading of one linear: E2M1 codes x (weight_scale / weight_global_scale)."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    packed, scales = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
    codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    multiplier = scales.float() / tensors[f"{name}.weight_global_scale"].float()
    return (codes.unflatten(-1, (-1, 16)) * multiplier.unsqueeze(-1)).flatten(-2)


@pytest.mark.parametrize("family", ALL)
def test_vllm_target_loads_in_transformers_and_matches_the_student(family_dirs, family, tmp_path):
    """Dense families: transformers + compressed-tensors load the folder and give the student's logits. MoE:
    transformers (5.25) + compressed-tensors (0.20) load the experts without their global scales (2688x too
    large), so each expert is read with compressed-tensors' own unpacking and compared with the student."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model_dir = family_dirs(family)
    _, student, tokenizer, quant = student_of(model_dir, "nvfp4")
    out = write(student, tokenizer, model_dir, quant, "vllm", tmp_path / "vllm")
    tensors = load_file(out / "model.safetensors")
    assert {k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")} == hub_linears(student)
    reloaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    if family in MOE:
        family_entry = family_of(student.config)
        for name, module in quantized_modules(student).items():
            hubs = hub_names(family_entry, name)
            theirs = torch.cat([compressed_tensors_weight(tensors, hub) for hub in hubs])
            # compressed-tensors divides by the reciprocal global scale: a few ulps from our multiply
            torch.testing.assert_close(theirs, module.quantized_weight().detach(), rtol=1e-6, atol=0)
        fused = reloaded.model.layers[0].mlp.experts.gate_up_proj[0]
        ours = quantized_modules(student)["model.layers.0.mlp.experts.0.gate_up_proj"].quantized_weight().detach()
        assert (fused - ours).abs().max() > 1, "transformers now reads compressed-tensors experts: compare logits"
        return
    ids = calibration_batch(student.config.vocab_size)[0]
    ours = weight_only_logits(student, ids)
    with torch.no_grad():
        theirs = reloaded(ids[None]).logits[0]
    # compressed-tensors dequantizes through bf16 (scale / global_scale rounded to 8 mantissa bits)
    assert (ours - theirs).abs().max() < 2e-2 * ours.abs().max(), "compressed-tensors reload differs from the student"


@pytest.mark.parametrize("family", ALL)
def test_gguf_against_llama_cpp(family_dirs, family, llama_cpp_converter, tmp_path):
    """Byte parity with llama.cpp's converter run on ModelOpt's export where that converter handles the family;
    llama.cpp's logits against the student's weight-only forward where llama.cpp runs the family."""
    model_dir = family_dirs(family)
    _, student, tokenizer, quant = student_of(model_dir, "nvfp4")
    path = write(student, tokenizer, model_dir, quant, "llamacpp", tmp_path / "ours") / "model.gguf"
    reader = gguf.GGUFReader(path)
    quantized = {t.name for t in reader.tensors if t.tensor_type == NVFP4}
    expected = len({name for name in hub_linears(student) if ".experts." not in name})
    experts = {n for n in quantized if "_exps" in n}
    assert len(quantized - experts) == expected and (len(experts) == 6 if family in MOE else not experts)
    if family not in LLAMA_CPP_CONVERTER_FAILS:
        modelopt = modelopt_export(
            model_dir, tmp_path / "modelopt", "nvfp4", calibration_batch(student.config.vocab_size)
        )
        theirs = reference_gguf(llama_cpp_converter, modelopt, tmp_path / "theirs.gguf")
        assert assert_gguf_quantized_equal(path, theirs) == len(quantized)
    ids = calibration_batch(student.config.vocab_size)[0]
    theirs = READERS["llamacpp"].logits(path.parent, ids)
    if family in LLAMA_CPP_DROPS_FFN_SCALES:
        assert not torch.isfinite(theirs).all(), f"llama.cpp now runs NVFP4 {family}: move it to the checked families"
        return
    row = compare(READERS["llamacpp"], "llamacpp", theirs, student, ids)
    assert row.ok and row.top1_agreement > 0.8, row


@pytest.mark.parametrize("family", ALL)
def test_convert_runs_every_stage_and_verify_and_eval_read_it(family_dirs, family, tmp_path):
    """W4A4 with channel smoothing, the mse-act search, GPTQ and two QAD steps, all targets; then `verify`
    and `eval` on the output, and the report's coverage line."""
    model_dir, out = family_dirs(family), tmp_path / "out"
    args = [
        "convert",
        str(model_dir),
        "-o",
        str(out),
        "--scheme",
        "nvfp4",
        "--smooth-alpha",
        "0.5",
        "--scale-search",
        "mse-act",
        "--rounding",
        "gptq",
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
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["qad"]["steps"] == 2 and 0 < report["nvfp4_parameter_share"] < 1
    family_entry = family_of(json.loads((model_dir / "config.json").read_text()))
    routers = [n for n in report["high_precision_modules"] if family_entry.moe and n.endswith(".gate")]
    assert len(routers) == (2 if family in MOE else 0)
    trt = load_file(out / "modelopt" / "model.safetensors")
    vllm = load_file(out / "vllm" / "model.safetensors")
    hub = {k.removesuffix(".weight_scale_2") for k in trt if k.endswith(".weight_scale_2")}
    assert hub == {k.removesuffix(".weight_packed") for k in vllm if k.endswith(".weight_packed")}
    layer_weights = [
        k
        for k in trt
        if ".layers." in k and k.endswith(".weight") and trt[k].dim() == 2 and not any(k.startswith(r) for r in routers)
    ]
    assert all(trt[k].dtype == torch.uint8 for k in layer_weights), "a decoder linear left in high precision"
    result = CliRunner().invoke(cli, ["verify", str(out)])
    rows = result.output
    assert "modelopt" in rows and "vllm" in rows and "llamacpp" in rows, rows
    if family not in LLAMA_CPP_DROPS_FFN_SCALES:
        assert result.exit_code == 0, rows
    result = CliRunner().invoke(cli, ["eval", str(model_dir), str(out)])
    assert result.exit_code == 0 and "chat_kl" in result.output.replace(" ", "_").lower() or "KL" in result.output, (
        result.output
    )


def test_a_family_outside_the_table_fails_before_any_work(tmp_path, default_model_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=256))
    model.save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(tmp_path / "gpt2")
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "gpt2"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and time.monotonic() - started < 10
    assert "unsupported model architecture GPT2LMHeadModel" in result.output and "[calibrate]" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_gguf_target_refused_before_calibration_when_a_dimension_does_not_divide(family_dirs, tmp_path):
    """llama.cpp's NVFP4 blocks span 64 inputs: refuse in seconds, naming the linears, not at export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = family_dirs("qwen3")
    model = AutoModelForCausalLM.from_config(
        type(AutoModelForCausalLM.from_pretrained(source).config)(
            **{**json.loads((source / "config.json").read_text()), "intermediate_size": 272}
        )
    )
    model.save_pretrained(tmp_path / "odd")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "odd")
    result = CliRunner().invoke(
        cli, ["convert", str(tmp_path / "odd"), "-o", str(tmp_path / "out"), "--qad-steps", "0"]
    )
    assert result.exit_code == 2 and "down_proj (272)" in result.output and "[calibrate]" not in result.output
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(tmp_path / "odd"),
            "-o",
            str(tmp_path / "out"),
            "--qad-steps",
            "0",
            "--targets",
            "modelopt,vllm",
            "--no-eval",
            "--scheme",
            "nvfp4-a16",
        ],
    )
    assert result.exit_code == 0, result.output


def test_a_linear_neither_quantizable_nor_excluded_is_an_error(family_dirs, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(family_dirs("qwen3")),
            "-o",
            str(tmp_path / "out"),
            "--qad-steps",
            "0",
            "--exclude",
            "*.self_attn.k_proj",
        ],
    )
    assert result.exit_code == 2 and "fused group" in result.output


NATIVE = [f.name for f in FAMILIES if f.native]


def converted(family_dirs, family, tmp_path, *extra) -> Path:
    out = tmp_path / f"out-{family}"
    args = [
        "convert",
        str(family_dirs(family)),
        "-o",
        str(out),
        "--qad-steps",
        "0",
        "--scheme",
        "nvfp4-a16",
        "--targets",
        "modelopt",
        "--no-eval",
        *extra,
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("family", [n for n in ALL if family(n).native])
def test_native_engine_serves_the_student_as_transformers_generates(family_dirs, family, tmp_path):
    from nvfp4.converter.checkpoint import load_nvfp4_checkpoint
    from support.serve import check_parity

    model, tokenizer = load_nvfp4_checkpoint(converted(family_dirs, family, tmp_path) / "modelopt")
    prompts = [tokenizer.encode(t) for t in ["Hi", "A longer prompt " * 6, "x y z"]]
    check_parity(model, tokenizer, prompts, n=12, max_num_seqs=2, prefill_chunk=16)


@pytest.mark.parametrize("family", [n for n in ALL if not family(n).native])
def test_native_engine_refuses_a_family_it_cannot_run(family_dirs, family, tmp_path):
    out = converted(family_dirs, family, tmp_path)
    (out / "report.json").write_text(json.dumps({"source": str(family_dirs(family))}))
    result = CliRunner().invoke(cli, ["serve", str(out)])
    assert result.exit_code == 2 and "--engine" in result.output, result.output
    assert "the native engine does not run" in result.output


# transformers' GGUF reader (5.25) as the first stage of `convert model.gguf`: the families it reads back exactly,
# those it fails on (Qwen3 and Qwen3-MoE: it mis-sizes their tensors) and those it would silently drop tensors of
# (a Mixtral's experts under llama.cpp's `llama` architecture, Llama 3's rope_freqs), which convert refuses
GGUF_INPUT_EXACT = ("llama", "mistral", "qwen2", "phi3")
GGUF_INPUT_REFUSED = {
    "qwen3": "cannot read GGUF",
    "qwen3_moe": "cannot read GGUF",
    "mixtral": "GGUF reader read",
    "llama3_rope": "GGUF reader read",
}


@pytest.mark.parametrize("family", list(GGUF_INPUT_EXACT) + list(GGUF_INPUT_REFUSED))
def test_gguf_input(family_dirs, family, tmp_path, monkeypatch):
    """A GGUF of the family's BF16 model (our writer, nothing quantized) as convert's input."""
    from nvfp4.converter.models import resolve_model
    from nvfp4.errors import UserError

    monkeypatch.setenv("NVFP4_CACHE", str(tmp_path / "cache"))
    teacher, tokenizer, folder = load_causal_lm(family_dirs(family))
    (tmp_path / "gguf").mkdir()
    path = load_all_writers()["llamacpp"](QuantConfig(), torch.float32).write(
        teacher, tokenizer, folder, tmp_path / "gguf"
    )
    if family in GGUF_INPUT_REFUSED:
        with pytest.raises(UserError, match=GGUF_INPUT_REFUSED[family]):
            resolve_model(path)
        return
    model, _, _ = load_causal_lm(path)
    ids = calibration_batch(teacher.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, teacher(ids).logits, rtol=0, atol=0)
    out = converted(lambda _: path, family, tmp_path)
    assert (out / "modelopt" / "hf_quant_config.json").is_file()


def test_a_base_model_without_chat_template_calibrates_trains_and_serves_completions(family_dirs, tmp_path):
    """--calib-data self and --qad-data self sample the teacher's continuations of the prompts as plain text;
    chat needs a template, completions do not."""
    import shutil

    from nvfp4.serve.app import build_app
    from support.serve import LiveServer

    base = tmp_path / "base"
    shutil.copytree(family_dirs("qwen3"), base)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for template in base.glob("chat_template.*"):
        template.unlink()
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(base),
            "-o",
            str(out),
            "--scheme",
            "nvfp4",
            "--qad-steps",
            "1",
            "--qad-seq-len",
            "16",
            "--calib-tokens",
            "64",
            "--targets",
            "modelopt",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["qad"]["steps"] == 1 and report["accuracy"]["results"]["QAD"]["chat_kl"] >= 0
    from nvfp4.serve.native import NativeEngine
    from nvfp4.serve.native.loader import load_student

    engines = {"student": NativeEngine("student", lambda: load_student(out)[:2])}
    with LiveServer(build_app(engines)) as server:
        client = server.openai()
        text = client.completions.create(model="student", prompt="Once upon a time", max_tokens=4, temperature=0)
        assert text.choices[0].finish_reason in ("length", "stop")
        import openai

        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="student", messages=[{"role": "user", "content": "Hi"}])
