"""Per-sequence KV cache slots, preallocated once (gpt-fast's static cache, one slot per running sequence), and a pool
of prompt blocks kept across requests (prefix caching)."""

import hashlib
from array import array
from collections import OrderedDict

import torch
from torch import Tensor


class KVCache:
    """k[layer], v[layer]: [num_slots, kv_heads, max_len, head_dim].

    Allocated with torch.empty: untouched pages are never made resident, so memory grows with use.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype=torch.float32,
        device: torch.device | str = "cpu",
    ):
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


BLOCK_SIZE = 16  # tokens per prefix block (vLLM's default)


def block_hashes(token_ids: list[int], block_size: int = BLOCK_SIZE) -> list[bytes]:
    """One key per full block: sha256 over the previous block's key and this block's ids, so that a key names the
    whole prefix up to its block's end (sha256 rather than hash(): one client must not be able to forge a
    collision that hands it another's K/V)."""
    keys, previous = [], b""
    for end in range(block_size, len(token_ids) + 1, block_size):
        ids = token_ids[end - block_size : end]
        previous = hashlib.sha256(previous + array("q", ids).tobytes()).digest()
        keys.append(previous)
    return keys


class PrefixCache:
    """Full prompt blocks' K/V kept across requests (vLLM's automatic prefix caching over KVCache's slots).

    The slots are one contiguous slab each (the attention kernels read them so), so the blocks live in a pool of
    their own: a prefilled block is copied from its sequence's slot into the pool, and a later prompt that starts
    with the same blocks gets them copied into its slot at admission. A sequence never reads the pool after that
    copy, so any block may be evicted (least recently used first) and no copy-on-write is needed.
    """

    def __init__(self, cache: KVCache, num_blocks: int, block_size: int = BLOCK_SIZE):
        _, kv_heads, _, head_dim = cache.k[0].shape
        shape = (num_blocks, kv_heads, block_size, head_dim)
        self.k = [torch.empty(shape, dtype=t.dtype, device=t.device) for t in cache.k]
        self.v = [torch.empty(shape, dtype=t.dtype, device=t.device) for t in cache.v]
        self.cache, self.block_size = cache, block_size
        self.rows: OrderedDict[bytes, int] = OrderedDict()  # key -> pool row, least recently used first
        self.free_rows = list(range(num_blocks - 1, -1, -1))
        self.queries = self.hits = 0  # prompt tokens looked up / found (vLLM's counters)

    def load(self, slot: int, keys: list[bytes], prompt_len: int) -> int:
        """Copies the longest cached run of the prompt's leading blocks into the slot -> tokens copied. One prompt
        token at least is left to compute: its logits choose the first new token."""
        usable = keys[: (prompt_len - 1) // self.block_size]
        found = 0
        while found < len(usable) and usable[found] in self.rows:
            found += 1
        self.queries += prompt_len
        if not found:
            return 0
        rows = torch.tensor([self.rows[key] for key in usable[:found]], device=self.k[0].device)
        end = found * self.block_size
        for pool, slab in ((self.k, self.cache.k), (self.v, self.cache.v)):
            for layer, blocks in enumerate(pool):
                self._blocks_of(slab[layer], slot, found).copy_(blocks[rows].transpose(0, 1))
        self._touch(usable[:found])
        self.cache.lengths[slot] = end
        self.hits += end
        return end

    def store(self, slot: int, keys: list[bytes], computed: int) -> None:
        """Keeps the slot's full blocks below position `computed` that the pool lacks (evicting the least recently
        used blocks for them)."""
        done = keys[: min(computed // self.block_size, len(self.rows) + len(self.free_rows))]
        self._touch(done)  # the chain's cached blocks are the last to go while its new ones take rows
        new = [i for i, key in enumerate(done) if key not in self.rows]
        rows = [self._free_row() for _ in new]
        if rows:
            device = self.k[0].device
            index, sources = torch.tensor(rows, device=device), torch.tensor(new, device=device)
            for pool, slab in ((self.k, self.cache.k), (self.v, self.cache.v)):
                for layer, blocks in enumerate(pool):
                    blocks[index] = self._blocks_of(slab[layer], slot, len(done))[:, sources].transpose(0, 1)
            self.rows.update((done[i], row) for i, row in zip(new, rows))
        self._touch(done)

    def _blocks_of(self, slab: Tensor, slot: int, count: int) -> Tensor:
        """A view of the slot's first `count` blocks: [kv_heads, count, block_size, head_dim]."""
        heads, _, dim = slab.shape[1:]
        return slab[slot, :, : count * self.block_size].view(heads, count, self.block_size, dim)

    def _free_row(self) -> int:
        if self.free_rows:
            return self.free_rows.pop()
        _, row = self.rows.popitem(last=False)
        return row

    def _touch(self, keys: list[bytes]) -> None:
        """Most recent use for the chain, its first block last: eviction takes chains from their tails (a block
        past an evicted one can never be found)."""
        for key in reversed(keys):
            if key in self.rows:
                self.rows.move_to_end(key)
