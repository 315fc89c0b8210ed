"""Shared fixtures: seeds, a tiny random Llama, the tiny families, the embedded default model, the GGUF oracle.

Helpers that tests import live in support/ (tests/ is on sys.path through pytest's `pythonpath`).
"""

import os

import pytest
import torch

from support.families import TINY_CONFIG


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded SmolLM2-135M-Instruct as a cached BF16 Hugging Face folder."""
    from nvfp4.converter.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir):
    """A tiny random Llama (hidden 64, 2 layers) with the default model's tokenizer and chat template."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=len(tokenizer), **TINY_CONFIG)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, default_model_dir):
    """family name -> the folder of its tiny random model (tests/support/families.py), built on first use."""
    from transformers import AutoTokenizer

    from support.families import build

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    root, built = tmp_path_factory.mktemp("families"), {}

    def folder(name: str):
        if name not in built:
            built[name] = build(name, tokenizer, root)
        return built[name]

    return folder


@pytest.fixture(scope="session")
def llama_cpp_converter():
    """llama.cpp's own convert_hf_to_gguf.py (from llama-cpp-python's source release), the GGUF oracle."""
    from nvfp4.converter.models import cache_dir
    from support.oracles import llama_cpp_converter as tree

    return tree(cache_dir())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
