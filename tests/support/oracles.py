"""The peers as test oracles: ModelOpt's export, llama.cpp's own converter, byte comparisons."""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

LLAMA_CPP_PYTHON = "0.3.36"
NVFP4 = gguf.GGMLQuantizationType.NVFP4


def calibration_batch(vocab: int) -> torch.Tensor:  # -> [1, 32]
    return torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))


def modelopt_export(source: Path, out: Path, scheme: str, batch: torch.Tensor) -> Path:
    """ModelOpt PTQ (the same calibration batch as ours, fp32 like our CPU student) + its unified HF export."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    mtq.quantize(
        model, mtq.NVFP4_DEFAULT_CFG if scheme == "nvfp4" else mtq.W4A16_NVFP4_CFG, forward_loop=lambda m: m(batch)
    )
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def assert_same_quantized_tensors(ours: dict, theirs: dict) -> None:
    quantized = [k for k in theirs if k.endswith(("weight_scale", "weight_scale_2", "input_scale"))]
    quantized += [k.removesuffix("_scale_2") for k in quantized if k.endswith("weight_scale_2")]
    assert quantized, "the reference export holds no NVFP4 tensor"
    assert sorted(k for k in ours if k in quantized) == sorted(quantized)
    for key in quantized:
        a, b = ours[key], theirs[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        equal = (
            torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            if a.dtype == torch.float8_e4m3fn
            else torch.equal(a, b)
        )
        assert equal, f"{key}: differs from ModelOpt's export"


def llama_cpp_converter(cache: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py and gguf-py, from llama-cpp-python's source release (cached)."""
    root = cache / "llama-cpp-python-src"
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp"
    tree = root / prefix
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                "-d",
                str(root),
            ],
            check=True,
        )
    wanted = (f"{prefix}/convert_hf_to_gguf.py", f"{prefix}/conversion/", f"{prefix}/gguf-py/")
    staging = Path(tempfile.mkdtemp(dir=root))
    with tarfile.open(sdist) as tar:
        tar.extractall(staging, members=[m for m in tar.getmembers() if m.name.startswith(wanted)], filter="data")
    tree.parent.mkdir(parents=True, exist_ok=True)
    if not tree.exists():
        (staging / prefix).rename(tree)
    shutil.rmtree(staging, ignore_errors=True)
    return tree


def reference_gguf(converter: Path, hf_dir: Path, out: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(converter / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"llama.cpp's converter failed:\n{result.stderr[-3000:]}"
    return out


def gguf_tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def assert_gguf_quantized_equal(ours: Path, theirs: Path) -> int:
    """The NVFP4 tensors and their scale tensors byte for byte, and the same tensor names; -> NVFP4 tensors."""
    mine, ref = gguf_tensors(ours), gguf_tensors(theirs)
    quantized = {n for n, t in ref.items() if t.tensor_type == NVFP4}
    scales = {n for n in ref if n.endswith((".scale", ".input_scale"))}
    assert quantized and scales
    assert quantized == {n for n, t in mine.items() if t.tensor_type == NVFP4}, "NVFP4 tensor sets differ"
    assert scales == {n for n in mine if n.endswith((".scale", ".input_scale"))}, "scale tensor sets differ"
    assert set(mine) == set(ref), f"tensor names differ: {sorted(set(mine) ^ set(ref))[:8]}"
    bad = []
    for name in sorted(quantized | scales):
        a, b = mine[name], ref[name]
        if a.tensor_type != b.tensor_type or not np.array_equal(
            np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)
        ):
            bad.append(name)
    assert not bad, f"{len(bad)} tensors differ from llama.cpp's converter, e.g. {bad[:5]}"
    return len(quantized)
