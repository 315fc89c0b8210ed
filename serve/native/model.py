"""A small batched Llama-family forward (gpt-fast style) over the modules of a Hugging Face model.

Every sequence in a step contributes a chunk of new tokens (a whole prompt, part of one, or one
decode token). The linears run once on all chunks concatenated, so a packed NVFP4 weight is
dequantized once per step whatever the batch size; attention runs per sequence against its KV slot.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nvfp4.kernels.cpu import GEMV_MAX_BATCH
from nvfp4.serve.native.kv_cache import KVCache

MATRIX_ROWS = GEMV_MAX_BATCH + 1  # prompt rows are padded to this, so that they always take the matrix path


@dataclass
class Chunk:
    slot: int
    token_ids: list[int]
    start: int  # position of token_ids[0]
    all_logits: bool = False  # logits for every position (prompt scoring), else only the last
    decode: bool = False  # one generated token (else a piece of a prompt); decode chunks come first in a step


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x [T, H, D], cos/sin [T, 1, D]
    return x * cos + _rotate_half(x) * sin


class BatchedCausalLM:
    """Reads an HF Llama/Mistral/Qwen2/Qwen3 model's modules; never copies its weights."""

    def __init__(self, hf_model: nn.Module, cache: KVCache):
        self.hf = hf_model
        self.base = hf_model.model
        config = hf_model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.cache = cache
        self.vocab_size = config.vocab_size

    @staticmethod
    def kv_shape(hf_model: nn.Module) -> tuple[int, int, int]:
        config = hf_model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return config.num_hidden_layers, kv_heads, head_dim

    @torch.no_grad()  # not inference_mode: packed linears reuse one workspace buffer across callers
    def forward(self, chunks: list[Chunk]) -> list[Tensor]:
        """-> per chunk, fp32 logits [n, vocab] (all_logits) or [vocab] (last position)."""
        self.decode_rows = sum(c.decode for c in chunks)
        assert all(c.decode for c in chunks[: self.decode_rows]), "decode chunks come first"
        tokens = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
        positions = torch.cat([torch.arange(c.start, c.start + len(c.token_ids)) for c in chunks])
        hidden = self.base.embed_tokens(tokens)  # [T, hidden]
        cos, sin = self.base.rotary_emb(hidden[None], positions[None])
        cos, sin = cos[0, :, None, :].to(hidden.dtype), sin[0, :, None, :].to(hidden.dtype)
        for index, layer in enumerate(self.base.layers):
            hidden = hidden + self._attention(index, layer.self_attn, layer.input_layernorm(hidden), chunks, cos, sin)
            hidden = hidden + self._rowwise(layer.mlp, layer.post_attention_layernorm(hidden))
        for chunk in chunks:
            self.cache.lengths[chunk.slot] = chunk.start + len(chunk.token_ids)
        return self._logits(hidden, chunks)

    def _attention(self, index: int, attn: nn.Module, x: Tensor, chunks: list[Chunk], cos: Tensor, sin: Tensor) -> Tensor:
        T = x.shape[0]
        q = self._rowwise(attn.q_proj, x).view(T, -1, self.head_dim)
        k = self._rowwise(attn.k_proj, x).view(T, -1, self.head_dim)
        v = self._rowwise(attn.v_proj, x).view(T, -1, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        outputs, offset = [], 0
        for chunk in chunks:
            n = len(chunk.token_ids)
            keys, values = self.cache.write(
                index, chunk.slot, chunk.start, k[offset : offset + n].transpose(0, 1), v[offset : offset + n].transpose(0, 1)
            )
            query = q[offset : offset + n].transpose(0, 1)[None]  # [1, H, n, D]
            outputs.append(self._sdpa(query, keys[None], values[None], chunk.start, attn.scaling)[0].transpose(0, 1))
            offset += n
        return self._rowwise(attn.o_proj, torch.cat(outputs).reshape(T, -1))

    def _rowwise(self, fn, x: Tensor) -> Tensor:
        """fn (row by row: a linear, the MLP) on the decode rows and the prompt rows apart, the prompt rows padded
        to the matrix path: the packed GEMV (decode) and the GEMM (prompts) round differently, and a row must
        get the same numbers whatever step it shares (greedy output then equals a request's run alone, for up
        to GEMV_MAX_BATCH decoding sequences)."""
        decode, prompt = x[: self.decode_rows], x[self.decode_rows :]
        if not len(prompt):
            return fn(decode)
        padded = torch.cat([prompt, prompt.new_zeros(max(0, MATRIX_ROWS - len(prompt)), x.shape[1])])
        prompt_out = fn(padded)[: len(prompt)]
        return prompt_out if not len(decode) else torch.cat([fn(decode), prompt_out])

    @staticmethod
    def _sdpa(q: Tensor, k: Tensor, v: Tensor, start: int, scale: float) -> Tensor:
        n, total = q.shape[2], k.shape[2]
        if n == 1:  # decode: two small matmuls beat the CPU flash kernel's ~0.5 ms fixed cost
            heads, kv_heads = q.shape[1], k.shape[1]
            grouped = q.reshape(kv_heads, heads // kv_heads, q.shape[-1])  # [KVH, G, D]
            weights = torch.softmax((grouped @ k[0].transpose(1, 2)) * scale, dim=-1)  # [KVH, G, L]
            return (weights @ v[0]).reshape(1, heads, 1, -1)
        mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=start)  # query i sees keys 0..start+i
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    def _logits(self, hidden: Tensor, chunks: list[Chunk]) -> list[Tensor]:
        rows, offset = [], 0
        for chunk in chunks:
            n = len(chunk.token_ids)
            rows.append(torch.arange(offset, offset + n) if chunk.all_logits else torch.tensor([offset + n - 1]))
            offset += n
        selected = self.base.norm(hidden[torch.cat(rows)])
        logits = self.hf.lm_head(selected).float()
        out, offset = [], 0
        for chunk, index in zip(chunks, rows):
            part = logits[offset : offset + len(index)]
            out.append(part if chunk.all_logits else part[0])
            offset += len(index)
        return out
