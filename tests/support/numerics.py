"""Numeric helpers: SQNR and its floors, GGUF Q8_0-sourced tensors, E2M1 rounding ties."""

import math

import numpy as np
import torch

# Error budgets (dB), seeded from torchao's NVFP4 floors and raised to measured-minus-margin.
FLOORS = {
    "nvfp4_weight_gaussian": 18.0,  # measured ~20.6 dB on N(0,1) weights
    "nvfp4_roundtrip_any": 8.0,
    "block_amax": 30.0,
}


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    noise = (ref - x).norm()
    return math.inf if noise == 0 else 20 * math.log10(ref.norm() / noise)


def q8_0_source(rows: int, cols: int, magnitude: float = 0.05, seed: int = 0) -> torch.Tensor:
    """What a BF16 checkpoint converted from a GGUF Q8_0 tensor holds: gguf-py's Q8_0 round trip, in bf16."""
    from gguf import GGMLQuantizationType, quants

    values = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * magnitude).numpy()
    values[0, :32] = 0.0  # an all-zero block
    values[1, :32] *= 1e-3  # a block of tiny values (small fp16 scale)
    roundtrip = quants.dequantize(quants.quantize(values, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.ascontiguousarray(roundtrip)).bfloat16()


def near_rounding_boundary(scaled: torch.Tensor) -> torch.Tensor:
    """Where a scaled value lies within a few float32 ulps of an E2M1 rounding boundary (a tie)."""
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    distance = (scaled.abs().unsqueeze(-1) - bounds).abs().amin(-1)
    return distance <= 4 * torch.finfo(torch.float32).eps * bounds.max()
