"""A small batched Llama-family forward (gpt-fast style) over the modules of a Hugging Face model.

Every sequence in a step contributes a chunk of new tokens (a whole prompt, part of one, or one
decode token). Decode tokens and prompt chunks take two functions: `decode` (one token for every running sequence;
every sequence's attention in one call against the static KV cache, torch.ops.nvfp4.decode_attention;
compilable with torch.compile) and `prefill` (prompt chunks, SDPA one chunk at a time). Each runs its
linears once on all its rows (a packed model's q/k/v and gate/up fused into one matrix each).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nvfp4.kernels.attention import decode_attention
from nvfp4.kernels.cpu import GEMV_MAX_BATCH
from nvfp4.kernels.linear import NVFP4PackedLinear, PackedWeight
from nvfp4.serve.native.kv_cache import KVCache

MATRIX_ROWS = GEMV_MAX_BATCH + 1  # prompt rows are padded to this, so that they always take the matrix path


@dataclass
class Chunk:
    slot: int
    token_ids: list[int]
    start: int  # position of token_ids[0]
    all_logits: bool = False  # logits for every position (prompt scoring), else only the last
    decode: bool = False  # one generated token (else a piece of a prompt); decode chunks come first in a step


@dataclass
class _Layer:
    attn_norm: nn.Module
    qkv: nn.Module  # q, k and v projections as one matrix
    q_norm: nn.Module | None  # Qwen3's per-head norms
    k_norm: nn.Module | None
    o_proj: nn.Module
    scaling: float
    mlp_norm: nn.Module
    gate_up: nn.Module  # gate and up projections as one matrix
    act: nn.Module
    down: nn.Module


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x [T, H, D], cos/sin [T, 1, D]
    return x * cos + _rotate_half(x) * sin


def _rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """A Llama-family RMSNorm module's result in one fused op: normalise in fp32, cast back, times the weight."""
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype) * norm.weight


def fuse_linears(modules: list[nn.Module]) -> nn.Module | None:
    """One packed linear computing the packed modules' outputs side by side (engines fuse q/k/v and gate/up the same
    way), or None when they cannot be one matrix. The modules' tensors become views of the fused ones: no extra
    memory. Plain linears stay apart: a teacher's weights may be held by SharedTensors too, and a fused copy would
    double them."""
    if not all(isinstance(m, NVFP4PackedLinear) for m in modules):
        return None
    first = modules[0]
    same = all(torch.equal(m.gscale, first.gscale) and (m.bias is None) == (first.bias is None) for m in modules)
    inputs = [m.input_gscale for m in modules]
    if not same or not (
        all(i is None for i in inputs) or all(i is not None and torch.equal(i, inputs[0]) for i in inputs)
    ):
        return None  # one global scale (and one input scale) per matrix: these were quantized apart
    weight = PackedWeight(
        torch.cat([m.packed for m in modules]), torch.cat([m.scales for m in modules]), first.gscale, first.input_gscale
    )
    fused = NVFP4PackedLinear(weight, None if first.bias is None else torch.cat([m.bias for m in modules]))
    _share_rows(modules, fused, ("packed", "scales", "bias"))
    return fused


def _share_rows(modules: list[nn.Module], fused: nn.Module, names: tuple[str, ...]) -> None:
    start = 0
    for module in modules:
        rows = module.out_features
        for name in names:
            if (whole := getattr(fused, name)) is not None:
                setattr(module, name, whole[start : start + rows])
        start += rows


class _Concatenated(nn.Module):
    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


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
        self.layers = [self._layer(layer) for layer in self.base.layers]

    @staticmethod
    def _layer(layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        return _Layer(
            layer.input_layernorm,
            fuse_linears(qkv) or _Concatenated(qkv),
            getattr(attn, "q_norm", None),
            getattr(attn, "k_norm", None),
            attn.o_proj,
            attn.scaling,
            layer.post_attention_layernorm,
            fuse_linears(gate_up) or _Concatenated(gate_up),
            mlp.act_fn,
            mlp.down_proj,
        )

    @staticmethod
    def kv_shape(hf_model: nn.Module) -> tuple[int, int, int]:
        config = hf_model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return config.num_hidden_layers, kv_heads, head_dim

    def compile(self) -> None:
        """Compile the decode step with torch.compile (one graph for any batch size; the custom ops stay calls)."""
        self.decode = torch.compile(self.decode, dynamic=True)

    @torch.no_grad()
    def forward(self, chunks: list[Chunk]) -> tuple[Tensor, list[slice]]:
        """-> (fp32 logits [rows, vocab], per chunk its rows: every position (all_logits) or the last one).
        Decode chunks (first) go through `decode`, prompt chunks through `prefill`."""
        decode_rows = sum(c.decode for c in chunks)
        assert all(c.decode for c in chunks[:decode_rows]), "decode chunks come first"
        parts, spans = [], [slice(i, i + 1) for i in range(decode_rows)]
        if decode_rows:
            device = self.cache.k[0].device
            columns = [
                [c.token_ids[0] for c in chunks[:decode_rows]],
                [c.start for c in chunks[:decode_rows]],
                [c.slot for c in chunks[:decode_rows]],
            ]
            parts.append(self.decode(*(torch.tensor(column, dtype=torch.long, device=device) for column in columns)))
        if decode_rows < len(chunks):
            logits, prompt_spans = self.prefill(chunks[decode_rows:])
            parts.append(logits)
            spans += [slice(span.start + decode_rows, span.stop + decode_rows) for span in prompt_spans]
        for chunk in chunks:
            self.cache.lengths[chunk.slot] = chunk.start + len(chunk.token_ids)
        return parts[0] if len(parts) == 1 else torch.cat(parts), spans

    def decode(self, tokens: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
        """One new token per sequence (tokens, positions, KV slots [B]) -> fp32 logits [B, vocab]; every sequence's
        attention in one call, every row computed the same whatever the batch."""
        hidden = self.base.embed_tokens(tokens)
        cos, sin = self._rope_tables(hidden, positions)
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, _rms_norm(layer.attn_norm, hidden), cos, sin, _apply)
            attended = decode_attention(
                q, k, v, self.cache.k[index], self.cache.v[index], slots, positions, layer.scaling
            )
            hidden = hidden + layer.o_proj(attended.reshape(len(tokens), -1))
            hidden = hidden + self._mlp(layer, _rms_norm(layer.mlp_norm, hidden), _apply)
        return self.hf.lm_head(_rms_norm(self.base.norm, hidden)).float()

    def prefill(self, chunks: list[Chunk]) -> tuple[Tensor, list[slice]]:
        """Prompt chunks (whole prompts or pieces) -> (fp32 logits, per chunk its rows); SDPA one chunk at a time,
        the linears once on every chunk's rows, padded to the matrix path."""
        device = self.cache.k[0].device
        tokens = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(c.start, c.start + len(c.token_ids)) for c in chunks]).to(device)
        hidden = self.base.embed_tokens(tokens)
        cos, sin = self._rope_tables(hidden, positions)
        masks = [
            None
            if c.start == 0
            else torch.ones(len(c.token_ids), c.start + len(c.token_ids), dtype=torch.bool, device=device).tril(c.start)
            for c in chunks
        ]  # query i sees 0..start+i
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, _rms_norm(layer.attn_norm, hidden), cos, sin, _as_matrix)
            outputs, row = [], 0
            for chunk, mask in zip(chunks, masks):
                rows = slice(row, row + len(chunk.token_ids))
                k_seen, v_seen = self.cache.write(
                    index, chunk.slot, chunk.start, k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                )
                attended = F.scaled_dot_product_attention(
                    q[rows].transpose(0, 1)[None],
                    k_seen[None],
                    v_seen[None],
                    attn_mask=mask,
                    is_causal=mask is None,
                    scale=layer.scaling,
                    enable_gqa=True,
                )
                outputs.append(attended[0].transpose(0, 1))
                row = rows.stop
            hidden = hidden + _as_matrix(layer.o_proj, torch.cat(outputs).reshape(len(tokens), -1))
            hidden = hidden + self._mlp(layer, _rms_norm(layer.mlp_norm, hidden), _as_matrix)
        return self._logits(hidden, chunks)

    def _rope_tables(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.base.rotary_emb(hidden[None], positions[None])
        return cos[0, :, None, :].to(hidden.dtype), sin[0, :, None, :].to(hidden.dtype)

    def _qkv(self, layer: _Layer, x: Tensor, cos: Tensor, sin: Tensor, apply) -> tuple[Tensor, Tensor, Tensor]:
        """-> q [T, H, D], k, v [T, KVH, D], RoPE applied to q and k."""
        H, KVH = self.heads, self.kv_heads
        qkv = apply(layer.qkv, x).view(len(x), H + 2 * KVH, self.head_dim)
        qk, v = qkv[:, : H + KVH], qkv[:, H + KVH :]
        if layer.q_norm is not None:
            qk = torch.cat([layer.q_norm(qk[:, :H]), layer.k_norm(qk[:, H:])], dim=1)
        qk = _rope(qk, cos, sin)
        return qk[:, :H], qk[:, H:], v

    @staticmethod
    def _mlp(layer: _Layer, x: Tensor, apply) -> Tensor:
        gate, up = apply(layer.gate_up, x).chunk(2, dim=-1)
        return apply(layer.down, layer.act(gate) * up)

    def _logits(self, hidden: Tensor, chunks: list[Chunk]) -> tuple[Tensor, list[slice]]:
        picked, spans, offset = [], [], 0
        for chunk in chunks:
            n = len(chunk.token_ids)
            wanted = range(offset, offset + n) if chunk.all_logits else range(offset + n - 1, offset + n)
            spans.append(slice(len(picked), len(picked) + len(wanted)))
            picked.extend(wanted)
            offset += n
        rows = hidden if len(picked) == len(hidden) else hidden[torch.tensor(picked, device=hidden.device)]
        return self.hf.lm_head(_rms_norm(self.base.norm, rows)).float(), spans


def _apply(module: nn.Module, x: Tensor) -> Tensor:
    return module(x)


def _as_matrix(fn, x: Tensor) -> Tensor:
    """fn (row by row: a linear) on prompt rows padded to MATRIX_ROWS: a packed weight's GEMV (decode rows) and its
    GEMM (prompt rows) round differently, and the padding keeps every prompt row on the GEMM whatever the step
    (so a decode row gets the same numbers alone or beside prompts, and greedy output equals a request's run alone
    for up to GEMV_MAX_BATCH decoding sequences)."""
    if len(x) >= MATRIX_ROWS:
        return fn(x)
    return fn(torch.cat([x, x.new_zeros(MATRIX_ROWS - len(x), x.shape[1])]))[: len(x)]
