"""Load what `nvfp4 serve OUT` serves: the packed NVFP4 student and its teacher."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from converter.config import QuantConfig
from converter.errors import UserError
from converter.quantize import export_weights, quantize, quantized_modules, set_module
from kernels.linear import NVFP4PackedLinear


def pack_model(model: nn.Module, cfg: QuantConfig | None = None) -> nn.Module:
    """Quantize in place and keep only packed weights (PTQ): what a student checkpoint holds.

    All packed linears share one dequantization workspace, so the CPU path never holds more than
    one layer's dequantized weight.
    """
    quantize(model, cfg or QuantConfig())
    packed, workspace = export_weights(model), {}
    for name, module in quantized_modules(model).items():
        set_module(model, name, NVFP4PackedLinear(packed[name], module.bias, workspace))
    return model


def load_student(out: Path):
    """(model, tokenizer, name) from OUT/trtllm, the ModelOpt unified checkpoint."""
    folder = Path(out) / "trtllm"
    if not (folder / "config.json").is_file():
        raise UserError(f"no student checkpoint at {folder} (run `nvfp4 convert ... -o {out}` first)")
    try:
        from converter.checkpoint import load_nvfp4_checkpoint
    except ImportError as error:
        raise UserError(f"this build cannot read NVFP4 checkpoints yet: {error}") from error
    model, tokenizer = load_nvfp4_checkpoint(folder)
    return model, tokenizer, _model_name(folder, Path(out).name + "-nvfp4")


def teacher_source(out: Path, teacher: str | None) -> str | None:
    """--teacher PATH wins; else report.json's `source` (null = the embedded default model)."""
    if teacher is not None:
        return teacher
    report = Path(out) / "report.json"
    if not report.is_file():
        raise UserError(f"{report} is missing: pass --teacher PATH (or --teacher none)")
    try:
        return json.loads(report.read_text()).get("source")
    except json.JSONDecodeError as error:
        raise UserError(f"unreadable {report}: {error}") from error


def load_teacher(source: str | None):
    """(model, tokenizer, name): fp32 on CPU (bf16 matmul is far slower there)."""
    from converter.models import DEFAULT_MODEL_NAME, load_causal_lm

    model, tokenizer, folder = load_causal_lm(source, dtype=torch.float32)
    return model, tokenizer, DEFAULT_MODEL_NAME if source is None else _model_name(Path(folder), Path(folder).name)


def _model_name(folder: Path, fallback: str) -> str:
    try:
        name = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, json.JSONDecodeError):
        name = None
    return Path(name).name if name else fallback


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.untyped_storage().data_ptr(), tensor.data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
