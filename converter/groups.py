"""Which quantized linears engines treat as one: fused groups (one weight global scale) and input-scale groups."""

import re
from collections.abc import Iterable

from nvfp4.converter.config import FUSED_GROUPS


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
