"""Hugging Face safetensors targets: ModelOpt's unified checkpoint (TensorRT-LLM, vLLM modelopt_fp4)
and compressed-tensors `nvfp4-pack-quantized` (vLLM, transformers).

Both write Hugging Face's shard layout (converter/shards.py) under the Hub's tensor names
(converter/families.py: a MoE expert's gate_up is written as its gate and up rows).
"""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from nvfp4.converter.families import Family, family_of, hub_names, hub_tensor_name
from nvfp4.converter.shards import ShardWriter, Spec
from nvfp4.converter.writers.base import TOKENIZER_LOCK, Entry, Writer
from nvfp4.kernels import numerics
from nvfp4.kernels.linear import PackedWeight

PRODUCER = {"name": "nvfp4", "version": "0.1.0"}
_SIDE_FILES = ("generation_config.json",)


def high_precision_modules(model: nn.Module, quantized: set[str], embeddings: bool = True) -> list[str]:
    """Hub names of the modules left in high precision: linears not quantized, MoE routers, and (ModelOpt's
    `exclude_modules` lists them too) embeddings."""
    family = family_of(model.config)
    # exactly nn.Embedding, as ModelOpt lists them: not subclasses such as Gemma's scaled embedding
    names = [
        n
        for n, m in model.named_modules()
        if n not in quantized and (isinstance(m, nn.Linear) or embeddings and type(m) is nn.Embedding)
    ]
    if family.moe is not None:
        names += [
            n for n, m in model.named_modules() if n.endswith(f".mlp.{family.moe.router}") and hasattr(m, "weight")
        ]
    return sorted(hub for name in names for hub in hub_names(family, name))


def hub_packed(family: Family, name: str, weight: PackedWeight) -> list[tuple[str, PackedWeight]]:
    """A quantized linear under its Hub name(s): an expert's gate_up as its gate and up rows (one global and
    input scale for both, as ModelOpt's export writes them; copies, as a checkpoint holds no shared storage)."""
    hubs = hub_names(family, name)
    if len(hubs) == 1:
        return [(hubs[0], weight)]
    rows = weight.packed.shape[0] // len(hubs)
    parts = []
    for part, hub in enumerate(hubs):
        piece = slice(part * rows, (part + 1) * rows)
        parts.append(
            (
                hub,
                PackedWeight(
                    weight.packed[piece].clone(),
                    weight.scales[piece].clone(),
                    weight.gscale.clone(),
                    None if weight.input_gscale is None else weight.input_gscale.clone(),
                ),
            )
        )
    return parts


def meta_value(entry: Entry) -> Tensor | PackedWeight:
    """A stand-in on the meta device with the entry's dtypes and shapes: writers lay their files out from it."""
    if not entry.packed:
        return torch.empty(entry.shape, dtype=entry.dtype, device="meta")
    rows, cols = entry.shape
    scalar = torch.empty((), dtype=torch.float32, device="meta")
    return PackedWeight(
        torch.empty(rows, cols // 2, dtype=torch.uint8, device="meta"),
        torch.empty(rows, cols // 16, dtype=torch.float8_e4m3fn, device="meta"),
        scalar,
        scalar if entry.input_scale else None,
    )


def _write_config(model: nn.Module, out: Path, dtype: torch.dtype, quantization_config: dict) -> None:
    config = model.config.to_dict()
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


class SafetensorsWriter(Writer, target=None):
    """What both safetensors targets share: the Hub's names, shards, config.json and the tokenizer."""

    def quantized_tensors(self, name: str, weight: PackedWeight) -> dict[str, Tensor]:
        raise NotImplementedError

    def quantization_config(self, model: nn.Module, quantized: set[str]) -> dict:
        raise NotImplementedError

    def tensors(self, entry: Entry, value: Tensor | PackedWeight) -> Iterator[tuple[str, Tensor]]:
        if not entry.packed:
            yield hub_tensor_name(self.family, entry.name), value.to(self.dtype) if value.is_floating_point() else value
            return
        for hub, weight in hub_packed(self.family, entry.name, value):
            yield from self.quantized_tensors(hub, weight).items()

    def begin(self, model: nn.Module, tokenizer, source_dir: Path, out: Path, stream: list[Entry]) -> None:
        self.family, self.out = family_of(model.config), Path(out)
        specs = [
            Spec(name, t.dtype, tuple(t.shape))
            for entry in stream
            for name, t in self.tensors(entry, meta_value(entry))
        ]
        self.shards = ShardWriter(self.out, specs)
        quantized = {entry.name for entry in stream if entry.packed}
        _write_config(model, self.out, self.dtype, self.quantization_config(model, quantized))
        _copy_side_files(tokenizer, source_dir, self.out)

    def add(self, entry: Entry, value: Tensor | PackedWeight) -> None:
        for name, tensor in self.tensors(entry, value):
            self.shards.write(name, tensor)

    def finish(self) -> Path:
        self.shards.close()
        return self.out


class ModelOptWriter(SafetensorsWriter, target="modelopt"):
    """ModelOpt unified HF checkpoint (what TensorRT-LLM, vLLM and SGLang load): weight u8 [out, in/2], weight_scale e4m3 [out, in/16],
    weight_scale_2 fp32 scalar, input_scale fp32 scalar (W4A4)."""

    def quantized_tensors(self, name: str, weight: PackedWeight) -> dict[str, Tensor]:
        tensors = {
            f"{name}.weight": weight.packed,
            f"{name}.weight_scale": weight.scales,
            f"{name}.weight_scale_2": weight.gscale.float().reshape(()),
        }
        if weight.input_gscale is not None:
            tensors[f"{name}.input_scale"] = weight.input_gscale.float().reshape(())
        return tensors

    def quantization(self, model: nn.Module, quantized: set[str]) -> dict:
        return {
            "quant_algo": self.cfg.quant_algo,
            "kv_cache_quant_algo": None,
            "group_size": self.cfg.group_size,
            "exclude_modules": high_precision_modules(model, quantized),
        }

    def quantization_config(self, model: nn.Module, quantized: set[str]) -> dict:
        quantization = self.quantization(model, quantized)
        (self.out / "hf_quant_config.json").write_text(
            json.dumps({"producer": PRODUCER, "quantization": quantization}, indent=4) + "\n"
        )
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


class VLLMWriter(SafetensorsWriter, target="vllm"):
    """compressed-tensors `nvfp4-pack-quantized`: weight_packed, weight_scale, and the reciprocal
    global scales weight_global_scale and input_global_scale, fp32 [1].

    They follow compressed-tensors' own rule, 448 * 6 / amax (`numerics.reciprocal_global_scale`),
    with amax recovered from the student's s2 as s2 * 448 * 6. The student's s2 is the one truth
    (QAD trained against it; a fused group's s2 comes from the group max), so every member of a
    group gets the same value, equal to what compressed-tensors derives from the group amax up to
    two ulps (exact unless s2 * 2688 does not round back to amax).
    """

    def quantized_tensors(self, name: str, weight: PackedWeight) -> dict[str, Tensor]:
        tensors = {
            f"{name}.weight_packed": weight.packed,
            f"{name}.weight_scale": weight.scales,
            f"{name}.weight_global_scale": _reciprocal(weight.gscale),
        }
        if weight.input_gscale is not None:
            tensors[f"{name}.input_global_scale"] = _reciprocal(weight.input_gscale)
        return tensors

    def quantization_config(self, model: nn.Module, quantized: set[str]) -> dict:
        args = {
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            "group_size": self.cfg.group_size,
            "strategy": "tensor_group",
            "dynamic": False,
            "observer": "minmax",
        }
        group = {"targets": ["Linear"], "weights": args}
        if self.cfg.quantize_activations:
            group["input_activations"] = {**args, "dynamic": "local"}
        return {
            "quant_method": "compressed-tensors",
            "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": high_precision_modules(model, quantized, embeddings=False),
            "kv_cache_scheme": None,
            "producer": PRODUCER,
        }
