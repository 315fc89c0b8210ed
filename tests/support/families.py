"""Tiny random models of every supported family, from transformers' own config classes (no downloads).

2 layers, hidden 128 (every linear's input a multiple of 64, as llama.cpp's NVFP4 blocks need), 4 heads
of 32, 2 key/value heads, MoE with 4 experts (2 per token); the default model's tokenizer and chat template.
"""

from pathlib import Path

import torch

BASE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# name -> (transformers config class, its extra arguments)
TINY = {
    "llama": ("LlamaConfig", {}),
    "llama3_rope": ("LlamaConfig", {"rope_parameters": LLAMA3_ROPE}),  # Llama 3.x RoPE scaling
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    # llama.cpp scales Gemma 3's queries by 1/sqrt(head_dim): keep transformers' query_pre_attn_scalar the same
    "gemma3": ("Gemma3TextConfig", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64}),
    "phi3": ("Phi3Config", {"original_max_position_embeddings": 512}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 128,
            "head_dim": 32,
            "norm_topk_prob": True,
        },
    ),
}
MOE = ("mixtral", "qwen3_moe")

# The tiny random Llama of the `tiny_model_dir` fixture (conftest.py)
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def family(name: str):
    """The converter's entry (converter/families.py) for the tiny model `name`."""
    import transformers

    from nvfp4.converter.families import family_of

    return family_of(getattr(transformers, TINY[name][0])())


def folder_name(name: str) -> str:
    # llama.cpp recognises Phi-3 by "phi3" in general.name (the folder's name) and then expects Phi-3's own
    # SentencePiece tokens, which the default model's tokenizer lacks
    return "tiny-phi" if name == "phi3" else f"tiny-{name}"


def build(name: str, tokenizer, out: Path, seed: int = 1234) -> Path:
    """Save the tiny model `name` (bf16, as checkpoints ship) with `tokenizer` into out/<folder>."""
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    config_class, extra = TINY[name]
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **BASE, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    folder = out / folder_name(name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    return folder
