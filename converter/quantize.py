"""quantize(model, cfg): swap eligible nn.Linear for NVFP4 fake-quant modules, in place; calibrate: run the
calibration forward for the stages that read inputs.

Fused groups (q/k/v, gate/up) get one shared global scale. What else decides the bytes (input scales, scale
searches, GPTQ) is a stage of converter/stages.py, fired from `quantize` and `calibrate_modules`.
"""

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from nvfp4.converter.config import QuantConfig
from nvfp4.converter.groups import fused_groups
from nvfp4.converter.moe import calibrating_all_experts
from nvfp4.converter.stages import calibration_needed, ptq_stages
from nvfp4.errors import UserError
from nvfp4.kernels import numerics
from nvfp4.kernels.linear import NVFP4FakeQuantLinear, PackedWeight, calibrating


def is_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear)


def eligible_linears(
    model: nn.Module, cfg: QuantConfig, filter_fn: Callable = is_linear, prefix: str = ""
) -> dict[str, nn.Linear]:
    """Linears that will be quantized: every one not excluded by cfg's patterns. A linear that is neither
    quantizable (in_features a multiple of 16) nor excluded is an error, never a silent high-precision
    leftover; so is a fused group (q/k/v, gate/up) excluded in part: engines fuse its matrices. Names are
    the model's own (`prefix` names `model` inside a larger one: one decoder layer)."""
    linears = {n: m for n, m in model.named_modules(prefix=prefix) if filter_fn(m, n)}
    chosen = {name: module for name, module in linears.items() if not cfg.is_excluded(name)}
    odd = [f"{name} (in_features {m.in_features})" for name, m in chosen.items() if m.in_features % cfg.group_size]
    if odd:
        raise UserError(
            f"cannot quantize {', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}: NVFP4 needs in_features "
            f"a multiple of {cfg.group_size}; keep them in high precision with --exclude PATTERN"
        )
    for group in fused_groups(linears):
        if any(n in chosen for n in group) and not all(n in chosen for n in group):
            raise UserError(
                f"--exclude takes part of the fused group {', '.join(group)}: engines fuse these "
                "matrices, so exclude all of them or none"
            )
    return chosen


def set_module(model: nn.Module, name: str, module: nn.Module, prefix: str = "") -> None:
    """Replace the submodule at dotted `name` (relative to `model`, or under `prefix` when given)."""
    if prefix:
        name = name.removeprefix(prefix + ".")
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


@torch.no_grad()
def quantize(model: nn.Module, cfg: QuantConfig, filter_fn: Callable = is_linear, prefix: str = "") -> nn.Module:
    """Replace every eligible linear with NVFP4FakeQuantLinear (in place); returns the model. `prefix`: the
    name `model` has inside a larger model (a decoder layer quantized on its own: the same result)."""
    linears = eligible_linears(model, cfg, filter_fn, prefix)
    for group in fused_groups(linears):
        gscale = numerics.shared_global_scale(linears[n].weight for n in group)
        for name in group:
            set_module(model, name, NVFP4FakeQuantLinear(linears[name], gscale, cfg.quantize_activations), prefix)
    modules = quantized_modules(model, prefix)
    for stage in ptq_stages(cfg):
        stage.after_quantize(modules)
    return model


def quantized_modules(model: nn.Module, prefix: str = "") -> dict[str, NVFP4FakeQuantLinear]:
    return {n: m for n, m in model.named_modules(prefix=prefix) if isinstance(m, NVFP4FakeQuantLinear)}


def _calibration_forward(model: nn.Module, modules: Iterable[nn.Module]) -> nn.Module:
    """The decoder alone when it holds every module to calibrate: the vocabulary head's
    [tokens, vocab] matmul (a fifth of the default model's forward) feeds no quantizer."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        return model
    inside = {id(m) for m in decoder.modules()}
    return decoder if all(id(m) in inside for m in modules) else model


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor], cfg: QuantConfig) -> None:
    """Run `cfg`'s calibration stages (calibrate_modules) on the unquantized forward of the whole model. With
    `cfg.expert_calibration` all, every expert of a MoE layer sees every calibration token (converter/moe.py)."""
    if not calibration_needed(cfg):
        return
    modules = quantized_modules(model)

    def forward() -> None:
        with calibrating_all_experts(model, cfg.expert_calibration == "all"):
            run_calibration_forwards(model, modules.values(), batches)

    calibrate_modules(modules, forward, cfg)


@torch.no_grad()
def calibrate_modules(
    modules: dict[str, NVFP4FakeQuantLinear], forward: Callable[[], object], cfg: QuantConfig
) -> object:
    """Show every calibration stage of `cfg` (converter/stages.py) each module's inputs while `forward()` runs
    with the modules computing as the original linears (so the ranges are the original model's), then let the
    stages set what the inputs decide. The whole model at once (calibrate) or one decoder layer
    (converter/layerwise.py): the same numbers. -> what `forward()` returned."""
    stages = [stage for stage in ptq_stages(cfg) if stage.observes]
    if not stages:
        return forward()
    for stage in stages:
        stage.begin_calibration(modules)

    def hook(name: str):
        def observe(module, inputs):
            for stage in stages:
                stage.observe(name, module, inputs[0])

        return observe

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with calibrating(modules.values()):
            result = forward()
    finally:
        for handle in handles:
            handle.remove()
    for stage in stages:
        stage.after_calibration(modules)
    return result


def run_calibration_forwards(model: nn.Module, modules: Iterable[nn.Module], batches: Iterable[Tensor]) -> None:
    """Forward the batches (stacked where they can be) through the smallest part of the model holding `modules`,
    for hooks on them to record."""
    forward = _calibration_forward(model, list(modules))
    device = next(model.parameters()).device
    for batch in _stacked(batches):
        forward(batch.to(device), use_cache=False)


def _stacked(batches: Iterable[Tensor], max_tokens: int = 4096) -> Iterable[Tensor]:
    """Consecutive batches of one sequence length stacked into one forward: fewer, larger matmuls
    (faster on CPU), the same rows, so the same ranges."""
    group: list[Tensor] = []
    for batch in batches:
        if group and (batch.shape[1:] != group[0].shape[1:] or sum(map(len, group)) * batch.shape[1] >= max_tokens):
            yield torch.cat(group)
            group = []
        group.append(batch)
    if group:
        yield torch.cat(group)


def export_weights(model: nn.Module) -> dict[str, PackedWeight]:
    """Packed bytes, scales and global scales of every quantized linear, keyed by module name."""
    return {name: module.export() for name, module in quantized_modules(model).items()}
