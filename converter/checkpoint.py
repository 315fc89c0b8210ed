"""Read an NVFP4 checkpoint (OUT/trtllm, ModelOpt's unified format) into a model that keeps the
4-bit codes packed (`nvfp4.kernels.linear.NVFP4PackedLinear`). Safetensors only; nothing is unpickled."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from nvfp4.errors import UserError
from nvfp4.converter.quantize import set_module
from nvfp4.kernels.linear import NVFP4PackedLinear, PackedWeight


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"no safetensors in {folder}")
    tensors = {}
    try:
        for file in files:
            with safe_open(file, "pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    except (SafetensorError, OSError) as error:
        raise UserError(f"corrupt checkpoint {folder}: {error}") from error
    return tensors


def _reinitialise_rotary(model: nn.Module) -> None:
    """Non-persistent RoPE buffers are not in the checkpoint: recompute them for real."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            fresh = type(module)(module.config)
            module.inv_freq = fresh.inv_freq
            module.original_inv_freq = fresh.original_inv_freq


def load_nvfp4_checkpoint(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with packed NVFP4 linears (shared dequantization workspace) and the rest in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "hf_quant_config.json").is_file():
        raise UserError(f"not an NVFP4 checkpoint (no hf_quant_config.json): {folder}")
    quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    if quant.get("quant_algo") not in ("NVFP4", "W4A16_NVFP4"):
        raise UserError(f"{folder}: unsupported quant_algo {quant.get('quant_algo')!r}")
    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    del config.quantization_config
    tensors = _read_tensors(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    workspace: dict = {}
    packed_modules = set()
    for key in [k for k in tensors if k.endswith(".weight_scale_2")]:
        name = key.removesuffix(".weight_scale_2")
        weight = PackedWeight(
            packed=tensors.pop(f"{name}.weight"),
            scales=tensors.pop(f"{name}.weight_scale"),
            gscale=tensors.pop(key).float(),
            input_gscale=tensors.pop(f"{name}.input_scale", None),
        )
        bias = tensors.pop(f"{name}.bias", None)
        set_module(model, name, NVFP4PackedLinear(weight, None if bias is None else bias.to(dtype), workspace))
        packed_modules.add(name)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise UserError(f"{folder}: unexpected tensors {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.get_input_embeddings().weight
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    missing = [k for k in missing if k.rpartition(".")[0] not in packed_modules]
    if missing:
        raise UserError(f"{folder}: missing tensors {missing[:3]}")
    _reinitialise_rotary(model)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise UserError(f"{folder}: tensors not found in the checkpoint: {leftovers[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer
