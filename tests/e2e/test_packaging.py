"""Packaging: one import package (`nvfp4`), Hugging Face's `kernels` beside ours, core-only installs."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
OUR_PACKAGES = ("kernels", "converter", "qad", "serve", "ui")


def test_hugging_face_kernels_and_nvfp4_kernels_in_one_process(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from nvfp4.kernels import dequantize, quantize

    hub_kernels = importlib.import_module("kernels")  # Hugging Face's, installed by the dev extra
    assert Path(hub_kernels.__file__).resolve().parent != ROOT / "kernels", (
        "the repository's kernels/ shadows Hugging Face's"
    )
    assert hasattr(hub_kernels, "get_kernel"), "not Hugging Face's kernels package"
    importlib.import_module("transformers.integrations.hub_kernels")  # what transformers' model files import
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    weight = model.model.layers[0].self_attn.q_proj.weight.detach()
    restored = dequantize(*quantize(weight))
    assert restored.shape == weight.shape and (restored - weight).norm() < 0.2 * weight.norm()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_source_folders_import_only_under_nvfp4():
    import nvfp4.kernels

    assert nvfp4.kernels.__file__ == str(ROOT / "kernels" / "__init__.py")
    for name in OUR_PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is None or Path(spec.origin or "/").resolve().parent != ROOT / name, f"`import {name}` finds ours"


def _run(argv: list, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200, **kwargs)


@pytest.mark.slow
def test_core_install_is_one_package_and_names_missing_extras(tmp_path):
    venv = tmp_path / "venv"
    python, nvfp4 = venv / "bin" / "python", venv / "bin" / "nvfp4"
    assert _run([sys.executable, "-m", "venv", str(venv)], tmp_path).returncode == 0
    installed = _run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]
    source = tmp_path / "source"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "out", "*.egg-info", "__pycache__")
    )
    installed = _run([str(python), "-m", "pip", "install", "-q", str(source)], tmp_path)  # a wheel, core only
    assert installed.returncode == 0, installed.stderr[-2000:]

    shown = _run([str(python), "-m", "pip", "show", "-f", "nvfp4"], tmp_path).stdout
    files = [line.strip() for line in shown.split("Files:", 1)[1].splitlines() if line.strip()]
    top = {f.split("/")[0] for f in files if not f.startswith("..")}
    assert top == {"nvfp4", "nvfp4-0.1.0.dist-info"}, top
    data = {
        "nvfp4/kernels/cpu_nvfp4.c",
        "nvfp4/kernels/cpu_ops.cpp",
        "nvfp4/converter/data/calibration_prompts.txt",
        "nvfp4/qad/data/prompts.txt",
    }
    assert data <= set(files)

    for command in ("convert", "serve", "verify", "eval"):
        result = _run([str(nvfp4), command, "--help"], tmp_path)
        assert result.returncode == 0 and "Usage:" in result.stdout, (command, result.stderr[-2000:])
    (tmp_path / "out").mkdir()
    result = _run([str(nvfp4), "serve", str(tmp_path / "out")], tmp_path)
    assert result.returncode == 2 and "pip install 'nvfp4[serve]'" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = _run([str(nvfp4), "ui"], tmp_path)
    assert result.returncode == 2 and "pip install 'nvfp4[ui]'" in result.stderr, result.stderr[-2000:]
    for name in OUR_PACKAGES:  # Hugging Face's `kernels` comes with transformers; none of these is ours
        result = _run([str(python), "-c", f"import {name}; print({name}.__file__)"], tmp_path)
        assert result.returncode == 1 and "ModuleNotFoundError" in result.stderr or "/nvfp4/" not in result.stdout, name


LEAVES = {"errors", "exposure", "output"}  # nvfp4.errors, .exposure, .output: they import only each other
ALLOWED = {  # subpackage -> the subpackages of ours it may import (dependencies flow one way)
    "kernels": LEAVES,
    "converter": {"kernels"} | LEAVES,
    "qad": {"converter", "kernels"} | LEAVES,
    "serve": {"converter", "kernels"} | LEAVES,
    "ui": LEAVES,
}


def import_graph() -> dict[str, set[str]]:
    """Every module of ours -> the modules of ours it imports (at the top or inside functions)."""
    import ast

    modules = {}
    for package in OUR_PACKAGES + ("nvfp4",):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join(("nvfp4",) + (parts[1:] if parts[0] == "nvfp4" else parts))] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nvfp4"):
                found |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("nvfp4")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_dependencies_flow_one_way():
    for module, imported in import_graph().items():
        package = module.split(".")[1] if module.count(".") else "nvfp4"
        if package not in ALLOWED:
            continue  # nvfp4.cli stitches the subcommands together
        for other in imported:
            target = other.split(".")[1]
            assert target == package or target in ALLOWED[package], f"{module} imports {other}"


def test_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            assert state.get(other) != 1, "import cycle: " + " -> ".join(path + [module, other])
            if other not in state:
                visit(other, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
