"""Load what `nvfp4 serve OUT` serves: the packed NVFP4 student and its teacher."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nvfp4.converter.config import QuantConfig
from nvfp4.converter.layout import student_folder
from nvfp4.converter.quantize import export_weights, quantize, quantized_modules, set_module
from nvfp4.converter.report import FILE_NAME as REPORT
from nvfp4.converter.report import Report
from nvfp4.errors import UserError
from nvfp4.kernels.int8_blocks import exact_int8_blocks
from nvfp4.kernels.linear import (
    BF16HeldEmbedding,
    BF16HeldLinear,
    Int8BlockEmbedding,
    Int8BlockLinear,
    NVFP4PackedLinear,
)


def pack_model(model: nn.Module, cfg: QuantConfig | None = None) -> nn.Module:
    """Quantize in place and keep only packed weights (PTQ): what a student checkpoint holds."""
    quantize(model, cfg or QuantConfig())
    packed = export_weights(model)
    for name, module in quantized_modules(model).items():
        set_module(model, name, NVFP4PackedLinear(packed[name], module.bias))
    return model


def check_native(folder: Path, role: str) -> None:
    """Refuse, before anything loads, a model of a family the native engine does not run, naming what does."""
    from nvfp4.converter.families import engine_hint, family_of
    from nvfp4.converter.models import load_config

    family = family_of(load_config(folder))
    if not family.native:
        raise UserError(
            f"the native engine does not run {family.name} models (the {role}); serve with {engine_hint(family)}"
        )


def load_student(out: Path, device: str = "cpu"):
    """(model, tokenizer, name) from OUT/modelopt, the ModelOpt unified checkpoint, on `device` (cpu or cuda)."""
    folder = student_folder(out)
    if not (folder / "config.json").is_file():
        raise UserError(f"no student checkpoint at {folder} (run `nvfp4 convert ... -o {out}` first)")
    try:
        from nvfp4.converter.checkpoint import load_nvfp4_checkpoint
    except ImportError as error:
        raise UserError(f"this build cannot read NVFP4 checkpoints yet: {error}") from error
    model, tokenizer = load_nvfp4_checkpoint(folder, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    return _placed(model, device), tokenizer, _model_name(folder, Path(out).name + "-nvfp4")


def serves_teacher(teacher: str | None) -> bool:
    """`--teacher none` serves the student alone."""
    return teacher is None or teacher.lower() != "none"


def teacher_source(out: Path, teacher: str | None) -> str | None:
    """--teacher PATH wins; else report.json's `source` (null = the embedded default model)."""
    if teacher is not None:
        return teacher
    if not (Path(out) / REPORT).is_file():
        raise UserError(f"{Path(out) / REPORT} is missing: pass --teacher PATH (or --teacher none)")
    return Report.load(out).source


def report_facts(out: Path, teacher: str | None, target: str) -> dict[str, dict]:
    """alias -> the facts /v1/models shows for it, from OUT/report.json: the student's scheme, the bytes of
    the `target` checkpoint served and its held-out chat KL (the trained row, else the PTQ student's); the
    teacher's when it is the report's own source. Empty when there is no readable report."""
    try:
        report = Report.load(out)
    except UserError:
        return {}
    results = (report.accuracy or {}).get("results") or {}
    row = next((results[k] for k in ("QAD", "QAT", "NVFP4") if k in results), {})
    sizes = report.sizes_bytes
    student = {"scheme": report.scheme, "weight_bytes": sizes.get(target), "heldout_kl": row.get("chat_kl")}
    facts = {"student": {k: v for k, v in student.items() if v is not None}}
    if teacher is None:
        facts["teacher"] = {
            "scheme": "bf16",
            "heldout_kl": 0.0,
            **({"weight_bytes": sizes["bf16"]} if "bf16" in sizes else {}),
        }
    return facts


def load_teacher(source: str | None, device: str = "cpu"):
    """(model, tokenizer, name): fp32 on CPU (bf16 matmul is far slower there), bf16 on CUDA."""
    from nvfp4.converter.models import DEFAULT_MODEL_NAME, load_causal_lm

    model, tokenizer, folder = load_causal_lm(source, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    name = DEFAULT_MODEL_NAME if source is None else _model_name(Path(folder), Path(folder).name)
    return _placed(model, device), tokenizer, name


def _placed(model: nn.Module, device: str) -> nn.Module:
    """On CPU the vocabulary held compact (read by C GEMVs); on CUDA everything moved to the GPU as it is."""
    return hold_vocab_compact(model) if device == "cpu" else model.to(device)


def hold_vocab_compact(model: nn.Module) -> nn.Module:
    """Hold the vocabulary-sized embedding and head in fewer bytes where that loses nothing: as
    block-int8 codes (8.5 bits a value) when every value is bf16(int8 code x fp16 scale per 32), as
    from a GGUF Q8_0 source; else in bf16 when every value is a bf16 number, as from a BF16
    checkpoint. Either way the same fp32 results; the head is read by a C GEMV on CPU. Tied tensors
    stay one tensor. A no-op otherwise (fp32 values, or not on CPU)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    held: dict[int, tuple | None] = {}

    def compact(weight: torch.Tensor) -> tuple | None:
        """(embedding class, head class, their tensors), or None; once per distinct tensor, as one set of
        parameters that a tied embedding and head share."""
        if id(weight) not in held:
            held[id(weight)] = None
            if weight.dtype == torch.float32 and weight.device.type == "cpu":
                if (blocks := exact_int8_blocks(weight)) is not None:
                    held[id(weight)] = (
                        Int8BlockEmbedding,
                        Int8BlockLinear,
                        [nn.Parameter(t, requires_grad=False) for t in blocks],
                    )
                elif torch.equal((as_bf16 := weight.detach().bfloat16()).float(), weight):
                    held[id(weight)] = (BF16HeldEmbedding, BF16HeldLinear, [nn.Parameter(as_bf16, requires_grad=False)])
        return held[id(weight)]

    if isinstance(embed, nn.Embedding) and (form := compact(embed.weight)) is not None:
        model.set_input_embeddings(form[0](*form[2], padding_idx=embed.padding_idx))
    if isinstance(head, nn.Linear) and head.bias is None and (form := compact(head.weight)) is not None:
        model.set_output_embeddings(form[1](*form[2]))
    return model


def _model_name(folder: Path, fallback: str) -> str:
    try:
        name = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, json.JSONDecodeError):
        name = None
    return Path(name).name if name else fallback


class SharedTensors:
    """Holds each distinct unquantized tensor once across the models one server loads.

    The student's embeddings, norms and (tied) head are exported unchanged from the teacher (QAD
    trains only the quantized linears), so serving both keeps one copy: `adopt` swaps a model's
    parameters for bit-identical ones already held (same dtype, shape and bytes).
    """

    def __init__(self) -> None:
        self._held: dict[tuple, nn.Parameter] = {}
        self._lock = threading.Lock()

    def adopt(self, model: nn.Module) -> nn.Module:
        with self._lock:
            for module in model.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None:
                        module._parameters[name] = self._held.setdefault(_content_key(param), param)
        return model

    def loader(self, load: Callable[[], tuple]) -> Callable[[], tuple]:
        """Wrap an engine's loader ((model, tokenizer, ...) -> (model, tokenizer)) to adopt its model."""

        def adopted() -> tuple:
            model, tokenizer = load()[:2]
            return self.adopt(model), tokenizer

        return adopted


def _content_key(tensor: torch.Tensor) -> tuple:
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return tensor.dtype, tuple(tensor.shape), tensor.device.type, hashlib.blake2b(data, digest_size=32).digest()


def _storages(model: nn.Module) -> dict[tuple, int]:
    tensors = [*model.parameters(), *model.buffers()]
    return {(t.untyped_storage().data_ptr(), t.data_ptr()): t.numel() * t.element_size() for t in tensors}


def weight_bytes(model: nn.Module, beside: nn.Module | None = None) -> int:
    """Resident bytes of parameters and buffers (tied tensors counted once); with `beside`, only
    the bytes this model does not share with that one."""
    shared = _storages(beside) if beside is not None else {}
    return sum(size for key, size in _storages(model).items() if key not in shared)
