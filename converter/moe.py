"""Mixture-of-experts: transformers' fused 3-D experts held as one gate_up and one down linear per expert.

transformers (5+) keeps a MoE layer's experts as two 3-D parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]) that no Linear-walking stage sees. `unfuse_experts` swaps each such module for
`Experts`, a list of per-expert `nn.Linear` pairs, so quantization, calibration, the scale search,
GPTQ, QAD and the exports treat experts as the linears they are. An expert's gate and up stay one
linear: they share one global scale, as ModelOpt's export and the engines that fuse them need.

The forward is transformers' eager loop (experts in ascending order, the router's real top-k), so
outputs are the same numbers. With `calibrate_all` set, every expert also sees the tokens the router
did not send it (its output discarded), so calibration statistics cover experts the router rarely
picks, as llm-compressor does by default; the layer's output is unchanged.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ExpertMLP(nn.Module):
    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, act_fn):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:  # [n, H] -> [n, H]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class Experts(nn.ModuleList):
    """Experts as modules `experts.E.gate_up_proj` / `experts.E.down_proj`; called as transformers' fused
    experts module is: (hidden [N, H], top-k expert ids [N, k], top-k weights [N, k]) -> [N, H]."""

    def __init__(self, experts: Iterable[ExpertMLP]):
        super().__init__(experts)
        self.calibrate_all = False

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            routed = F.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)  # [E, k, N]
        for index, expert in enumerate(self):
            top_k_pos, token_idx = torch.where(routed[index])
            if self.calibrate_all:
                unrouted = torch.ones(hidden_states.shape[0], dtype=torch.bool, device=hidden_states.device)
                unrouted[token_idx] = False
                if bool(unrouted.any()):
                    with torch.no_grad():
                        expert(hidden_states[unrouted])  # for the calibration hooks only
            if token_idx.numel() == 0:
                continue
            current = expert(hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, current.to(out.dtype))
        return out


def _linear(weight: Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return linear


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.dim() == 3
        and hasattr(module, "act_fn")
    )


def unfuse_experts(model: nn.Module) -> int:
    """Swap every fused-experts module of `model` for `Experts` (same weights, copied per expert, then the
    3-D parameters freed); returns how many were swapped."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if not _is_fused_experts(module):
            continue
        if getattr(module, "has_bias", False) or hasattr(module, "gate_up_proj_bias"):
            raise NotImplementedError(f"{name}: experts with biases are not supported")
        experts = Experts(
            ExpertMLP(_linear(module.gate_up_proj[e]), _linear(module.down_proj[e]), module.act_fn)
            for e in range(module.gate_up_proj.shape[0])
        )
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, experts)
        swapped += 1
    return swapped


def experts_modules(model: nn.Module) -> list[Experts]:
    return [m for m in model.modules() if isinstance(m, Experts)]


class calibrating_all_experts:
    """Context: every expert of `model` sees every token (statistics only; outputs unchanged)."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.modules = experts_modules(model) if enabled else []

    def __enter__(self):
        for module in self.modules:
            module.calibrate_all = True
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            module.calibrate_all = False
