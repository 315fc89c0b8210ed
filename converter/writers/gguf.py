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

from nvfp4.errors import UserError
from nvfp4.converter.writers.base import TOKENIZER_LOCK, Writer
from nvfp4.converter.writers.hf import packed_weights
from nvfp4.kernels import numerics
from nvfp4.kernels.linear import PackedWeight

log = logging.getLogger(__name__)

GGUF_BLOCK = 64  # elements per NVFP4 block in GGUF (4 sub-blocks of 16)
GGUF_BLOCK_BYTES = 36
FILE_NAME = "model.gguf"


@dataclass(frozen=True)
class ArchSpec:
    arch: gguf.MODEL_ARCH
    permute_qk: bool  # HF rotate-half RoPE -> llama.cpp interleaved RoPE


ARCHITECTURES = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
}

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


def _plain_array(x: Tensor, dtype: torch.dtype) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    x = x.detach().cpu()
    if x.ndim <= 1:  # norms and biases stay F32, as llama.cpp's converter writes them
        dtype = torch.float32
    x = x.to(dtype).contiguous()
    if dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16), _PLAIN_TYPES[dtype]
    return x.numpy(), _PLAIN_TYPES[dtype]


def _scalar(x: Tensor) -> np.ndarray:  # -> F32 [1]
    return x.detach().float().cpu().reshape(1).numpy()


# ---------------------------------------------------------------------------------------------
# writer


class _BulkArrayGGUFWriter(gguf.GGUFWriter):
    """gguf.GGUFWriter that packs string and integer arrays (the vocabulary, its merges and token
    types: ~150k items on the default model) in bulk; the bytes are the same."""

    _INTEGERS = {gguf.GGUFValueType.INT32: "i4", gguf.GGUFValueType.UINT32: "u4",
                 gguf.GGUFValueType.INT64: "i8", gguf.GGUFValueType.UINT64: "u8"}

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
    """Writes `out/model.gguf` for llama.cpp (general.file_type 39 = MOSTLY_NVFP4)."""

    def write(self, student: nn.Module, tokenizer, source_dir: Path, out: Path) -> Path:
        config = student.config
        spec = _arch_spec(student)
        if self.dtype not in _PLAIN_TYPES:
            raise UserError(f"the GGUF writer stores unquantized tensors as bf16, fp16 or fp32, not {self.dtype}")
        path = Path(out) / FILE_NAME
        tmp_name = str(Path(out) / f".{FILE_NAME}.{os.getpid()}.tmp")  # not mkstemp: keep the umask's file mode
        try:
            writer = _BulkArrayGGUFWriter(tmp_name, gguf.MODEL_ARCH_NAMES[spec.arch])
            _add_hparams(writer, config, Path(source_dir).name)
            with TOKENIZER_LOCK:
                _add_tokenizer(writer, tokenizer, config)
            a16 = _add_tensors(writer, student, spec, self.dtype)
            if a16:  # weight-only layers must not get 4-bit activations on backends that could
                writer.add_array("general.tensor_extra.name", sorted(a16))
                writer.add_array("general.tensor_extra.prec_a4", [False] * len(a16))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp_name, path)
        finally:
            if os.path.exists(tmp_name):
                os.remove(tmp_name)
        return path


def _arch_spec(student: nn.Module) -> ArchSpec:
    architecture = (getattr(student.config, "architectures", None) or [type(student).__name__])[0]
    spec = ARCHITECTURES.get(architecture)
    if spec is None:
        raise UserError(
            f"the llama.cpp (GGUF) writer does not support {architecture}; "
            f"supported: {', '.join(ARCHITECTURES)} (drop llamacpp from --targets)"
        )
    return spec


def _rope(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
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
    writer.add_rope_dimension_count(_head_dim(config))
    if getattr(config, "head_dim", None):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] not in ("default", "llama3"):  # llama3 is the rope_freqs tensor
        raise UserError(f"the GGUF writer does not support rope type {rope['rope_type']!r}")


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


def _add_tensors(writer: gguf.GGUFWriter, student: nn.Module, spec: ArchSpec, dtype: torch.dtype) -> list[str]:
    """Add every tensor; returns the NVFP4 tensors that are weight-only (W4A16)."""
    config = student.config
    names = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    packed = packed_weights(student)  # shared with the other writers of the same student state
    weight_only = []
    for hf_name, param in student.named_parameters():  # tied lm_head appears once, as the embedding
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"the GGUF writer cannot map tensor {hf_name} of {type(student).__name__}")
        module_name, _, leaf = hf_name.rpartition(".")
        heads = _permute_heads(config, module_name) if spec.permute_qk else None
        if leaf == "weight" and module_name in packed:
            if _add_nvfp4(writer, gguf_name, packed[module_name], heads, student.get_submodule(module_name), dtype):
                if packed[module_name].input_gscale is None:
                    weight_only.append(gguf_name)
            continue
        data = param.detach()
        if heads is not None:
            data = permute_rows(data, heads)
        array, qtype = _plain_array(data, dtype)
        writer.add_tensor(gguf_name, array, raw_dtype=qtype)
    if spec.arch == gguf.MODEL_ARCH.LLAMA and _rope(config)["rope_type"] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config).numpy())
    return weight_only


def _permute_heads(config, module_name: str) -> int | None:
    if module_name.endswith("q_proj"):
        return config.num_attention_heads
    if module_name.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _add_nvfp4(writer, name: str, weight: PackedWeight, heads: int | None, module: nn.Module, dtype) -> bool:
    """Add one quantized linear as NVFP4 (+ scale tensors); False when it had to stay unquantized."""
    packed, scales = weight.packed, weight.scales
    if packed.shape[1] * 2 % GGUF_BLOCK:
        # GGUF NVFP4 blocks span 64 elements: store what the student computes with, unquantized.
        log.warning("%s: in_features %d is not a multiple of %d; written as %s in the GGUF",
                    name, packed.shape[1] * 2, GGUF_BLOCK, dtype)
        data = module.quantized_weight().detach()
        if heads is not None:
            data = permute_rows(data, heads)
        array, qtype = _plain_array(data, dtype)
        writer.add_tensor(name, array, raw_dtype=qtype)
        return False
    if heads is not None:
        packed, scales = permute_rows(packed, heads), permute_rows(scales.view(torch.uint8), heads)
    writer.add_tensor(name, to_gguf_nvfp4(packed, scales.view(torch.float8_e4m3fn)), raw_dtype=gguf.GGMLQuantizationType.NVFP4)
    base = name.removesuffix(".weight")
    writer.add_tensor(f"{base}.scale", _scalar(weight.gscale))
    if weight.input_gscale is not None:
        writer.add_tensor(f"{base}.input_scale", _scalar(weight.input_gscale))
    return True


# ---------------------------------------------------------------------------------------------
# tokenizer


def pre_tokenizer_name(tokenizer) -> str:
    """The name llama.cpp gives this BPE pre-tokenizer (hash of the ids of a fixed check text)."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        log.warning("unknown BPE pre-tokenizer (hash %s): writing 'default'; llama.cpp may split text differently", digest)
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


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, config) -> None:
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise UserError("the GGUF writer needs a fast (tokenizer.json) tokenizer")
    backend = tokenizer.backend_tokenizer
    if type(backend.model).__name__ != "BPE" or getattr(backend.model, "byte_fallback", False):
        raise UserError("the GGUF writer supports byte-level BPE (GPT-2 style) tokenizers only, "
                        "not SentencePiece-style vocabularies")
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
        parts = {"added_tokens": [{"id": i, "content": t.content} for i, t in sorted(tokenizer.added_tokens_decoder.items())],
                 "post_processor": None if post is None else json.loads(post.__getstate__())}
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
