"""llama.cpp target: one GGUF file (`OUT/llamacpp/model.gguf`) holding NVFP4 tensors (ggml type 40).

The packed weights from `export_weights` are repacked, never requantized:
  GGUF NVFP4 block = 64 elements of a row in 36 bytes: 4 scale bytes (one per 16-group) then 32
  code bytes; byte j of a 16-group holds element j (low nibble) and element j+8 (high nibble).
  llama.cpp's value table is E2M1 doubled and its scale byte decodes as UE4M3 * 0.5, so the
  ModelOpt scale bytes are copied with only the (always clear) sign bit masked.
  The per-tensor s2 is a separate F32 [1] tensor `<base>.scale`; W4A4 adds `<base>.input_scale`.
Llama q/k rows are permuted the way llama.cpp's converter does (its RoPE is interleaved, HF's is
rotate-half); the permutation moves whole rows, so it applies to codes and block scales alike.
"""

import gc
import json
import logging
import math
import os
import re
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from nvfp4.converter.families import Family, family_of, hub_names
from nvfp4.converter.writers.base import TOKENIZER_LOCK, Entry, Writer
from nvfp4.errors import UserError
from nvfp4.kernels import numerics
from nvfp4.kernels.linear import PackedWeight

log = logging.getLogger(__name__)

GGUF_BLOCK = 64  # elements per NVFP4 block in GGUF (4 sub-blocks of 16)
GGUF_BLOCK_BYTES = 36
FILE_NAME = "model.gguf"


# BPE pre-tokenizers llama.cpp implements, keyed by the hash its converter computes (facts taken
# from llama.cpp's convert_hf_to_gguf: sha256 of str(token ids) of CHECK_TEXT).
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

_PLAIN_TYPES = {
    torch.bfloat16: gguf.GGMLQuantizationType.BF16,
    torch.float16: gguf.GGMLQuantizationType.F16,
    torch.float32: gguf.GGMLQuantizationType.F32,
}


# ---------------------------------------------------------------------------------------------
# numerics: layout only (values come from kernels/)


def permute_rows(x: Tensor, n_head: int) -> Tensor:  # [rows, ...] -> same shape
    """llama.cpp's LlamaModel.permute: per head, interleave the two rotate-half halves of the rows."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def to_gguf_nvfp4(packed: Tensor, scales: Tensor) -> np.ndarray:  # [N, K/2] u8, [N, K/16] e4m3 -> u8 [N, K/64*36]
    """Repack ModelOpt NVFP4 bytes into ggml's block_nvfp4 rows."""
    rows, k = packed.shape[0], packed.shape[1] * 2
    if k % GGUF_BLOCK:
        raise ValueError(f"GGUF NVFP4 rows need a multiple of {GGUF_BLOCK} elements, got {k}")
    codes = numerics.unpack_codes(packed.cpu()).reshape(rows, k // 16, 16)
    qs = codes[..., :8] | (codes[..., 8:] << 4)  # byte j: element j low, element j+8 high
    d = scales.cpu().view(torch.uint8) & 0x7F
    blocks = torch.cat([d.reshape(rows, k // GGUF_BLOCK, 4), qs.reshape(rows, k // GGUF_BLOCK, 32)], dim=-1)
    return blocks.reshape(rows, k // GGUF_BLOCK * GGUF_BLOCK_BYTES).numpy()


# ---------------------------------------------------------------------------------------------
# writer


class _BulkArrayGGUFWriter(gguf.GGUFWriter):
    """gguf.GGUFWriter that packs string and integer arrays (the vocabulary, its merges and token
    types: ~150k items on the default model) in bulk; the bytes are the same."""

    _INTEGERS = {
        gguf.GGUFValueType.INT32: "i4",
        gguf.GGUFValueType.UINT32: "u4",
        gguf.GGUFValueType.INT64: "i8",
        gguf.GGUFValueType.UINT64: "u8",
    }

    def _pack_val(self, val, vtype, add_vtype: bool, sub_type=None) -> bytes:
        if vtype != gguf.GGUFValueType.ARRAY or isinstance(val, bytes) or not val:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        kind = sub_type if sub_type is not None else gguf.GGUFValueType.get_type(val[0])
        order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        if kind == gguf.GGUFValueType.STRING and all(isinstance(v, str) for v in val):
            length = struct.Struct(order + "Q").pack
            body = b"".join(length(len(e)) + e for e in (v.encode("utf-8") for v in val))
        elif kind in self._INTEGERS and all(isinstance(v, int) and not isinstance(v, bool) for v in val):
            body = np.asarray(val, dtype=order + self._INTEGERS[kind]).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = struct.pack(order + "I", vtype) if add_vtype else b""
        return head + struct.pack(order + "IQ", kind, len(val)) + body


class GGUFWriter(Writer, target="llamacpp"):
    """Writes `out/model.gguf` for llama.cpp (general.file_type 39 = MOSTLY_NVFP4): the header and every
    tensor's description first (from the entries' shapes), then the tensors as the entries come."""

    def check(self, model: nn.Module, tokenizer, linears: dict[str, nn.Linear]) -> None:
        if self.dtype not in _PLAIN_TYPES:
            raise UserError(f"the GGUF writer stores unquantized tensors as bf16, fp16 or fp32, not {self.dtype}")
        family_of(model.config)
        check_tokenizer(tokenizer)
        odd = [f"{n} ({m.in_features})" for n, m in linears.items() if m.in_features % GGUF_BLOCK]
        if odd:
            raise UserError(
                f"llama.cpp's NVFP4 blocks span {GGUF_BLOCK} inputs, and {', '.join(odd[:3])}"
                f"{' ...' if len(odd) > 3 else ''} do not divide: drop llamacpp from --targets, or "
                "--exclude those linears"
            )

    def begin(self, model: nn.Module, tokenizer, source_dir: Path, out: Path, stream: list[Entry]) -> None:
        config = model.config
        self.check(model, tokenizer, {})
        self.path = Path(out) / FILE_NAME
        self.tmp_name = str(Path(out) / f".{FILE_NAME}.{os.getpid()}.tmp")  # not mkstemp: keep the umask's mode
        self.tensors = _Tensors(model, self.dtype)
        self.writer = _BulkArrayGGUFWriter(self.tmp_name, gguf.MODEL_ARCH_NAMES[_arch(self.tensors.family)])
        try:
            _add_hparams(self.writer, config, Path(source_dir).name)
            with TOKENIZER_LOCK:
                _add_tokenizer(self.writer, tokenizer, config)
            planner = _Tensors(model, self.dtype)
            planned = [t for entry in stream for t in planner.of(entry, None)] + planner.tail(planned=True)
            weight_only = sorted(t.name for t in planned if t.raw_dtype == NVFP4 and not t.input_scale)
            if weight_only:  # weight-only layers must not get 4-bit activations on backends that could
                self.writer.add_array("general.tensor_extra.name", weight_only)
                self.writer.add_array("general.tensor_extra.prec_a4", [False] * len(weight_only))
            for tensor in planned:
                self.writer.add_tensor_info(
                    tensor.name, tensor.shape, np.dtype(tensor.dtype), tensor.nbytes, raw_dtype=tensor.raw_dtype
                )
            self.writer.write_header_to_file()
            self.writer.write_kv_data_to_file()
            self.writer.write_ti_data_to_file()
        except BaseException:
            self._abandon()
            raise

    def add(self, entry: Entry, value: Tensor | PackedWeight) -> None:
        try:
            for tensor in self.tensors.of(entry, value):
                self.writer.write_tensor_data(tensor.array)
        except BaseException:
            self._abandon()
            raise

    def finish(self) -> Path:
        try:
            for tensor in self.tensors.tail(planned=False):
                self.writer.write_tensor_data(tensor.array)
            self.writer.close()
            os.replace(self.tmp_name, self.path)
        finally:
            self._abandon()
        return self.path

    def _abandon(self) -> None:
        self.writer.close()
        if os.path.exists(self.tmp_name):
            os.remove(self.tmp_name)


def _arch(family: Family) -> gguf.MODEL_ARCH:
    return getattr(gguf.MODEL_ARCH, family.gguf_arch)


def _rope(config) -> dict:
    """The (global attention's) RoPE parameters: transformers 5 nests them per layer type for Gemma 3."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hparams(writer: gguf.GGUFWriter, config, name: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_NVFP4)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    writer.add_rope_dimension_count(int(partial * _head_dim(config)))
    if getattr(config, "head_dim", None):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    _add_moe_hparams(writer, config)
    _add_attention_hparams(writer, config)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] not in ("default", "llama3"):  # llama3 is the rope_freqs tensor
        raise UserError(f"the GGUF writer does not support rope type {rope['rope_type']!r}")


def _add_moe_hparams(writer: gguf.GGUFWriter, config) -> None:
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def _add_attention_hparams(writer: gguf.GGUFWriter, config) -> None:
    """Sliding-window attention (Gemma 3, Phi-3), partial rotary (Phi-3) and logit soft-capping (Gemma)."""
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) and "sliding_attention" in layer_types:
        writer.add_sliding_window(config.sliding_window)
        swa_theta = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {}).get("rope_theta")
        if swa_theta is not None:
            writer.add_rope_freq_base_swa(float(swa_theta))
    elif config.model_type == "phi3":  # llama.cpp tells Phi-4 (no sliding window) by a window of 0
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
        writer.add_rope_scaling_orig_ctx_len(
            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        )
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def llama3_rope_factors(config) -> Tensor:  # -> fp32 [head_dim / 2]
    """Per-frequency divisors of Llama 3.1's RoPE scaling, which llama.cpp reads as `rope_freqs`."""
    rope, dim = _rope(config), _head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# tensors


NVFP4 = gguf.GGMLQuantizationType.NVFP4
_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<leaf>[^.]+)\.weight$")


@dataclass
class GGUFTensor:
    """One tensor of the file: its description, and (when written) its data."""

    name: str
    shape: tuple[int, ...]  # of the array as stored (bytes for NVFP4)
    dtype: type  # numpy dtype of the array
    raw_dtype: gguf.GGMLQuantizationType
    array: np.ndarray | None = None
    input_scale: bool = False  # an NVFP4 tensor whose inputs are quantized (W4A4)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class _Tensors:
    """The export stream as llama.cpp's tensors, in file order: `of(entry, value)` gives an entry's tensors
    (described only, when the value is None), each scale right after its weight. A MoE layer's experts are
    stacked into one 3-D tensor per projection (`ffn_gate_exps` ...), given once its last expert came."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.config, self.family, self.dtype = model.config, family_of(model.config), dtype
        self.names = gguf.get_tensor_name_map(_arch(self.family), self.config.num_hidden_layers)
        self.num_experts = getattr(self.config, "num_local_experts", None) or getattr(self.config, "num_experts", None)
        self.experts: dict[str, dict[int, PackedWeight | Tensor | None]] = {}  # merged Hub name -> expert -> value

    def gguf_name(self, hub: str) -> tuple[gguf.MODEL_TENSOR, str]:
        found = self.names.get_type_and_name(hub, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UserError(f"the GGUF writer cannot map tensor {hub} of {self.family.name}")
        return found

    def of(self, entry: Entry, value: Tensor | PackedWeight | None) -> list[GGUFTensor]:
        module, leaf = (entry.name, "weight") if entry.packed else entry.name.rpartition(".")[::2]
        hubs = [f"{hub}.{leaf}" for hub in hub_names(self.family, module)]
        rows = entry.shape[0] // len(hubs) if entry.shape else None
        tensors = []
        for part, hub in enumerate(hubs):
            piece = None if value is None else _rows(value, part * rows, (part + 1) * rows)
            expert = _EXPERT.match(hub)
            if expert is not None:
                merged = self.experts.setdefault(f"{expert['prefix']}.{expert['leaf']}.weight", {})
                merged[int(expert["expert"])] = piece
                if len(merged) == self.num_experts:
                    name = f"{expert['prefix']}.{expert['leaf']}.weight"
                    tensors += self._experts(name, entry, [merged[e] for e in sorted(merged)], (rows, entry.shape[1]))
                    del self.experts[name]
                continue
            kind, name = self.gguf_name(hub)
            heads = _permute_heads(self.config, module) if self.family.permute_qk else None
            if entry.packed:
                tensors += _nvfp4(name, piece, (rows, entry.shape[1]), heads, entry.input_scale)
                continue
            if piece is not None and heads is not None:
                piece = permute_rows(piece, heads)
            offset = self.family.norm_offset if len(entry.shape) == 1 and hub.endswith("norm.weight") else 0.0
            if piece is not None and offset:
                piece = piece.float() + offset  # llama.cpp multiplies by the stored (offset + weight)
            router = kind == gguf.MODEL_TENSOR.FFN_GATE_INP  # routers stay F32, as llama.cpp's converter writes them
            shape = (rows, *entry.shape[1:]) if entry.shape else ()
            tensors.append(_plain(name, piece, shape, torch.float32 if router else self.dtype))
        return tensors

    def _experts(self, hub: str, entry: Entry, values: list, shape: tuple[int, int]) -> list[GGUFTensor]:
        _, name = self.gguf_name(hub)
        if not entry.packed:
            return [_plain(name, None if values[0] is None else torch.stack(values), (len(values), *shape), self.dtype)]
        base, scales = name.removesuffix(".weight"), [("scale", lambda w: w.gscale)]
        stacked = None if values[0] is None else np.stack([to_gguf_nvfp4(w.packed, w.scales) for w in values])
        tensors = [
            GGUFTensor(
                name,
                (len(values), shape[0], shape[1] // GGUF_BLOCK * GGUF_BLOCK_BYTES),
                np.uint8,
                NVFP4,
                stacked,
                entry.input_scale,
            )
        ]
        if entry.input_scale:
            scales.append(("input_scale", lambda w: w.input_gscale))
        for suffix, scale in scales:
            array = None if values[0] is None else np.array([float(scale(w)) for w in values], dtype=np.float32)
            tensors.append(
                GGUFTensor(f"{base}.{suffix}", (len(values),), np.float32, gguf.GGMLQuantizationType.F32, array)
            )
        return tensors

    def tail(self, planned: bool) -> list[GGUFTensor]:
        """What follows the entries: Llama 3's RoPE frequency factors."""
        if _arch(self.family) != gguf.MODEL_ARCH.LLAMA or _rope(self.config)["rope_type"] != "llama3":
            return []
        factors = llama3_rope_factors(self.config)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return [
            GGUFTensor(
                name,
                tuple(factors.shape),
                np.float32,
                gguf.GGMLQuantizationType.F32,
                None if planned else factors.numpy(),
            )
        ]


def _rows(value: Tensor | PackedWeight, start: int, stop: int) -> Tensor | PackedWeight:
    if isinstance(value, PackedWeight):
        return PackedWeight(value.packed[start:stop], value.scales[start:stop], value.gscale, value.input_gscale)
    return value.detach()[start:stop] if value.dim() else value.detach()


def _nvfp4(
    name: str, weight: PackedWeight | None, shape: tuple[int, int], heads: int | None, input_scale: bool
) -> list[GGUFTensor]:
    """One quantized linear as NVFP4, its s2 as `<base>.scale` and (W4A4) its input scale as `<base>.input_scale`."""
    array = None
    if weight is not None:
        packed, scales = weight.packed, weight.scales
        if heads is not None:
            packed, scales = permute_rows(packed, heads), permute_rows(scales.view(torch.uint8), heads)
        array = to_gguf_nvfp4(packed, scales.view(torch.float8_e4m3fn))
    base = name.removesuffix(".weight")
    tensors = [
        GGUFTensor(name, (shape[0], shape[1] // GGUF_BLOCK * GGUF_BLOCK_BYTES), np.uint8, NVFP4, array, input_scale),
        _scalar(f"{base}.scale", None if weight is None else weight.gscale),
    ]
    if input_scale:
        tensors.append(_scalar(f"{base}.input_scale", None if weight is None else weight.input_gscale))
    return tensors


def _scalar(name: str, value: Tensor | None) -> GGUFTensor:  # -> F32 [1]
    array = None if value is None else value.detach().float().cpu().reshape(1).numpy()
    return GGUFTensor(name, (1,), np.float32, gguf.GGMLQuantizationType.F32, array)


def _plain(name: str, value: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> GGUFTensor:
    """A tensor kept in high precision: norms and biases (1-D) in F32, as llama.cpp's converter writes them."""
    dtype = torch.float32 if len(shape) <= 1 else dtype
    np_dtype = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}[dtype]
    array = None
    if value is not None:
        x = value.detach().cpu().to(dtype).contiguous()
        array = x.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else x.numpy()
    return GGUFTensor(name, tuple(shape), np_dtype, _PLAIN_TYPES[dtype], array)


def _permute_heads(config, module_name: str) -> int | None:
    if module_name.endswith("q_proj"):
        return config.num_attention_heads
    if module_name.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


# ---------------------------------------------------------------------------------------------
# tokenizer


def pre_tokenizer_name(tokenizer) -> str:
    """The name llama.cpp gives this BPE pre-tokenizer (hash of the ids of a fixed check text)."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        log.warning(
            "unknown BPE pre-tokenizer (hash %s): writing 'default'; llama.cpp may split text differently", digest
        )
        return "default"
    return name


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>") or token in ("<pad>", "<mask>")


def vocab_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (gaps are UNUSED pads)."""
    tokens: list = [None] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size:
            tokens[i] = token
    types = [gguf.TokenType.NORMAL] * vocab_size
    for i, added in tokenizer.added_tokens_decoder.items():
        if i >= vocab_size or tokens[i] is None:
            continue
        if not added.normalized:  # llama.cpp expects control / user tokens already normalized
            tokens[i] = tokenizer.decode(tokenizer.encode(tokens[i], add_special_tokens=False))
        special = added.special or _looks_special(tokens[i])
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    for i in [i for i, token in enumerate(tokens) if token is None]:
        tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    return tokens, types


def _adds_special(tokenizer) -> dict[str, bool]:
    """add_bos always (as llama.cpp's converter writes it), add_eos only when set (its default is off)."""
    ids = tokenizer("a")["input_ids"]
    adds = {"bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]}
    if tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]:
        adds["eos"] = True
    return adds


def check_tokenizer(tokenizer) -> None:
    """The GGUF writer describes byte-level BPE (GPT-2 style) vocabularies to llama.cpp, nothing else."""
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise UserError("the GGUF writer needs a fast (tokenizer.json) tokenizer; drop llamacpp from --targets")
    backend = tokenizer.backend_tokenizer
    if type(backend.model).__name__ != "BPE" or getattr(backend.model, "byte_fallback", False):
        raise UserError(
            "the GGUF writer supports byte-level BPE (GPT-2 style) tokenizers only, not SentencePiece-"
            "style vocabularies; drop llamacpp from --targets"
        )


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, config) -> None:
    check_tokenizer(tokenizer)
    backend = tokenizer.backend_tokenizer
    with _collector_paused():
        merges = bpe_merges(_json_merges(backend.to_str()))
    if not merges:
        raise UserError("the tokenizer has no BPE merges; the GGUF writer cannot describe it to llama.cpp")
    vocab_size = max(config.vocab_size, len(tokenizer))
    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        # SpecialVocab reads special ids and the chat template from saved files. Its tokenizer.json here
        # holds only the parts it reads besides the merges (set below): parsing the whole file (the
        # vocabulary above all) took 0.2 s, a third of this writer's time on the default model.
        tokenizer.save_pretrained(folder)
        post = backend.post_processor
        parts = {
            "added_tokens": [
                {"id": i, "content": t.content} for i, t in sorted(tokenizer.added_tokens_decoder.items())
            ],
            "post_processor": None if post is None else json.loads(post.__getstate__()),
        }
        (Path(folder) / "tokenizer.json").write_text(json.dumps(parts))
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens))
    special.merges = merges
    special.add_special_token = _adds_special(tokenizer)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer)


@contextmanager
def _collector_paused():
    """Python's cyclic GC off while ~50k short-lived lists exist: otherwise they can trigger a full
    collection of the whole process (0.2 s with a model loaded); they are freed before it resumes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _json_merges(tokenizer_json: str) -> list:
    """The model's merges of a compact tokenizer.json, parsing that array alone. The key cannot occur
    elsewhere followed by '[': a vocabulary entry named "merges" is followed by its id."""
    start = tokenizer_json.find('"merges":[')
    if start < 0:
        return []
    return json.JSONDecoder().raw_decode(tokenizer_json, start + len('"merges":'))[0]


def bpe_merges(merges: list) -> list[str]:
    """tokenizer.json's merges as llama.cpp stores them: "left right", a space inside a part written as
    U+0120 (the rule of gguf.SpecialVocab for the list-of-pairs format of transformers >= 4.45)."""
    if not merges or isinstance(merges[0], str):
        return list(merges)
    return [left.replace(" ", "\u0120") + " " + right.replace(" ", "\u0120") for left, right in merges]
