"""`nvfp4 verify OUT`: reload every exported target through a reader independent of ours and compare
its logits with the student's (the student = OUT/modelopt loaded by `nvfp4.converter.checkpoint`).

Readers form a small registry, `READERS[target] = Reader(fn, ...)` with `fn(folder, ids [T]) -> logits
[T, vocab]`, each registered once, here. Each reader imports its peer (ModelOpt, compressed-tensors,
llama-cpp-python: the `verify` extra) when it runs.

The rule. Each position's difference is max |theirs - ours| over the vocabulary, relative to max |ours|; a
target passes when the `positions` quantile of those is within its tolerance. Readers with the student's own
numerics (modelopt, vllm) compare every position against a fixed tolerance. A reader that rounds activations its
own way (llama.cpp's CPU kernels round every 4-bit matmul's input to Q8_0 blocks) is judged against what that
rounding alone does to the student: the tolerance is `ROUNDING_MARGIN` times the difference between the
student's forward and the same forward with its inputs rounded as the reader rounds them (at least `rel_tol`),
over 90% of the positions: a MoE router whose top-k is a near-tie picks other experts at a position or two,
and which positions depends on the CPU's summation order (AVX2 or AVX-512), not on the export. A broken
export (a scale, a nibble order, a permutation) moves every position far beyond either.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from nvfp4.converter.families import family_of, internal_name
from nvfp4.converter.layout import STUDENT, TARGETS, student_folder, target_folder
from nvfp4.converter.moe import unfuse_experts
from nvfp4.converter.shards import Checkpoint
from nvfp4.errors import UserError, require
from nvfp4.kernels.int8_blocks import q8_0_round
from nvfp4.kernels.linear import NVFP4FakeQuantLinear, NVFP4PackedLinear

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


ROUNDING_MARGIN = 3.0


@dataclass(frozen=True)
class Reader:
    logits: Callable[[Path, Tensor], Tensor]
    quantizes_activations: bool  # False: compare with the student's weight-only (A16) forward
    rel_tol: float  # the tolerance of the positions' relative difference (a floor, with `rounds_inputs`)
    rounds_inputs: Callable[[Tensor], Tensor] | None = None  # the reader's rounding of a 4-bit matmul's input
    positions: float = 1.0  # the quantile of the positions' differences that is checked


READERS: dict[str, Reader] = {}


def register_reader(
    target: str,
    quantizes_activations: bool = True,
    rel_tol: float = 1e-3,
    rounds_inputs: Callable[[Tensor], Tensor] | None = None,
    positions: float = 1.0,
):
    def decorate(fn: Callable[[Path, Tensor], Tensor]) -> Callable[[Path, Tensor], Tensor]:
        READERS[target] = Reader(fn, quantizes_activations, rel_tol, rounds_inputs, positions)
        return fn

    return decorate


def _config_without_quantization(folder: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _modelopt_qtensor():
    return require("verify", "modelopt.torch.quantization.qtensor").NVFP4QTensor


def _modelopt_activation_hook(input_scale: Tensor):
    NVFP4QTensor = _modelopt_qtensor()

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        q, scale, scale_2 = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=input_scale)
        return (q.dequantize(dtype=x.dtype, scale=scale, double_scale=scale_2, block_sizes={-1: 16}), *args[1:])

    return hook


@register_reader("modelopt", quantizes_activations=True, rel_tol=1e-3)
def modelopt_logits(folder: Path, ids: Tensor) -> Tensor:
    """ModelOpt's own NVFP4QTensor dequantizes the weights (and fake-quantizes W4A4 inputs); transformers loads
    the result as a plain checkpoint."""
    NVFP4QTensor = _modelopt_qtensor()
    tensors = Checkpoint(folder).all()
    input_scales = {}
    for key in [k for k in tensors if k.endswith(".weight_scale_2")]:
        name = key.removesuffix(".weight_scale_2")
        packed = tensors.pop(f"{name}.weight")
        qtensor = NVFP4QTensor(torch.Size((packed.shape[0], packed.shape[1] * 2)), torch.float32, packed)
        scale, scale_2 = tensors.pop(f"{name}.weight_scale"), tensors.pop(key)
        tensors[f"{name}.weight"] = qtensor.dequantize(scale=scale, double_scale=scale_2, block_sizes={-1: 16})
        if f"{name}.input_scale" in tensors:
            input_scales[name] = tensors.pop(f"{name}.input_scale")
    model = _plain_model(folder, tensors)
    family = family_of(model.config)
    for hub, input_scale in input_scales.items():  # an expert's gate and up share their input and its scale
        module = model.get_submodule(internal_name(family, hub)[0])
        if not module._forward_pre_hooks:
            module.register_forward_pre_hook(_modelopt_activation_hook(input_scale.float()))
    with torch.no_grad():
        return model.eval()(ids[None]).logits[0]


@register_reader("vllm", quantizes_activations=False, rel_tol=1e-2)
def vllm_logits(folder: Path, ids: Tensor) -> Tensor:
    """transformers + compressed-tensors decompress the checkpoint (activations run unquantized; its
    dequantization rounds scale / global_scale through bf16, hence the looser tolerance). For a MoE,
    transformers (5.25) + compressed-tensors (0.20) load the experts without their global scales, so every
    linear is decompressed with compressed-tensors' own FP4 unpacking and loaded as a plain checkpoint."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    require("verify", "compressed_tensors")
    if family_of(_config_without_quantization(folder)).moe is None:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)
        )
    else:
        model = _plain_model(folder, _compressed_tensors_dequantized(folder))
    with torch.no_grad():
        return model.eval()(ids[None]).logits[0]


def _compressed_tensors_dequantized(folder: Path) -> dict[str, Tensor]:
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    tensors = Checkpoint(folder).all()
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        packed, scales = tensors.pop(key), tensors.pop(f"{name}.weight_scale")
        codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
        multiplier = scales.float() / tensors.pop(f"{name}.weight_global_scale").float()
        tensors[f"{name}.weight"] = (codes.unflatten(-1, (-1, 16)) * multiplier.unsqueeze(-1)).flatten(-2)
        tensors.pop(f"{name}.input_global_scale", None)
    return tensors


def _plain_model(folder: Path, tensors: dict[str, Tensor]) -> nn.Module:
    """transformers' model of folder's config loaded from dequantized tensors (its name mapping fuses a MoE's
    per-expert tensors); the experts then held per expert (the same eager loop) so that they can be hooked."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as plain:
        _config_without_quantization(folder).save_pretrained(plain)
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, Path(plain) / "model.safetensors")
        model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    unfuse_experts(model)
    return model


@register_reader("llamacpp", quantizes_activations=False, rel_tol=0.05, rounds_inputs=q8_0_round, positions=0.9)
def llamacpp_logits(folder: Path, ids: Tensor, n_threads: int = 2) -> Tensor:
    """Logits llama.cpp computes for every position of `ids` from folder/model.gguf. Its CPU path has no 4-bit
    activations (it rounds them to Q8_0 blocks), so it is compared with the student's weight-only forward."""
    from nvfp4.converter.writers.gguf import FILE_NAME

    Llama = require("verify", "llama_cpp").Llama
    ids = [int(i) for i in ids.reshape(-1).tolist()]
    llm = Llama(
        model_path=str(Path(folder) / FILE_NAME),
        n_ctx=max(len(ids), 64),
        n_batch=max(len(ids), 64),
        logits_all=True,
        n_threads=n_threads,
        verbose=False,
    )
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()


@dataclass
class Row:
    target: str
    max_abs_diff: float
    rel_diff: float  # the checked quantile of the positions' relative differences
    top1_agreement: float
    rel_tol: float

    @property
    def ok(self) -> bool:
        return self.rel_diff <= self.rel_tol


def prompt_ids(tokenizer, prompt: str) -> Tensor:  # -> [T]
    from nvfp4.converter.calibration import chat_prompt_ids

    return torch.tensor(chat_prompt_ids(tokenizer, [prompt])[0])


def position_differences(theirs: Tensor, ours: Tensor) -> Tensor:
    """[T]: each position's max |theirs - ours| relative to max |ours| over all positions."""
    return (theirs.float() - ours.float()).abs().amax(-1) / ours.abs().max()


def student_logits(
    student: nn.Module, ids: Tensor, quantize_activations: bool, rounds_inputs: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """The student's logits [T, vocab]: W4A4 or weight-only, every quantized linear's input rounded by
    `rounds_inputs` when given."""
    modules = [m for m in student.modules() if isinstance(m, (NVFP4FakeQuantLinear, NVFP4PackedLinear))]
    saved = [m.input_gscale for m in modules]
    handles = (
        [m.register_forward_pre_hook(lambda _, args: (rounds_inputs(args[0]), *args[1:])) for m in modules]
        if rounds_inputs is not None
        else []
    )
    try:
        for module in modules:
            module.input_gscale = module.input_gscale if quantize_activations else None
        with torch.no_grad():
            return student(ids[None]).logits[0].float()
    finally:
        for module, scale in zip(modules, saved):
            module.input_gscale = scale
        for handle in handles:
            handle.remove()


def compare(
    reader: Reader, target: str, theirs: Tensor, student: nn.Module, ids: Tensor, rel_tol: float | None = None
) -> Row:
    """The rule (module docstring): the reader's logits against the student's, with the tolerance it earns."""
    ours = student_logits(student, ids, reader.quantizes_activations)
    if theirs.shape != ours.shape:
        raise UserError(f"{target}: logits of shape {tuple(theirs.shape)}, expected {tuple(ours.shape)}")
    differences = position_differences(theirs, ours)
    tol = reader.rel_tol
    if reader.rounds_inputs is not None:
        rounded = student_logits(student, ids, reader.quantizes_activations, reader.rounds_inputs)
        own = position_differences(rounded, ours).quantile(reader.positions).item()
        tol = max(tol, ROUNDING_MARGIN * own)
    top1 = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    diff = (theirs.float() - ours).abs().max().item()
    return Row(target, diff, differences.quantile(reader.positions).item(), top1, tol if rel_tol is None else rel_tol)


def present_targets(out: Path, readers: dict[str, Reader]) -> list[str]:
    if not out.is_dir():
        raise UserError(f"{out} is not a folder")
    if not (student_folder(out) / "hf_quant_config.json").is_file():
        raise UserError(f"{out} has no {STUDENT}/hf_quant_config.json: the student is read from OUT/{STUDENT}")
    from nvfp4.converter.writers import Writer, load_all_writers

    try:
        load_all_writers()
    except ImportError:  # an optional writer's dependency is missing; its folder is reported below
        pass
    exported = set(Writer.targets) | set(TARGETS)
    unreadable = sorted(t for t in exported - set(readers) if target_folder(out, t).is_dir())
    if unreadable:
        raise UserError(f"{out}: no reader for {', '.join(unreadable)} (known: {', '.join(sorted(readers))})")
    return [t for t in readers if target_folder(out, t).is_dir()]  # other folders (qad/, ...) are not exports


def verify(out: Path, prompt: str = DEFAULT_PROMPT, rel_tol: float | None = None) -> list[Row]:
    """One row per target present in `out`: logits of the independent reader against the student's."""
    from nvfp4.converter.checkpoint import load_nvfp4_checkpoint

    out = Path(out)
    targets = present_targets(out, READERS)
    student, tokenizer = load_nvfp4_checkpoint(student_folder(out))
    ids = prompt_ids(tokenizer, prompt)
    return [
        compare(READERS[t], t, READERS[t].logits(target_folder(out, t), ids).float(), student, ids, rel_tol)
        for t in targets
    ]


def render(rows: list[Row]) -> str:
    lines = [
        "| target | max abs logit diff | relative (positions quantile) | top-1 agreement | tolerance | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.target} | {r.max_abs_diff:.3e} | {r.rel_diff:.3e} | {r.top1_agreement:.3f} | "
            f"{r.rel_tol:.1e} | {'ok' if r.ok else 'FAIL'} |"
        )
    return "\n".join(lines)


def write_json(rows: list[Row], path: Path) -> None:
    path.write_text(json.dumps([{**r.__dict__, "ok": r.ok} for r in rows], indent=2))
