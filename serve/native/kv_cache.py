"""Per-sequence KV cache slots, preallocated once (gpt-fast's static cache, one slot per running sequence)."""

import torch
from torch import Tensor


class KVCache:
    """k[layer], v[layer]: [num_slots, kv_heads, max_len, head_dim].

    Allocated with torch.empty: untouched pages are never made resident, so memory grows with use.
    """

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, max_len: int, head_dim: int, dtype=torch.float32,
                 device: torch.device | str = "cpu"):
        shape = (num_slots, kv_heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.lengths = [0] * num_slots  # positions written per slot

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    def allocate(self) -> int:
        slot = self.free_slots.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.free_slots.append(slot)

    def write(self, layer: int, slot: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [kv_heads, n, head_dim] at positions start.. -> views of the slot's keys/values so far."""
        end = start + k.shape[1]
        self.k[layer][slot, :, start:end] = k
        self.v[layer][slot, :, start:end] = v
        return self.k[layer][slot, :, :end], self.v[layer][slot, :, :end]

    def usage(self) -> float:
        return sum(self.lengths) / (self.num_slots * self.max_len)
