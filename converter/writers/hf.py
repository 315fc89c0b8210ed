"""Hugging Face safetensors targets: ModelOpt's unified checkpoint (TensorRT-LLM, vLLM modelopt_fp4)
and compressed-tensors `nvfp4-pack-quantized` (vLLM, transformers)."""

import json
import shutil
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from nvfp4.converter.families import family_of, hub_names, hub_tensor_name
from nvfp4.converter.quantize import export_weights
from nvfp4.converter.writers.base import TOKENIZER_LOCK, Writer
from nvfp4.kernels import numerics
from nvfp4.kernels.linear import NVFP4FakeQuantLinear, PackedWeight

PRODUCER = {"name": "nvfp4", "version": "0.1.0"}
_QUANT_BUFFERS = ("weight_gscale", "block_scales", "input_gscale")
_SIDE_FILES = ("generation_config.json",)


def unquantized_tensors(student: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every tensor of the student except the quantized linears' weights and our quantizer buffers, under
    its name on the Hub. A tied lm_head is left out, as ModelOpt and transformers do."""
    family = family_of(student.config)
    quantized = {n for n, m in student.named_modules() if isinstance(m, NVFP4FakeQuantLinear)}
    tied = getattr(student.config, "tie_word_embeddings", False)
    tensors = {}
    for name, tensor in student.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in quantized and (leaf == "weight" or leaf in _QUANT_BUFFERS):
            continue
        if tied and name == "lm_head.weight":
            continue
        value = tensor.detach().to(dtype).contiguous() if tensor.is_floating_point() else tensor.contiguous()
        tensors[hub_tensor_name(family, name)] = value
    return tensors


def high_precision_modules(student: nn.Module, embeddings: bool = True) -> list[str]:
    """Hub names of the modules left in high precision: linears not quantized, MoE routers, and (ModelOpt's
    `exclude_modules` lists them too) embeddings."""
    family = family_of(student.config)
    # exactly nn.Embedding, as ModelOpt lists them: not subclasses such as Gemma's scaled embedding
    names = [n for n, m in student.named_modules() if isinstance(m, nn.Linear) or embeddings and type(m) is nn.Embedding]
    if family.moe is not None:
        names += [n for n, m in student.named_modules() if n.endswith(f".mlp.{family.moe.router}") and hasattr(m, "weight")]
    return sorted(hub for name in names for hub in hub_names(family, name))


def hub_packed_weights(student: nn.Module) -> dict[str, PackedWeight]:
    """`packed_weights(student)` under the Hub's module names: an expert's gate_up splits into its gate and
    up rows (one global and input scale for both, as ModelOpt's export writes them)."""
    family = family_of(student.config)
    out = {}
    for name, weight in packed_weights(student).items():
        hubs = hub_names(family, name)
        if len(hubs) == 1:
            out[hubs[0]] = weight
            continue
        rows = weight.packed.shape[0] // len(hubs)
        for part, hub in enumerate(hubs):  # copies: a checkpoint holds no two tensors in one storage
            piece = slice(part * rows, (part + 1) * rows)
            out[hub] = PackedWeight(weight.packed[piece].clone(), weight.scales[piece].clone(), weight.gscale.clone(),
                                    None if weight.input_gscale is None else weight.input_gscale.clone())
    return out


_EXPORTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, PackedWeight]]]" = weakref.WeakKeyDictionary()


def _fingerprint(student: nn.Module) -> tuple:
    """Changes whenever a quantized weight, block scale or input scale is replaced or edited in place."""
    state = []
    for name, module in student.named_modules():
        if isinstance(module, NVFP4FakeQuantLinear):
            tensors = (module.weight, module.weight_gscale, module.block_scales, module.input_gscale)
            state.append((name, module.quantize_input, *((None, None) if t is None else (t.data_ptr(), t._version) for t in tensors)))
    return tuple(state)


def packed_weights(student: nn.Module) -> dict[str, PackedWeight]:
    """`export_weights(student)`, computed once for all the targets written from the same student state."""
    key = _fingerprint(student)
    cached = _EXPORTS.get(student)
    if cached is None or cached[0] != key:
        cached = _EXPORTS[student] = (key, export_weights(student))
    return cached[1]


def _write_config(student: nn.Module, out: Path, dtype: torch.dtype, quantization_config: dict) -> None:
    config = student.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _copy_side_files(tokenizer, source_dir: Path, out: Path) -> None:
    with TOKENIZER_LOCK:
        tokenizer.save_pretrained(out)
    for name in _SIDE_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out / name)


class TRTLLMWriter(Writer, target="trtllm"):
    """ModelOpt unified HF checkpoint: weight u8 [out, in/2], weight_scale e4m3 [out, in/16],
    weight_scale_2 fp32 scalar, input_scale fp32 scalar (W4A4)."""

    def quantized_tensors(self, packed: dict[str, PackedWeight]) -> dict[str, Tensor]:
        tensors = {}
        for name, weight in packed.items():
            tensors[f"{name}.weight"] = weight.packed.contiguous()
            tensors[f"{name}.weight_scale"] = weight.scales.contiguous()
            tensors[f"{name}.weight_scale_2"] = weight.gscale.float().reshape(())
            if weight.input_gscale is not None:
                tensors[f"{name}.input_scale"] = weight.input_gscale.float().reshape(())
        return tensors

    def quantization(self, student: nn.Module) -> dict:
        return {
            "quant_algo": self.cfg.quant_algo,
            "kv_cache_quant_algo": None,
            "group_size": self.cfg.group_size,
            "exclude_modules": high_precision_modules(student),
        }

    def write(self, student: nn.Module, tokenizer, source_dir: Path, out: Path) -> Path:
        tensors = unquantized_tensors(student, self.dtype) | self.quantized_tensors(hub_packed_weights(student))
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        quantization = self.quantization(student)
        (out / "hf_quant_config.json").write_text(
            json.dumps({"producer": PRODUCER, "quantization": quantization}, indent=4) + "\n"
        )
        _write_config(student, out, self.dtype, self._config_json_quantization(quantization))
        _copy_side_files(tokenizer, source_dir, out)
        return out

    def _config_json_quantization(self, quantization: dict) -> dict:
        args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": self.cfg.group_size}
        group = {"weights": args, "targets": ["Linear"]}
        if self.cfg.quantize_activations:
            group = {"input_activations": args, **group}
        return {
            "config_groups": {"group_0": group},
            "ignore": quantization["exclude_modules"],
            "quant_algo": quantization["quant_algo"],
            "kv_cache_quant_algo": None,
            "producer": PRODUCER,
            "quant_method": "modelopt",
        }


def _reciprocal(gscale: Tensor) -> Tensor:  # s2 -> fp32 [1], compressed-tensors' 448 * 6 / amax
    amax = gscale.float().reshape(1) * (numerics.E2M1_MAX * numerics.E4M3_MAX)
    return numerics.reciprocal_global_scale(amax)


class VLLMWriter(Writer, target="vllm"):
    """compressed-tensors `nvfp4-pack-quantized`: weight_packed, weight_scale, and the reciprocal
    global scales weight_global_scale and input_global_scale, fp32 [1].

    They follow compressed-tensors' own rule, 448 * 6 / amax (`numerics.reciprocal_global_scale`),
    with amax recovered from the student's s2 as s2 * 448 * 6. The student's s2 is the one truth
    (QAD trained against it; a fused group's s2 comes from the group max), so every member of a
    group gets the same value, equal to what compressed-tensors derives from the group amax up to
    two ulps (exact unless s2 * 2688 does not round back to amax).
    """

    def quantized_tensors(self, packed: dict[str, PackedWeight]) -> dict[str, Tensor]:
        tensors = {}
        for name, weight in packed.items():
            tensors[f"{name}.weight_packed"] = weight.packed.contiguous()
            tensors[f"{name}.weight_scale"] = weight.scales.contiguous()
            tensors[f"{name}.weight_global_scale"] = _reciprocal(weight.gscale)
            if weight.input_gscale is not None:
                tensors[f"{name}.input_global_scale"] = _reciprocal(weight.input_gscale)
        return tensors

    def quantization_config(self, student: nn.Module) -> dict:
        args = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": self.cfg.group_size,
                "strategy": "tensor_group", "dynamic": False, "observer": "minmax"}
        group = {"targets": ["Linear"], "weights": args}
        if self.cfg.quantize_activations:
            group["input_activations"] = {**args, "dynamic": "local"}
        return {
            "quant_method": "compressed-tensors",
            "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": high_precision_modules(student, embeddings=False),
            "kv_cache_scheme": None,
            "producer": PRODUCER,
        }

    def write(self, student: nn.Module, tokenizer, source_dir: Path, out: Path) -> Path:
        tensors = unquantized_tensors(student, self.dtype) | self.quantized_tensors(hub_packed_weights(student))
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        _write_config(student, out, self.dtype, self.quantization_config(student))
        _copy_side_files(tokenizer, source_dir, out)
        return out
