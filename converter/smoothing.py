"""SmoothQuant-style channel smoothing for W4A4, folded into the model's own tensors.

Each input channel j of a linear is divided by s_j and the linear's column j multiplied by s_j, with
s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha): the activations' outlier channels shrink and the
weights take part of their range. The division is folded into the op that produces the input, so the
model computes the same function and every engine loads it as a plain checkpoint:

- q/k/v and gate/up: the RMSNorm weight before them (one s per fused group: they share the input);
- down_proj: up_proj's output rows (silu(gate) * up is linear in up);
- o_proj: v_proj's output rows (attention mixes positions, not channels), one s per key/value head
  channel shared by the query heads that read it.

For W4A4 this lowers what the activations' rounding costs (docs/BENCHMARKS.md); the weights are then
quantized from the smoothed values.
"""

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from nvfp4.converter.quantize import run_calibration_forwards

log = logging.getLogger(__name__)


@torch.no_grad()
def input_channel_amax(model: nn.Module, batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """Per-input-channel max |x| of every decoder linear over the batches, keyed by module name."""
    amax: dict[str, Tensor] = {}

    def record(name: str):
        def hook(module, inputs):
            value = inputs[0].detach().abs().reshape(-1, module.in_features).amax(0).float()
            amax[name] = torch.maximum(amax[name], value) if name in amax else value

        return hook

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"}
    handles = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    try:
        run_calibration_forwards(model, linears.values(), batches)
    finally:
        for handle in handles:
            handle.remove()
    return amax


def smoothing_scales(input_amax: Tensor, weights: Iterable[Tensor], alpha: float) -> Tensor:
    """s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha) over the weights that read x, normalised to a
    geometric mean of 1 (NVFP4's global scales absorb any common factor)."""
    weight_amax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    return _balanced(input_amax, weight_amax, alpha)


def _balanced(input_amax: Tensor, weight_amax: Tensor, alpha: float) -> Tensor:
    scales = input_amax.clamp(min=1e-5) ** alpha / weight_amax.clamp(min=1e-5) ** (1 - alpha)
    return scales / scales.log().mean().exp()


def _scales_output(norm: nn.Module) -> bool:
    """Whether dividing the norm's weight by s divides its output by s (x * w norms: yes; (1 + w) norms: no)."""
    weight = getattr(norm, "weight", None)
    if weight is None or getattr(norm, "bias", None) is not None:
        return False
    generator = torch.Generator(weight.device).manual_seed(0)  # leaves the global RNG as it was
    x = torch.randn(2, weight.numel(), generator=generator, device=weight.device).to(weight.dtype)
    original = norm(x)
    with torch.no_grad():
        weight.mul_(2)
        doubled = norm(x)
        weight.div_(2)
    return torch.allclose(doubled, 2 * original, rtol=1e-3, atol=1e-5)


def _fold_into_norm(norm: nn.Module, linears: list[nn.Linear], scales: Tensor) -> None:
    norm.weight.div_(scales.to(norm.weight.dtype))
    for linear in linears:
        linear.weight.mul_(scales.to(linear.weight.dtype))


def _fold_into_rows(producer: nn.Linear, consumer: nn.Linear, row_scales: Tensor, column_scales: Tensor) -> None:
    producer.weight.div_(row_scales.to(producer.weight.dtype)[:, None])
    if producer.bias is not None:
        producer.bias.div_(row_scales.to(producer.bias.dtype))
    consumer.weight.mul_(column_scales.to(consumer.weight.dtype))


def _smooth_attention_output(attention: nn.Module, o_amax: Tensor, alpha: float, heads: int, kv_heads: int) -> None:
    """o_proj's input channel (query head h, d) is v_proj's row (kv head h // group, d): one scale per kv row."""
    group, head_dim = heads // kv_heads, o_amax.numel() // heads
    per_kv = lambda t: t.reshape(kv_heads, group, head_dim).amax(1).reshape(-1)  # noqa: E731
    weight_amax = per_kv(attention.o_proj.weight.detach().abs().amax(0).float())
    scales = _balanced(per_kv(o_amax), weight_amax, alpha)
    columns = scales.reshape(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim).reshape(-1)
    _fold_into_rows(attention.v_proj, attention.o_proj, scales, columns)


@torch.no_grad()
def smooth(model: nn.Module, batches: Iterable[Tensor], alpha: float) -> int:
    """Smooth every decoder layer of a Llama-family model in place (same function); returns how many
    linears' inputs were smoothed. Layers or parts of another shape are left as they are."""
    if not 0 < alpha < 1:
        raise ValueError(f"smoothing alpha must be in (0, 1), got {alpha}")
    amax = input_channel_amax(model, batches)
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    smoothed = 0
    for name, layer in model.named_modules():
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attention is None or mlp is None:
            continue
        # rows first: v_proj's and up_proj's scaled rows are then part of what their input's scales balance
        down, up = getattr(mlp, "down_proj", None), getattr(mlp, "up_proj", None)
        if down is not None and up is not None and f"{name}.mlp.down_proj" in amax:
            scales = smoothing_scales(amax[f"{name}.mlp.down_proj"], [down.weight], alpha)
            _fold_into_rows(up, down, scales, scales)
            smoothed += 1
        if all(hasattr(attention, leaf) for leaf in ("v_proj", "o_proj")) and f"{name}.self_attn.o_proj" in amax:
            _smooth_attention_output(attention, amax[f"{name}.self_attn.o_proj"], alpha, heads, kv_heads)
            smoothed += 1
        groups = ((getattr(layer, "input_layernorm", None), attention, ("q_proj", "k_proj", "v_proj")),
                  (getattr(layer, "post_attention_layernorm", None), mlp, ("gate_proj", "up_proj")))
        for norm, parent, leaves in groups:
            linears = [getattr(parent, leaf, None) for leaf in leaves]
            key = f"{name}.{'self_attn' if parent is attention else 'mlp'}.{leaves[0]}"
            if norm is None or None in linears or key not in amax or not _scales_output(norm):
                log.warning("not smoothing %s: no x * weight norm before %s", name, "/".join(leaves))
                continue
            _fold_into_norm(norm, linears, smoothing_scales(amax[key], [l.weight for l in linears], alpha))
            smoothed += len(linears)
    return smoothed
