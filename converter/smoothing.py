"""SmoothQuant-style channel smoothing for W4A4, folded into the model's own tensors.

Each input channel j of a linear is divided by s_j and the linear's column j multiplied by s_j, with
s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha): the activations' outlier channels shrink and the
weights take part of their range. The division is folded into the op that produces the input, so the
model computes the same function and every engine loads it as a plain checkpoint:

- q/k/v and gate/up (or Phi-3's fused qkv_proj / gate_up_proj, or a MoE layer's router and every
  expert's gate_up): the RMSNorm weight before them, (offset + weight) for Gemma's norms (one s per
  norm: its readers share the input);
- down_proj: up's output rows (act(gate) * up is linear in up), per expert in a MoE layer;
- o_proj: v's output rows (attention mixes positions, not channels), one s per key/value head
  channel shared by the query heads that read it.

For W4A4 this lowers what the activations' rounding costs (docs/BENCHMARKS.md); the weights are then
quantized from the smoothed values.
"""

import logging
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nvfp4.converter.families import Family, family_of
from nvfp4.converter.moe import Experts, calibrating_all_experts
from nvfp4.converter.quantize import run_calibration_forwards

log = logging.getLogger(__name__)


@torch.no_grad()
def input_channel_amax(model: nn.Module, batches: Iterable[Tensor], all_experts: bool = True) -> dict[str, Tensor]:
    """Per-input-channel max |x| of every decoder linear over the batches, keyed by module name (every expert
    of a MoE layer sees every token with `all_experts`)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"}
    with recording_channel_amax(linears) as amax, calibrating_all_experts(model, all_experts):
        run_calibration_forwards(model, linears.values(), batches)
    return amax


@contextmanager
def recording_channel_amax(linears: dict[str, nn.Module]):
    """Context yielding {name: per-input-channel max |x|}, filled by the forwards run inside it."""
    amax: dict[str, Tensor] = {}

    def record(name: str):
        def hook(module, inputs):
            value = inputs[0].detach().abs().reshape(-1, module.in_features).amax(0).float()
            amax[name] = torch.maximum(amax[name], value) if name in amax else value

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    try:
        yield amax
    finally:
        for handle in handles:
            handle.remove()


def smoothing_scales(input_amax: Tensor, weights: Iterable[Tensor], alpha: float) -> Tensor:
    """s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha) over the weights that read x, normalised to a
    geometric mean of 1 (NVFP4's global scales absorb any common factor)."""
    weight_amax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    return _balanced(input_amax, weight_amax, alpha)


def _balanced(input_amax: Tensor, weight_amax: Tensor, alpha: float) -> Tensor:
    scales = input_amax.clamp(min=1e-5) ** alpha / weight_amax.clamp(min=1e-5) ** (1 - alpha)
    return scales / scales.log().mean().exp()


def _scales_output(norm: nn.Module, offset: float) -> bool:
    """Whether dividing (offset + weight) by s divides the norm's output by s (x * w norms, Gemma's x * (1 + w))."""
    weight = getattr(norm, "weight", None)
    if weight is None or getattr(norm, "bias", None) is not None:
        return False
    generator = torch.Generator(weight.device).manual_seed(0)  # leaves the global RNG as it was
    x = torch.randn(2, weight.numel(), generator=generator, device=weight.device).to(weight.dtype)
    original, saved = norm(x), weight.detach().clone()
    with torch.no_grad():
        weight.copy_(2 * (saved + offset) - offset)
        doubled = norm(x)
        weight.copy_(saved)
    return torch.allclose(doubled, 2 * original, rtol=1e-3, atol=1e-5)


@dataclass
class Rows:
    """The output rows [start, stop) of a linear that produce a smoothed input (v in qkv_proj, up in gate_up)."""

    linear: nn.Linear
    start: int
    stop: int

    def divide(self, scales: Tensor) -> None:
        part = self.linear.weight[self.start : self.stop]
        part.div_(scales.to(part.dtype)[:, None])
        if self.linear.bias is not None:
            bias = self.linear.bias[self.start : self.stop]
            bias.div_(scales.to(bias.dtype))


def _fold_into_norm(norm: nn.Module, offset: float, readers: list[nn.Module], scales: Tensor) -> None:
    norm.weight.copy_((norm.weight + offset) / scales.to(norm.weight.dtype) - offset)
    for reader in readers:
        reader.weight.mul_(scales.to(reader.weight.dtype))


def _attention_parts(
    attention: nn.Module, heads: int, kv_heads: int, head_dim: int
) -> tuple[list[nn.Module], Rows] | None:
    """(the linears reading the attention's input, v's rows), for q/k/v or a fused qkv_proj."""
    if all(hasattr(attention, leaf) for leaf in ("q_proj", "k_proj", "v_proj")):
        v = attention.v_proj
        return [attention.q_proj, attention.k_proj, v], Rows(v, 0, v.out_features)
    if hasattr(attention, "qkv_proj"):
        qkv = attention.qkv_proj
        return [qkv], Rows(qkv, (heads + kv_heads) * head_dim, qkv.out_features)
    return None


def _mlp_parts(mlp: nn.Module, family: Family) -> tuple[list[nn.Module], list[tuple[Rows, nn.Linear]]] | None:
    """(the modules reading the MLP's input: linears, and a MoE layer's router; [(up's rows, their down_proj)])."""
    if family.moe is not None and isinstance(getattr(mlp, "experts", None), Experts):
        halves = [
            (Rows(e.gate_up_proj, e.gate_up_proj.out_features // 2, e.gate_up_proj.out_features), e.down_proj)
            for e in mlp.experts
        ]
        return [getattr(mlp, family.moe.router)] + [e.gate_up_proj for e in mlp.experts], halves
    if all(hasattr(mlp, leaf) for leaf in ("gate_proj", "up_proj", "down_proj")):
        return [mlp.gate_proj, mlp.up_proj], [(Rows(mlp.up_proj, 0, mlp.up_proj.out_features), mlp.down_proj)]
    if hasattr(mlp, "gate_up_proj") and hasattr(mlp, "down_proj"):
        fused = mlp.gate_up_proj
        return [fused], [(Rows(fused, fused.out_features // 2, fused.out_features), mlp.down_proj)]
    return None


@torch.no_grad()
def smooth(model: nn.Module, batches: Iterable[Tensor], alpha: float, all_experts: bool = True) -> int:
    """Smooth every decoder layer of a supported family in place (same function); returns how many linears'
    inputs were smoothed. A norm that cannot absorb the scales leaves its readers as they are (a warning)."""
    check_alpha(alpha)
    amax = input_channel_amax(model, batches, all_experts)
    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder.layers)
    return sum(
        smooth_layer(layer, f"{prefix}.{i}", amax, model.config, alpha) for i, layer in enumerate(decoder.layers)
    )


def check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"smoothing alpha must be in (0, 1), got {alpha}")


@torch.no_grad()
def smooth_layer(layer: nn.Module, name: str, amax: dict[str, Tensor], config, alpha: float) -> int:
    """Smooth one decoder layer (`name` its module name, `amax` the per-channel input ranges of its linears,
    from the unsmoothed model) in place; -> how many linears' inputs were smoothed."""
    family = family_of(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = {id(m): n for n, m in layer.named_modules(prefix=name)}
    attention, mlp = layer.self_attn, layer.mlp
    attention_parts = _attention_parts(attention, heads, kv_heads, head_dim)
    mlp_parts = _mlp_parts(mlp, family)
    smoothed = 0
    # rows first: v's and up's scaled rows are then part of what their input's scales balance
    for up_rows, down in mlp_parts[1] if mlp_parts else []:
        if names[id(down)] in amax:
            scales = smoothing_scales(amax[names[id(down)]], [down.weight], alpha)
            up_rows.divide(scales)
            down.weight.mul_(scales.to(down.weight.dtype))
            smoothed += 1
    if attention_parts and names[id(attention.o_proj)] in amax:
        _smooth_attention_output(
            attention_parts[1], attention.o_proj, amax[names[id(attention.o_proj)]], alpha, heads, kv_heads
        )
        smoothed += 1
    for norm, parts in (
        (getattr(layer, family.norms[0], None), attention_parts),
        (getattr(layer, family.norms[1], None), mlp_parts),
    ):
        readers = parts[0] if parts else []
        measured = [amax[names[id(r)]] for r in readers if names[id(r)] in amax]
        if norm is None or not measured or not _scales_output(norm, family.norm_offset):
            log.warning(
                "not smoothing %s: no x * weight norm before %s",
                name,
                "/".join(names[id(r)].rpartition(".")[2] for r in readers) or "its linears",
            )
            continue
        scales = smoothing_scales(torch.stack(measured).amax(0), [r.weight for r in readers], alpha)
        _fold_into_norm(norm, family.norm_offset, readers, scales)
        smoothed += sum(isinstance(r, nn.Linear) for r in readers)
    return smoothed


def _smooth_attention_output(
    v_rows: Rows, o_proj: nn.Linear, o_amax: Tensor, alpha: float, heads: int, kv_heads: int
) -> None:
    """o_proj's input channel (query head h, d) is v's row (kv head h // group, d): one scale per kv row."""
    group, head_dim = heads // kv_heads, o_amax.numel() // heads
    per_kv = lambda t: t.reshape(kv_heads, group, head_dim).amax(1).reshape(-1)  # noqa: E731
    weight_amax = per_kv(o_proj.weight.detach().abs().amax(0).float())
    scales = _balanced(per_kv(o_amax), weight_amax, alpha)
    columns = scales.reshape(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim).reshape(-1)
    v_rows.divide(scales)
    o_proj.weight.mul_(columns.to(o_proj.weight.dtype))
