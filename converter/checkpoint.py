"""Read an NVFP4 checkpoint (OUT/modelopt, ModelOpt's unified format) into a model that keeps the
4-bit codes packed (`nvfp4.kernels.linear.NVFP4PackedLinear`). Safetensors only; nothing is unpickled."""

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from nvfp4.converter.families import family_of, internal_name
from nvfp4.converter.model_config import read_config
from nvfp4.converter.moe import unfuse_experts
from nvfp4.converter.quantize import set_module
from nvfp4.converter.shards import Checkpoint
from nvfp4.errors import UserError
from nvfp4.kernels.linear import NVFP4PackedLinear, PackedWeight


def materialise_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers a checkpoint does not hold (RoPE frequencies, Gemma's embedding scale) are left on the meta
    device: give them storage and let transformers' own initialisation compute them, every loaded tensor
    marked as initialised so that nothing else is touched."""
    non_persistent = dict(model.named_non_persistent_buffers())
    for key, buffer in non_persistent.items():
        module, _, leaf = key.rpartition(".")
        model.get_submodule(module)._buffers[leaf] = torch.empty_like(buffer, device="cpu")
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name not in non_persistent:
            tensor._is_hf_initialized = True
    model.initialize_weights()


def _merged(name: str, pieces: dict[int, PackedWeight]) -> PackedWeight:
    """An expert's gate and up (stored apart, as on the Hub) as the one packed linear we hold them in."""
    if len(pieces) == 1:
        return pieces[0]
    gate, up = pieces[0], pieces[1]
    if not torch.equal(gate.gscale, up.gscale) or not _same(gate.input_gscale, up.input_gscale):
        raise UserError(f"{name}: gate and up carry different global or input scales; engines fuse them and need one")
    return PackedWeight(
        torch.cat([gate.packed, up.packed]), torch.cat([gate.scales, up.scales]), gate.gscale, gate.input_gscale
    )


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _packed_weight(folder: Path, tensors: dict[str, Tensor], hub: str) -> PackedWeight:
    """A quantized linear's tensors, taken out of `tensors`."""
    missing = [f"{hub}.{leaf}" for leaf in ("weight", "weight_scale") if f"{hub}.{leaf}" not in tensors]
    if missing:
        raise UserError(f"{folder}: {hub}.weight_scale_2 is there but {missing[0]} is missing")
    return PackedWeight(
        packed=tensors.pop(f"{hub}.weight"),
        scales=tensors.pop(f"{hub}.weight_scale"),
        gscale=tensors.pop(f"{hub}.weight_scale_2").float(),
        input_gscale=tensors.pop(f"{hub}.input_scale", None),
    )


def _check_packed(folder: Path, model: nn.Module, name: str, weight: PackedWeight) -> None:
    """The packed tensors have the shapes and dtypes that the config's linear `name` needs."""
    linear = model.get_submodule(name) if _has_submodule(model, name) else None
    if not isinstance(linear, nn.Linear):
        raise UserError(f"{folder}: unexpected tensors: {name} is not a linear layer of the config's model")
    rows, columns = linear.out_features, linear.in_features
    expected = {
        "weight": (weight.packed, (rows, columns // 2), torch.uint8),
        "weight_scale": (weight.scales, (rows, columns // 16), torch.float8_e4m3fn),
    }
    for leaf, (tensor, shape, dtype) in expected.items():
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise UserError(
                f"{folder}: {name}.{leaf} is {tensor.dtype} {tuple(tensor.shape)}; the config's model "
                f"needs {dtype} {shape}"
            )
    if weight.gscale.numel() != 1 or weight.input_gscale is not None and weight.input_gscale.numel() != 1:
        raise UserError(f"{folder}: {name}'s weight_scale_2 and input_scale must be single values")


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _check_shapes(folder: Path, model: nn.Module, state: dict[str, Tensor]) -> None:
    """Every tensor has the shape that the config gives it (load_state_dict would raise a RuntimeError)."""
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise UserError(
                f"{folder}: {name} has shape {tuple(tensor.shape)}; the config's model needs "
                f"{tuple(expected[name].shape)}"
            )


def load_nvfp4_checkpoint(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with packed NVFP4 linears and the rest in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "hf_quant_config.json").is_file():
        raise UserError(f"not an NVFP4 checkpoint (no hf_quant_config.json): {folder}")
    quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    if quant.get("quant_algo") not in ("NVFP4", "W4A16_NVFP4"):
        raise UserError(f"{folder}: unsupported quant_algo {quant.get('quant_algo')!r}")
    read_config(folder)  # bounded and checked before transformers builds anything from it
    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    del config.quantization_config
    family = family_of(config)
    tensors = Checkpoint(folder).all()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_experts(model)
    pieces: dict[str, dict[int, PackedWeight]] = {}
    biases: dict[str, Tensor] = {}
    for key in [k for k in tensors if k.endswith(".weight_scale_2")]:
        hub = key.removesuffix(".weight_scale_2")
        name, part = internal_name(family, hub)
        pieces.setdefault(name, {})[part] = _packed_weight(folder, tensors, hub)
        if f"{hub}.bias" in tensors:
            biases[name] = tensors.pop(f"{hub}.bias")
    for name, parts in pieces.items():
        bias, weight = biases.get(name), _merged(name, parts)
        _check_packed(folder, model, name, weight)
        set_module(model, name, NVFP4PackedLinear(weight, None if bias is None else bias.to(dtype)))
    state = {}
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        state[f"{internal_name(family, module)[0]}.{leaf}"] = value.to(dtype) if value.is_floating_point() else value
    _check_shapes(folder, model, state)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise UserError(f"{folder}: unexpected tensors {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.get_input_embeddings().weight
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    missing = [k for k in missing if k.rpartition(".")[0] not in pieces]
    if missing:
        raise UserError(f"{folder}: missing tensors {missing[:3]}")
    materialise_non_persistent_buffers(model)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise UserError(f"{folder}: tensors not found in the checkpoint: {leftovers[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer
