"""The memory and disk plan of a convert, from config.json alone, before any weight is read.

What each stage holds at its peak, in bytes, against what the machine has: the whole-model path
(teacher and student in memory: QAD needs it), the layer-by-layer path (converter/layerwise.py: PTQ
of a model of any depth), QAD per device (under torchrun the decoder layers of student and teacher are
sharded over the ranks with FSDP2), and the disk the outputs and QAD's checkpoints take. `choose`
picks the path that fits, or refuses in one line saying what would fit.

The constants were fitted on measured peaks (docs/BENCHMARKS.md, "Models bigger than memory").
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nvfp4.converter.config import QuantConfig
from nvfp4.converter.stages import GPTQRounding, Requirements, needs_calibration_data
from nvfp4.errors import UserError

GIB = 2**30
RUNTIME_BYTES = int(0.45 * GIB)  # the interpreter, torch, transformers and the tokenizer (measured: 0.42)
LAYER_QAD_IN_MEMORY = (
    1.5  # layer-local QAD on the whole model in memory peaked at 1.48x PTQ's need (Llama-3.2-1B shapes)
)
HEADROOM = 0.9  # of what the machine reports available: a plan using more is refused
EVAL_TOKENS = 512  # the held-out prose, in samples of EVAL_SAMPLE tokens
EVAL_SAMPLE = 256
CALIBRATION_FORWARD_TOKENS = 4096  # calibration batches are stacked up to this many tokens per forward


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a model, read from its skeleton on the meta device."""

    params: int  # every parameter, a tied head once
    quantizable: int  # the linears' weights that NVFP4 will hold
    layers: int
    layer_params: int  # the largest decoder layer
    embedding: int
    head: int  # 0 when tied to the embedding
    hidden: int
    intermediate: int  # the widest MLP activation of a layer (a MoE layer: one expert's, times the experts used)
    vocab: int
    heads: int
    hessians: int  # GPTQ's Hessians of every layer, bytes
    layer_hessians: int  # of the largest layer

    @classmethod
    def of(cls, model: nn.Module, quantized: dict[str, nn.Linear]) -> "ModelShape":
        config = model.config
        decoder = model.get_decoder()
        params = sum(p.numel() for p in model.parameters())
        embedding = model.get_input_embeddings().weight.numel()
        head = model.get_output_embeddings()
        tied = head is None or head.weight is model.get_input_embeddings().weight
        experts_used = getattr(config, "num_experts_per_tok", None) or 1
        intermediate = (getattr(config, "moe_intermediate_size", None) or config.intermediate_size) * experts_used
        prefix = next(n for n, m in model.named_modules() if m is decoder.layers)
        per_layer = [
            GPTQRounding.hessian_bytes({n: m for n, m in quantized.items() if n.startswith(f"{prefix}.{i}.")})
            for i in range(len(decoder.layers))
        ]
        return cls(
            params=params,
            quantizable=sum(m.weight.numel() for m in quantized.values()),
            layers=len(decoder.layers),
            layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in decoder.layers),
            embedding=embedding,
            head=0 if tied else head.weight.numel(),
            hidden=config.hidden_size,
            intermediate=max(intermediate, config.intermediate_size),
            vocab=config.vocab_size,
            heads=config.num_attention_heads,
            hessians=GPTQRounding.hessian_bytes(quantized),
            layer_hessians=max(per_layer),
        )


@dataclass(frozen=True)
class Needs:
    """What the run asks for."""

    quant: QuantConfig
    targets: tuple[str, ...]
    calib_tokens: int
    training: Requirements | None = None  # a training stage's (converter/stages.py)
    world_size: int = 1
    device: str = "cpu"  # where training computes: its teacher runs in fp32 on the CPU, bf16 on CUDA
    evaluate: bool = True

    @property
    def qad(self) -> bool:
        """Training of the whole model in memory after PTQ."""
        return self.training is not None and self.training.whole_model

    @property
    def layer_qad(self) -> bool:
        """Layer-local training alone: the whole model in memory or streamed."""
        return self.training is not None and self.training.per_layer and not self.training.whole_model


def _activations(shape: ModelShape, tokens: int, seq_len: int = 256) -> int:
    """One layer's forward on `tokens` fp32 rows: hidden states in and out, q/k/v, the MLP's widest
    activations, and the attention scores of the sequences."""
    per_token = 4 * (6 * shape.hidden + 3 * shape.intermediate)
    scores = 4 * shape.heads * seq_len * tokens
    return tokens * per_token + scores


def ptq_whole(shape: ModelShape, needs: Needs) -> int:
    """Teacher and student in fp32, calibration activations, GPTQ's Hessians of every layer, the packed export,
    and the writers (in parallel threads) each holding a bf16 copy of the tensors left in high precision."""
    calibration = (
        _activations(shape, min(needs.calib_tokens, CALIBRATION_FORWARD_TOKENS))
        if needs_calibration_data(needs.quant)
        else 0
    )
    gptq = shape.hessians if needs.quant.rounding == "gptq" else 0
    writers = 2 * (shape.params - shape.quantizable) * len(needs.targets)
    evaluation = 3 * 4 * EVAL_SAMPLE * shape.vocab if needs.evaluate else 0
    need = RUNTIME_BYTES + 8 * shape.params + calibration + gptq + shape.quantizable * 9 // 16 + writers + evaluation
    return int(need * LAYER_QAD_IN_MEMORY) if needs.layer_qad else need


def ptq_layerwise(shape: ModelShape, needs: Needs) -> int:
    """The largest of three phases, each with the streams of calibration and evaluation hidden states (two
    calibration streams when smoothing): the embedding in fp32 while it gives the first layer its inputs (and
    its stored bf16 read beside it); one decoder layer in fp32 with its bf16 read, the fake-quantized copy of
    its widest linear, its packed export, the activations of one forward and its GPTQ Hessians; the head in
    fp32 with the held-out prose's logits."""
    streams = (
        4
        * shape.hidden
        * (
            (2 if needs.quant.smooth_alpha else 1) * needs.calib_tokens * needs_calibration_data(needs.quant)
            + (2 * EVAL_TOKENS if needs.evaluate else 0)
        )
    )
    forward_tokens = (
        min(needs.calib_tokens, CALIBRATION_FORWARD_TOKENS) if needs_calibration_data(needs.quant) else EVAL_SAMPLE
    )
    gptq = shape.layer_hessians if needs.quant.rounding == "gptq" else 0
    widest = 4 * shape.intermediate * shape.hidden
    start = 6 * shape.embedding
    layer = 6 * shape.layer_params + widest + shape.layer_params * 9 // 16 + _activations(shape, forward_tokens) + gptq
    head = shape.head or shape.embedding  # a tied head is read again for the evaluation
    end = 2 * shape.head + (4 * head + 3 * 4 * EVAL_SAMPLE * shape.vocab if needs.evaluate else 0)
    return RUNTIME_BYTES + streams + max(start, layer, end)


def qad_per_device(shape: ModelShape, needs: Needs) -> int:
    """Teacher (fp32 on CPU, bf16 on CUDA), the fp32 student, the trained weights' gradients and AdamW
    moments, sharded over the ranks; one rank's activations and a chunk of vocabulary logits."""
    teacher = (4 if needs.device == "cpu" else 2) * shape.params
    training = needs.training
    trained = training.state_bytes_per_weight * shape.quantizable
    states = (teacher + 4 * shape.params + trained) // needs.world_size
    tokens = training.batch * training.seq_len // needs.world_size
    activations = shape.layers * _activations(shape, tokens, training.seq_len) + 3 * 4 * 256 * shape.vocab
    return RUNTIME_BYTES + states + activations


def disk_bytes(shape: ModelShape, needs: Needs) -> dict[str, int]:
    """Per target: NVFP4 (0.5 + 1/16 bytes a value) and the rest in bf16; the training's checkpoints (two kept,
    each the trained weights and their optimizer state: about its state bytes per weight)."""
    per_target = shape.quantizable * 9 // 16 + 2 * (shape.params - shape.quantizable)
    sizes = {target: per_target for target in needs.targets}
    if needs.qad:
        sizes["QAD checkpoints"] = 2 * needs.training.state_bytes_per_weight * shape.quantizable
    return sizes


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the device (CUDA) or available RAM (Linux MemAvailable); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class Plan:
    shape: ModelShape
    needs: Needs
    memory: int | None  # available RAM (or device memory for QAD on CUDA)
    disk: int  # free bytes where OUT is written

    @property
    def stages(self) -> dict[str, int]:
        stages = {
            "PTQ, whole model": ptq_whole(self.shape, self.needs),
            "PTQ, layer by layer": ptq_layerwise(self.shape, self.needs),
        }
        if self.needs.qad:
            stages[f"QAD, per device ({self.needs.world_size} x {self.needs.device})"] = qad_per_device(
                self.shape, self.needs
            )
        return stages

    def fits(self, need: int) -> bool:
        return self.memory is None or need <= HEADROOM * self.memory

    def render(self) -> str:
        shape = self.shape
        lines = [
            f"memory plan: {shape.params / 1e9:.2f} B parameters ({shape.quantizable / 1e9:.2f} B in NVFP4), "
            f"{shape.layers} layers of up to {shape.layer_params / 1e6:.0f} M",
            f"  {'stage':<34}{'needs':>10}{'has':>10}",
        ]
        has = "?" if self.memory is None else f"{self.memory / GIB:.1f} GiB"
        for stage, need in self.stages.items():
            lines.append(f"  {stage:<34}{need / GIB:>6.1f} GiB{has:>10}{'' if self.fits(need) else '  (does not fit)'}")
        for target, need in disk_bytes(shape, self.needs).items():
            lines.append(f"  {'disk: ' + target:<34}{need / GIB:>6.1f} GiB")
        lines.append(f"  {'disk: all outputs':<34}{self.disk_needed / GIB:>6.1f} GiB{self.disk / GIB:>6.1f} GiB free")
        return "\n".join(lines)

    @property
    def disk_needed(self) -> int:
        return sum(disk_bytes(self.shape, self.needs).values())

    def choose(self, layerwise: bool) -> str:
        """-> "whole" or "layerwise" (memory first, then disk); a UserError naming what would fit when nothing does."""
        path = self._choose_qad(layerwise) if self.needs.qad else self._choose_ptq(layerwise)
        if self.disk_needed > self.disk:
            raise UserError(
                f"not enough disk space for the outputs: {self.disk / GIB:.1f} GiB free, "
                f"~{self.disk_needed / GIB:.1f} GiB needed (fewer --targets, or another -o)"
            )
        return path

    def _choose_ptq(self, layerwise: bool) -> str:
        whole, streamed = ptq_whole(self.shape, self.needs), ptq_layerwise(self.shape, self.needs)
        if not layerwise and self.fits(whole):
            return "whole"
        if self.fits(streamed):
            return "layerwise"
        raise UserError(
            f"even one layer at a time needs ~{streamed / GIB:.1f} GiB and {self.memory / GIB:.1f} GiB "
            "is available"
            + (" (--rounding nearest drops GPTQ's Hessians)" if self.needs.quant.rounding == "gptq" else "")
        )

    def _choose_qad(self, layerwise: bool) -> str:
        training = self.needs.training
        if layerwise:
            raise UserError(
                f"this {training.row} trains the whole model at once: --layerwise runs PTQ or "
                f"{training.streamed} (add {training.without}, or {training.streamed})"
            )
        need = qad_per_device(self.shape, self.needs)
        if self.fits(need) and self.fits(ptq_whole(self.shape, self.needs)):
            return "whole"
        ranks = next(
            (
                n
                for n in range(self.needs.world_size, 4097)
                if self.fits(qad_per_device(self.shape, _with(self.needs, world_size=n)))
            ),
            None,
        )
        hints = [f"{training.without} (PTQ, layer by layer)"]
        if ranks and self.needs.device == "cuda":
            hints.append(f"torchrun --nproc-per-node {ranks} (FSDP2 over {ranks} GPUs)")
        if training.batch > 1:
            hints.append(f"a smaller {training.batch_flag}")
        raise UserError(
            f"{training.row} needs ~{need / GIB:.1f} GiB per device and {self.memory / GIB:.1f} GiB is "
            f"available; what fits: {', or '.join(hints)}"
        )


def _with(needs: Needs, **changes) -> Needs:
    from dataclasses import replace

    return replace(needs, **changes)


def make_plan(model: nn.Module, quantized: dict[str, nn.Linear], needs: Needs, out_parent: Path) -> Plan:
    device = torch.device(needs.device if needs.qad else "cpu")
    return Plan(ModelShape.of(model, quantized), needs, available_memory(device), shutil.disk_usage(out_parent).free)


def skeleton(folder: Path) -> nn.Module:
    """The model of folder's config.json on the meta device (experts per expert, as every stage holds them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nvfp4.converter.model_config import read_config
    from nvfp4.converter.moe import unfuse_experts

    read_config(folder)  # bounded and checked before transformers builds anything from it
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unfuse_experts(model)
    return model
