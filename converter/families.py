"""The model families every stage supports: one declarative entry each.

A stage asks the entry, never the architecture's name: which norms feed the attention and the MLP
(channel smoothing), whether the norms multiply by (1 + weight) (Gemma), how a mixture of experts
is named on the Hub (exports), which llama.cpp architecture the GGUF target writes and whether its
q/k rows need llama.cpp's RoPE permutation, and whether the native serving engine runs the family.
Adding a family is one entry here plus its tiny model in tests/support/families.py.
"""

import re
from dataclasses import dataclass

from nvfp4.errors import UserError


@dataclass(frozen=True)
class MoE:
    """A mixture-of-experts MLP: a router (kept in high precision) and experts, named as on the Hub."""

    block: str  # the MoE block under a decoder layer on the Hub: "block_sparse_moe" (Mixtral) or "mlp"
    gate: str  # one expert's projections on the Hub (Mixtral: w1, w3, w2)
    up: str
    down: str
    router: str = "gate"  # the router inside the block


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.json "model_type"
    architectures: tuple[str, ...]  # transformers' causal-LM class names (config.json "architectures")
    gguf_arch: str  # gguf.MODEL_ARCH member that llama.cpp loads the family as
    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")  # before attention, before the MLP
    norm_offset: float = 0.0  # the norms scale by (norm_offset + weight): Gemma's 1
    permute_qk: bool = False  # llama.cpp's LLAMA architecture rotates interleaved pairs; transformers, halves
    native: bool = True  # `nvfp4 serve`'s native engine runs it (else --engine llamacpp / vllm / trtllm)
    # llama.cpp runs the family's NVFP4 GGUF. Its graphs for Qwen2, Gemma 3 and Phi-3 (llama-cpp-python 0.3.36)
    # pass no per-tensor scale to the feed-forward matmuls: the GGUF is written (llama.cpp's converter writes
    # the same bytes) but llama.cpp computes garbage from it until it applies those scales.
    llamacpp_runs: bool = True
    moe: MoE | None = None


FAMILIES = (
    Family("llama", "llama", ("LlamaForCausalLM",), "LLAMA", permute_qk=True),
    Family("mistral", "mistral", ("MistralForCausalLM",), "LLAMA", permute_qk=True),
    Family("qwen2", "qwen2", ("Qwen2ForCausalLM",), "QWEN2", llamacpp_runs=False),
    Family("qwen3", "qwen3", ("Qwen3ForCausalLM",), "QWEN3"),
    Family(
        "gemma3",
        "gemma3_text",
        ("Gemma3ForCausalLM",),
        "GEMMA3",
        norms=("input_layernorm", "pre_feedforward_layernorm"),
        norm_offset=1.0,
        native=False,
        llamacpp_runs=False,
    ),
    Family("phi3", "phi3", ("Phi3ForCausalLM",), "PHI3", native=False, llamacpp_runs=False),
    Family(
        "mixtral",
        "mixtral",
        ("MixtralForCausalLM",),
        "LLAMA",
        permute_qk=True,
        native=False,
        moe=MoE("block_sparse_moe", "w1", "w3", "w2"),
    ),
    Family(
        "qwen3_moe",
        "qwen3_moe",
        ("Qwen3MoeForCausalLM",),
        "QWEN3MOE",
        native=False,
        moe=MoE("mlp", "gate_proj", "up_proj", "down_proj"),
    ),
)
BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES}


def family_of(config) -> Family:
    """The entry for a transformers config (or a config.json dict); a UserError naming the supported ones."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    family, architectures = BY_MODEL_TYPE.get(get("model_type")), get("architectures") or []
    if family is None or architectures and not set(architectures) & set(family.architectures):
        found = ", ".join(architectures) or get("model_type") or "(none in config.json)"
        supported = ", ".join(a for f in FAMILIES for a in f.architectures)
        raise UserError(f"unsupported model architecture {found}; supported: {supported}")
    return family


_LAYER_MLP = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+)\.mlp\.(?P<rest>.+)$")
_EXPERT = re.compile(r"^experts\.(?P<expert>\d+)\.(?P<leaf>gate_up_proj|down_proj)$")


def hub_names(family: Family, module: str) -> list[str]:
    """A module's name(s) in the exported checkpoint. Experts are held here as one gate_up and one down
    linear each (converter/moe.py); the Hub, ModelOpt and vLLM name an expert's gate and up apart:
    `...layers.L.mlp.experts.E.gate_up_proj` -> [`...layers.L.block_sparse_moe.experts.E.w1`, `....w3`]."""
    match = _LAYER_MLP.match(module) if family.moe else None
    if match is None:
        return [module]
    prefix, rest = f"{match['layer']}.{family.moe.block}", match["rest"]
    expert = _EXPERT.match(rest)
    if expert is None:
        return [f"{prefix}.{rest}"]
    base = f"{prefix}.experts.{expert['expert']}"
    if expert["leaf"] == "down_proj":
        return [f"{base}.{family.moe.down}"]
    return [f"{base}.{family.moe.gate}", f"{base}.{family.moe.up}"]


def hub_tensor_name(family: Family, tensor: str) -> str:
    """A tensor of a module that keeps one name on the Hub (not an expert's gate_up)."""
    module, _, leaf = tensor.rpartition(".")
    (name,) = hub_names(family, module)
    return f"{name}.{leaf}"


def internal_name(family: Family, hub_module: str) -> tuple[str, int]:
    """The inverse of hub_names for one Hub module: (our module name, its part: 0 gate or whole, 1 up)."""
    if family.moe is None:
        return hub_module, 0
    moe = family.moe
    match = re.match(rf"^(?P<layer>(?:.*\.)?layers\.\d+)\.{re.escape(moe.block)}\.(?P<rest>.+)$", hub_module)
    if match is None:
        return hub_module, 0
    rest = match["rest"]
    expert = re.match(r"^experts\.(\d+)\.(.+)$", rest)
    if expert is not None and expert[2] in (moe.gate, moe.up, moe.down):
        leaf = "down_proj" if expert[2] == moe.down else "gate_up_proj"
        return f"{match['layer']}.mlp.experts.{expert[1]}.{leaf}", int(expert[2] == moe.up)
    return f"{match['layer']}.mlp.{rest}", 0


def engine_hint(family: Family) -> str:
    """Where `nvfp4 serve` can run a family the native engine does not."""
    if family.llamacpp_runs:
        return "--engine llamacpp (CPU), or --engine vllm / trtllm on a GPU"
    return "--engine vllm or --engine trtllm (a GPU)"


def support_table() -> str:
    """The README's table of families, from the entries above."""
    rows = ["| family | transformers class | MoE | GGUF (llama.cpp) | `nvfp4 serve` |", "|---|---|---|---|---|"]
    for family in FAMILIES:
        gguf = "written, runs" if family.llamacpp_runs else "written; llama.cpp drops its FFN scales"
        serve = "native engine" if family.native else engine_hint(family).replace(", or", "; or")
        rows.append(
            f"| {family.name} | `{'`, `'.join(family.architectures)}` | {'yes' if family.moe else ''} | {gguf} | {serve} |"
        )
    return "\n".join(rows)
