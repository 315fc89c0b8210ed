"""quantize(model, cfg): swap eligible nn.Linear for NVFP4 fake-quant modules, in place.

Fused groups (q/k/v, gate/up) get one shared global scale; W4A4 input scales come from
`calibrate`, which records input amax on the unquantized model (as ModelOpt's calibration does).
"""

import re
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from nvfp4.converter.config import FUSED_GROUPS, QuantConfig
from nvfp4.converter.moe import calibrating_all_experts
from nvfp4.errors import UserError
from nvfp4.kernels import numerics
from nvfp4.kernels.linear import NVFP4FakeQuantLinear, PackedWeight

def is_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear)


def eligible_linears(model: nn.Module, cfg: QuantConfig, filter_fn: Callable = is_linear, prefix: str = "") -> dict[str, nn.Linear]:
    """Linears that will be quantized: every one not excluded by cfg's patterns. A linear that is neither
    quantizable (in_features a multiple of 16) nor excluded is an error, never a silent high-precision
    leftover; so is a fused group (q/k/v, gate/up) excluded in part: engines fuse its matrices. Names are
    the model's own (`prefix` names `model` inside a larger one: one decoder layer)."""
    linears = {n: m for n, m in model.named_modules(prefix=prefix) if filter_fn(m, n)}
    chosen = {name: module for name, module in linears.items() if not cfg.is_excluded(name)}
    odd = [f"{name} (in_features {m.in_features})" for name, m in chosen.items() if m.in_features % cfg.group_size]
    if odd:
        raise UserError(f"cannot quantize {', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}: NVFP4 needs in_features "
                        f"a multiple of {cfg.group_size}; keep them in high precision with --exclude PATTERN")
    for group in fused_groups(linears):
        if any(n in chosen for n in group) and not all(n in chosen for n in group):
            raise UserError(f"--exclude takes part of the fused group {', '.join(group)}: engines fuse these "
                            "matrices, so exclude all of them or none")
    return chosen


def fused_groups(names: Iterable[str]) -> list[list[str]]:
    """Group sibling linears that engines fuse (q/k/v, gate/up); others are groups of one."""
    names = list(names)
    remaining, groups = set(names), []
    for name in names:
        if name not in remaining:
            continue
        parent, _, leaf = name.rpartition(".")
        members = [name]
        for group in FUSED_GROUPS:
            if leaf in group:
                siblings = [f"{parent}.{m}" if parent else m for m in group]
                members = [s for s in siblings if s in remaining]
        groups.append(members)
        remaining -= set(members)
    return groups


_EXPERT_LINEAR = re.compile(r"^(?P<experts>.+\.experts)\.\d+\.(?P<leaf>gate_up_proj|down_proj)$")


def input_scale_groups(names: Iterable[str]) -> list[list[str]]:
    """Linears that share one W4A4 input scale: a fused group (one input), and one projection of every
    expert of a layer (ModelOpt's export and the engines' fused MoE kernels take one input scale for all)."""
    by_experts: dict[tuple[str, str], list[str]] = {}
    others = []
    for name in names:
        match = _EXPERT_LINEAR.match(name)
        if match:
            by_experts.setdefault((match["experts"], match["leaf"]), []).append(name)
        else:
            others.append(name)
    return fused_groups(others) + list(by_experts.values())


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
            module = NVFP4FakeQuantLinear(linears[name], gscale, cfg.quantize_activations)
            module.gptq_rounding = cfg.rounding == "gptq"  # done by calibrate(), which has the inputs' Hessians
            set_module(model, name, module, prefix)
    if cfg.scale_search == "mse":
        from nvfp4.kernels.scale_search import search_block_scales

        for module in quantized_modules(model).values():
            module.block_scales = search_block_scales(module.weight, module.weight_gscale, "mse")
    for module in quantized_modules(model).values():  # mse-act searches in calibrate(), from the amax scales
        module.activation_weighted_search = cfg.scale_search == "mse-act"
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
def calibrate(model: nn.Module, batches: Iterable[Tensor], all_experts: bool = True) -> None:
    """Record each quantized linear's input statistics on the unquantized forward of the whole model and
    set what they decide (calibrate_modules). With `all_experts`, every expert of a MoE layer sees every
    calibration token (converter/moe.py)."""
    modules = {n: m for n, m in quantized_modules(model).items() if needs_calibration(m)}
    if not modules:
        return

    def forward() -> None:
        with calibrating_all_experts(model, all_experts):
            run_calibration_forwards(model, modules.values(), batches)

    calibrate_modules(modules, forward)


def needs_calibration(module: NVFP4FakeQuantLinear) -> bool:
    """Its inputs decide something: a W4A4 input scale, mse-act's channel energies or GPTQ's Hessian."""
    return module.quantize_input or _wants_act_stats(module) or _wants_gptq(module)


@torch.no_grad()
def calibrate_modules(modules: dict[str, NVFP4FakeQuantLinear], forward: Callable[[], object]) -> object:
    """Record each module's input amax while `forward()` runs with weight and activation quantization off
    (so the ranges are the original model's); set W4A4 input scales. Modules quantized with
    `scale_search="mse-act"` also get their per-input-channel E[x^2] recorded and their block scales
    re-searched with it; with `rounding="gptq"` the inputs' X^T X is recorded (once per fused group: its
    members share the input) and the weights are then GPTQ-rounded. The whole model at once (calibrate) or
    one decoder layer (converter/layerwise.py): the same numbers. -> what `forward()` returned."""
    modules = {n: m for n, m in modules.items() if needs_calibration(m)}
    if not modules:
        return forward()
    amax: dict[str, Tensor] = {}
    square_sum: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    hessian: dict[str, Tensor] = {}
    gptq_leads = {group[0] for group in _gptq_groups(modules)}

    last_input: list = [None, None]  # (tensor, its amax): q/k/v and gate/up receive one tensor in turn

    def input_amax(x: Tensor) -> Tensor:
        if last_input[0] is not x:
            low, high = torch.aminmax(x.detach())  # one pass, no |x| temporary; exact, as abs().amax()
            last_input[:] = x, torch.maximum(-low, high).float()
        return last_input[1]

    def record(name: str):
        def hook(module, inputs):
            value = input_amax(inputs[0])
            amax[name] = torch.maximum(amax[name], value) if name in amax else value
            if _wants_act_stats(module) or name in gptq_leads:
                x = inputs[0].detach().float().reshape(-1, module.in_features)
                rows[name] = rows.get(name, 0) + x.shape[0]
            if _wants_act_stats(module):
                square_sum[name] = square_sum.get(name, 0) + x.square().sum(0)
            if name in gptq_leads:
                hessian[name] = torch.addmm(hessian[name], x.T, x) if name in hessian else x.T @ x

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in modules.items()]
    saved = {n: (m.quantized_weight, m.quantize_input) for n, m in modules.items()}
    try:
        for module in modules.values():
            module.quantized_weight = lambda m=module: m.weight  # unquantized during calibration
            module.quantize_input = False
        result = forward()
    finally:
        last_input.clear()
        for handle in handles:
            handle.remove()
        for name, module in modules.items():
            del module.quantized_weight
            module.quantize_input = saved[name][1]
    for group in input_scale_groups(n for n, m in modules.items() if m.quantize_input):
        recorded = [amax[n] for n in group if n in amax]
        if not recorded:  # no calibration token reached these experts (--expert-calibration routed)
            raise UserError(f"no calibration token reached {group[0]} (and {len(group) - 1} more): calibrate with "
                            "more tokens or --expert-calibration all")
        shared = torch.stack(recorded).amax()
        for name in group:
            modules[name].input_gscale = numerics.activation_global_scale(shared).to(modules[name].weight.device)
    _search_with_activations({n: square_sum[n] / rows[n] for n in square_sum}, modules)
    _round_with_gptq({n: h / rows[n] for n, h in hessian.items()}, modules)
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


def _wants_act_stats(module: nn.Module) -> bool:
    return getattr(module, "activation_weighted_search", False)


def _wants_gptq(module: nn.Module) -> bool:
    return getattr(module, "gptq_rounding", False)


def _gptq_groups(modules: dict[str, nn.Module]) -> list[list[str]]:
    """The fused groups GPTQ rounds together; each group's lead holds the Hessian of their shared input."""
    return fused_groups(n for n, m in modules.items() if _wants_gptq(m))


def hessian_bytes(linears: dict[str, nn.Module]) -> int:
    """Bytes GPTQ holds for these linears: one fp32 K x K Hessian per fused group (its members share the input)."""
    return sum(4 * linears[group[0]].in_features ** 2 for group in fused_groups(linears))


@torch.no_grad()
def _round_with_gptq(hessians: dict[str, Tensor], modules: dict[str, NVFP4FakeQuantLinear]) -> None:
    """GPTQ-round every fused group whose lead has a Hessian; groups of one shape (the same linear in
    every layer) go through kernels.gptq together, one column loop for all of them."""
    from nvfp4.kernels.gptq import gptq_round

    by_shape: dict[tuple, list[list[str]]] = {}
    for group in _gptq_groups(modules):
        shape = (sum(modules[n].out_features for n in group), modules[group[0]].in_features)
        by_shape.setdefault(shape, []).append(group)
    for groups in tqdm(by_shape.values(), desc="GPTQ", unit="shape", leave=False, disable=not by_shape):
        members = [[modules[n] for n in group] for group in groups]
        weights = torch.stack([torch.cat([m.weight for m in group]) for group in members])
        fixed = members[0][0].block_scales is not None
        scales = torch.stack([torch.cat([m.block_scales for m in group]) for group in members]) if fixed else None
        latent = gptq_round(weights, torch.stack([hessians[group[0]] for group in groups]),
                            torch.stack([group[0].weight_gscale for group in members]), scales)
        for group, rounded in zip(members, latent):
            for module, part in zip(group, rounded.split([m.out_features for m in group])):
                module.weight.copy_(part.to(module.weight.dtype))


def _search_with_activations(mean_square: dict[str, Tensor], modules: dict[str, NVFP4FakeQuantLinear]) -> None:
    from nvfp4.kernels.scale_search import search_block_scales

    for name, stats in mean_square.items():
        module = modules[name]
        module.block_scales = search_block_scales(module.weight, module.weight_gscale, "mse-act", stats)


def export_weights(model: nn.Module) -> dict[str, PackedWeight]:
    """Packed bytes, scales and global scales of every quantized linear, keyed by module name."""
    return {name: module.export() for name, module in quantized_modules(model).items()}


def unquantized_linears(model: nn.Module) -> list[str]:
    """Linears left in high precision: what `exclude_modules` / `ignore` must name."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
