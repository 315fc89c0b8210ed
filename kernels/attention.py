"""Decode attention over a static KV cache as a torch custom op, torch.ops.nvfp4.decode_attention: one new token per
sequence, every sequence of a step in one call. A C kernel on CPU (kernels/cpu_ops.cpp); torch elsewhere, padded to
the longest sequence."""

import torch
from torch import Tensor

from nvfp4.kernels import cpu
from nvfp4.kernels.ops import register

_LIB = torch.library.Library("nvfp4", "FRAGMENT")
_LIB.define(
    "decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
    "Tensor positions, float scale) -> Tensor"
)


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, positions: Tensor, scale: float
) -> Tensor:
    """q [B, H, D], the new token's k, v [B, KVH, D]; caches [slots, KVH, max_len, D]. Writes k, v at
    (slots[b], positions[b]) and returns softmax(scale q K^T) V over positions 0..positions[b] -> [B, H, D]."""
    return torch.ops.nvfp4.decode_attention(q, k, v, k_cache, v_cache, slots, positions, scale)


def decode_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, positions: Tensor, scale: float
) -> Tensor:
    k_cache[slots, :, positions] = k
    v_cache[slots, :, positions] = v
    batch, heads, dim = q.shape
    kv_heads, length = k_cache.shape[1], int(positions.max()) + 1
    keys, values = k_cache[slots, :, :length], v_cache[slots, :, :length]  # [B, KVH, L, D]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = (grouped @ keys.transpose(-1, -2)).float() * scale  # [B, KVH, G, L]
    hidden = torch.arange(length, device=q.device)[None, :] > positions[:, None]  # [B, L]: beyond each sequence
    weights = scores.masked_fill(hidden[:, None, None, :], -float("inf")).softmax(-1).to(q.dtype)
    return (weights @ values).reshape(batch, heads, dim)


register(
    _LIB,
    "decode_attention",
    None if cpu.torch_ops() else decode_attention_torch,
    decode_attention_torch,
    lambda q, *rest: torch.empty_like(q),
)
