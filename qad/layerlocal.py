"""Layer-local distillation: each decoder layer's quantized weights and block scales trained to reproduce
its teacher layer's output, one layer after another (as BRECQ, OmniQuant and AutoRound do for 4-bit weights).

A layer's student runs on the student's own inputs (the outputs of the layers already distilled, fake
quantization on), so each layer also corrects what the layers before it got wrong; its target is the
teacher layer's output on the teacher's inputs. The loss is each token's squared error relative to its
target's squared norm (`relative_error`). One step costs one layer's forward and backward on one sequence instead of the whole
model's, so many more steps fit a budget; and only one layer trains at a time, so it streams with the
layer-by-layer PTQ of models larger than memory (qad/stages.py `LayerQAD.train_layer`).
"""

import random
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from nvfp4.converter.layerwise import capture_layer_inputs, run_layer
from nvfp4.converter.quantize import quantized_modules
from nvfp4.qad.config import QADConfig


@dataclass
class LayerResult:
    steps: int
    first_loss: float
    last_loss: float


def train_layer(
    layer: nn.Module,
    inputs: list[Tensor],
    targets: list[Tensor],
    arguments: list[tuple],
    cfg: QADConfig,
    seconds: float | None,
    steps: int | None,
    seed: int = 0,
) -> LayerResult:
    """Train `layer`'s quantized linears (weights, and with cfg.scale_lr their block scales as logarithms) so
    that layer(input) matches target, one sequence a step, for `steps` or until `seconds` have passed; the
    learned scales then become its block scales. -> steps taken and the relative error before and after."""
    modules = list(quantized_modules(layer).values())
    weights = [m.weight for m in modules]
    scales = [m.learn_block_scales() for m in modules] if cfg.scale_lr > 0 else []
    for param in weights + scales:
        param.requires_grad_(True)
    # one LR per weight, relative to its RMS: the same step size for any family's weight magnitudes
    groups = [{"params": [w], "lr": cfg.layer_lr * w.detach().float().square().mean().sqrt().item()} for w in weights]
    groups += [{"params": scales, "lr": cfg.layer_scale_lr}] if scales else []
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99))
    order, rng = [], random.Random(seed)
    started, losses = time.monotonic(), []
    with torch.enable_grad():
        while (steps is None or len(losses) < steps) and (
            seconds is None or time.monotonic() - started < seconds or not losses
        ):
            if not order:
                order = rng.sample(range(len(inputs)), len(inputs))
            row = order.pop()
            args, kwargs = arguments[row]
            out = layer(inputs[row], *args, **kwargs)
            loss = relative_error(out, targets[row])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    for module in modules:
        module.fix_block_scales()
    for param in weights:
        param.requires_grad_(False)
        param.grad = None
    return LayerResult(len(losses), losses[0], _tail_mean(losses))


def relative_error(out: Tensor, target: Tensor) -> Tensor:
    """Each token's squared error over its target's squared norm, averaged over tokens: every token counts
    alike, as the next RMSNorm sees them (one token's massive activations would otherwise be the whole loss)."""
    target = target.float()
    return ((out.float() - target).square().sum(-1) / target.square().sum(-1).clamp(min=1e-12)).mean()


def _tail_mean(losses: list[float], tail: int = 8) -> float:
    return sum(losses[-tail:]) / len(losses[-tail:])


def distill_layers(
    student: nn.Module, teacher: nn.Module, sequences: list[Tensor], cfg: QADConfig, deadline: float | None
) -> dict:
    """Layer-local distillation of an in-memory student, first layer to last, on `sequences` (ids [1, T] each):
    the time left before `deadline` split evenly over the layers still to train (or cfg.steps steps a layer)."""
    inputs, arguments = capture_layer_inputs(teacher, sequences)
    student_inputs, results = inputs, []
    teacher_layers, student_layers = teacher.get_decoder().layers, student.get_decoder().layers
    bar = tqdm(total=len(student_layers), desc="QAD (layer by layer)", unit="layer")
    for index, (teacher_layer, student_layer) in enumerate(zip(teacher_layers, student_layers)):
        targets = run_layer(teacher_layer, inputs, arguments[index])
        seconds = None if deadline is None else max(0.0, (deadline - time.monotonic()) / (len(student_layers) - index))
        results.append(
            train_layer(
                student_layer,
                student_inputs,
                targets,
                arguments[index],
                cfg,
                seconds,
                cfg.steps if deadline is None else None,
                seed=cfg.seed + index,
            )
        )
        student_inputs, inputs = run_layer(student_layer, student_inputs, arguments[index]), targets
        bar.set_postfix({"error": f"{results[-1].first_loss:.4f} -> {results[-1].last_loss:.4f}"})
        bar.update(1)
    bar.close()
    student.requires_grad_(False)
    return summary(results)


def summary(results: list[LayerResult]) -> dict:
    return {
        "layers": len(results),
        "steps": sum(r.steps for r in results),
        "relative_error_before": [round(r.first_loss, 5) for r in results],
        "relative_error_after": [round(r.last_loss, 5) for r in results],
    }
