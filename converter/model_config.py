"""config.json as untrusted input: read with a size bound, its types and sizes checked before any model (even
a skeleton on the meta device) is built from it. A crafted config must fail at once as one UserError, not build
millions of layers or end in a traceback from transformers."""

import json
from pathlib import Path

from nvfp4.converter.families import family_of
from nvfp4.errors import UserError

MAX_CONFIG_BYTES = 16 * 2**20
# field -> (smallest, largest): beyond any released model, small enough that a skeleton builds in seconds
BOUNDS = {
    "num_hidden_layers": (1, 1024),
    "hidden_size": (1, 65536),
    "intermediate_size": (1, 262144),
    "moe_intermediate_size": (1, 262144),
    "shared_expert_intermediate_size": (1, 262144),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 4096),
    "vocab_size": (1, 4_000_000),
    "max_position_embeddings": (1, 2**24),
    "num_local_experts": (1, 1024),
    "num_experts": (1, 1024),
    "num_experts_per_tok": (1, 1024),
}
NULLABLE = {"head_dim", "num_key_value_heads"}  # transformers derives these from the others when null
MAX_EXPERTS = 32768  # over all layers: each expert is three modules of the skeleton (~20 kB each)


def read_config(folder: Path) -> dict:
    """folder's config.json, checked (check_config)."""
    path = Path(folder) / "config.json"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, over {MAX_CONFIG_BYTES}")
        config = json.loads(path.read_bytes())
    except FileNotFoundError as error:
        raise UserError(f"not a Hugging Face model folder (no config.json): {folder}") from error
    except (OSError, ValueError, RecursionError) as error:
        raise UserError(f"unreadable config.json in {folder}: {str(error)[:200]}") from error
    check_config(config, folder)
    return config


def check_config(config, folder: Path) -> None:
    """A config.json's dict: a supported family's, every size an int in BOUNDS, and one transformers accepts."""
    where = f"{Path(folder) / 'config.json'}"
    if not isinstance(config, dict):
        raise UserError(f"{where} is not a JSON object")
    model_type, architectures = config.get("model_type"), config.get("architectures")
    if model_type is not None and not isinstance(model_type, str):
        raise UserError(f"{where}: model_type must be a string, not {_short(model_type)}")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise UserError(f"{where}: architectures must be a list of class names, not {_short(architectures)}")
    family_of(config)  # a missing model_type too: unsupported
    for field, (low, high) in BOUNDS.items():
        value = config.get(field)
        if field not in config or value is None and field in NULLABLE:
            continue
        if type(value) is not int or not low <= value <= high:  # type(): not a bool
            raise UserError(f"{where}: {field} must be an integer from {low} to {high}, not {_short(value)}")
    _check_proportions(config, where)
    _check_transformers_accepts(config, where)


def _check_proportions(config: dict, where: str) -> None:
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise UserError(f"{where}: num_key_value_heads ({kv_heads}) must divide num_attention_heads ({heads})")
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    if experts and config.get("num_experts_per_tok", 1) > experts:
        raise UserError(f"{where}: num_experts_per_tok ({config['num_experts_per_tok']}) exceeds the {experts} experts")
    if experts * config.get("num_hidden_layers", 1) > MAX_EXPERTS:
        raise UserError(
            f"{where}: {experts} experts in each of {config.get('num_hidden_layers')} layers is over "
            f"{MAX_EXPERTS} experts"
        )


def _check_transformers_accepts(config: dict, where: str) -> None:
    """transformers' own checks of the fields not bounded here (types of the others, RoPE parameters)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(**config)
    except (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as error:
        raise UserError(f"{where}: transformers refuses it: {' '.join(str(error).split())[:300]}") from error


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
