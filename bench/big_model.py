"""Models bigger than memory: a random-weight model with a real model's exact config, converted layer by layer.

Writes the model (BF16, Hugging Face shards of 5 GB with an index; weights drawn per output row with a
log-normal scale and sparse outliers, so that blocks have realistic ranges; the default model's
tokenizer), then runs `nvfp4 convert` on it as a user does (all targets, the report's evaluation
included), in a process of its own, once per scheme: wall time, peak resident memory (VmHWM), the memory
plan's prediction for the path it took, bytes written. The outputs are then checked: each target read
back with the project's readers, a few layers' NVFP4 bytes against a direct quantization of the same
weights. The random model and the outputs are deleted at the end (unless --keep).

    .venv/bin/python bench/big_model.py                                   # Llama-3.1-8B shapes, W4A16 and W4A4
    .venv/bin/python bench/big_model.py --preset llama-3.2-1b --schemes nvfp4-a16 --workdir /tmp/big1b
    .venv/bin/python bench/big_model.py --preset llama-3.2-1b --schemes nvfp4-a16 --qad-layer-steps 8   # layer-local QAD

With --qad-layer-steps N, each layer also trains N layer-local QAD steps (`--qad-mode layer`) while it streams:
the trained bytes are no longer a direct quantization, so the spot checks then only read every target back.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRESETS = {  # transformers' LlamaConfig arguments, as the published config.json files give them
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}


def random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """bf16 values: norms near 1; matrices N(0, 1/in) with a log-normal scale per output row and 0.1% outliers
    of 5-20x (the heavy-tailed blocks NVFP4's block scales meet in trained models)."""
    if len(shape) == 1:
        return (1 + 0.1 * torch.randn(shape, generator=generator)).bfloat16()
    rows, cols = shape
    weight = torch.randn(shape, generator=generator) / cols**0.5
    weight *= torch.exp(0.5 * torch.randn(rows, 1, generator=generator))
    outliers = torch.rand(shape, generator=generator) < 1e-3
    weight[outliers] *= 5 + 15 * torch.rand(int(outliers.sum()), generator=generator)
    return weight.bfloat16()


def write_model(preset: str, folder: Path) -> Path:
    """The random model, one tensor at a time (never more than one in memory), as Hugging Face's shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from nvfp4.converter.models import resolve_model
    from nvfp4.converter.shards import ShardWriter, Spec

    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**PRESETS[preset])
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    specs = [Spec(name, torch.bfloat16, tuple(t.shape)) for name, t in skeleton.state_dict().items()]
    writer, generator = ShardWriter(tmp, specs), torch.Generator().manual_seed(0)
    started = time.time()
    for index, spec in enumerate(specs):
        writer.write(spec.name, random_weight(spec.name, spec.shape, generator))
        print(f"\rwriting the random model: {index + 1}/{len(specs)} tensors", end="", file=sys.stderr)
    writer.close()
    print(f" ({time.time() - started:.0f} s)", file=sys.stderr)
    config.dtype = "bfloat16"
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve_model(None)).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


RUNNER = """
import atexit, sys
def peak(path=sys.argv[1]):
    with open(path, "w") as out:
        out.write(open("/proc/self/status").read())
atexit.register(peak)
from nvfp4.cli import main
sys.argv = ["nvfp4", *sys.argv[2:]]
main()
"""


def run_convert(args: list[str], status_file: Path) -> tuple[float, int, str]:
    """(seconds, peak resident bytes, stderr) of `nvfp4 ARGS` in a fresh process."""
    started = time.time()
    done = subprocess.run([sys.executable, "-P", "-c", RUNNER, str(status_file), *args], capture_output=True, text=True)
    seconds = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"nvfp4 {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status_file.read_text())[1]) * 1024
    return seconds, peak, done.stderr


def planned_peak(plan_text: str, path: str) -> float:
    stage = "PTQ, layer by layer" if path == "layerwise" else "PTQ, whole model"
    return float(re.search(rf"{re.escape(stage)}\s+([\d.]+) GiB", plan_text)[1])


def check_outputs(model: Path, out: Path, layers: tuple[int, ...], trained: bool = False) -> list[str]:
    """Every target read back with the project's readers; the layers' NVFP4 bytes against a direct
    quantization of the source weights (the amax rule: exact), or, where QAD trained them, the same
    bytes in all three targets."""
    import gguf

    from nvfp4.converter.layout import student_folder
    from nvfp4.converter.shards import Checkpoint
    from nvfp4.converter.writers.gguf import FILE_NAME, to_gguf_nvfp4
    from nvfp4.kernels import quantize

    source, trtllm, vllm = Checkpoint(model), Checkpoint(student_folder(out)), Checkpoint(out / "vllm")
    reader = gguf.GGUFReader(out / "llamacpp" / FILE_NAME)
    gguf_tensors = {t.name: t for t in reader.tensors}
    checked = []
    for layer in layers:
        for module, gguf_name in (
            (f"model.layers.{layer}.mlp.down_proj", f"blk.{layer}.ffn_down.weight"),
            (f"model.layers.{layer}.self_attn.o_proj", f"blk.{layer}.attn_output.weight"),
        ):
            if trained:
                packed, scales, gscale = (
                    trtllm.get(f"{module}.{n}") for n in ("weight", "weight_scale", "weight_scale_2")
                )
            else:
                packed, scales, gscale = quantize(source.get(f"{module}.weight").float())
            assert torch.equal(trtllm.get(f"{module}.weight"), packed), module
            assert torch.equal(trtllm.get(f"{module}.weight_scale").view(torch.uint8), scales.view(torch.uint8)), module
            assert torch.equal(trtllm.get(f"{module}.weight_scale_2"), gscale.reshape(())), module
            assert torch.equal(vllm.get(f"{module}.weight_packed"), packed), module
            stored = gguf_tensors[gguf_name].data
            assert (stored.view("uint8").reshape(-1) == to_gguf_nvfp4(packed, scales).reshape(-1)).all(), gguf_name
            checked.append(module)
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="llama-3.1-8b")
    parser.add_argument("--schemes", default="nvfp4-a16,nvfp4")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nvfp4-big-model"))
    parser.add_argument("--keep", action="store_true", help="Keep the random model and the outputs.")
    parser.add_argument("--paths", default="auto", help="auto (what convert chooses), or whole,layerwise: each path")
    parser.add_argument("--qad-layer-steps", type=int, default=0, help="layer-local QAD steps per layer (0: PTQ)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = write_model(args.preset, args.workdir / args.preset)
    rows = []
    for scheme, forced in [(s, p) for s in args.schemes.split(",") for p in args.paths.split(",")]:
        out = args.workdir / f"out-{scheme}"
        qad = (
            ["--qad-mode", "layer", "--qad-steps", str(args.qad_layer_steps)]
            if args.qad_layer_steps
            else ["--qad-steps", "0"]
        )
        common = ["convert", str(model), "-o", str(out), *qad, "--scheme", scheme, "--force"]
        common += ["--layerwise"] if forced == "layerwise" else []
        _, _, plan = run_convert([*common, "--dry-run"], args.workdir / "status.txt")
        seconds, peak, log = run_convert(common, args.workdir / "status.txt")
        report = json.loads((out / "report.json").read_text())
        path = "layerwise" if "layer by layer" in json.dumps(report["timings_seconds"]) else "whole"
        predicted = planned_peak(plan, path)
        layers = (0, PRESETS[args.preset]["num_hidden_layers"] - 1)
        checked = check_outputs(model, out, layers, trained=bool(args.qad_layer_steps))
        accuracy = (report.get("accuracy") or {}).get("results", {}).get("NVFP4", {})
        rows.append(
            (
                scheme,
                path,
                seconds,
                peak / 2**30,
                predicted,
                sum(report["sizes_bytes"][t] for t in report["targets"]),
                accuracy.get("prose_kl"),
                len(checked),
            )
        )
        if not args.keep:
            shutil.rmtree(out)
    print(
        f"\n{args.preset}: {sum(1 for _ in model.glob('*.safetensors'))} shards, "
        f"{sum(f.stat().st_size for f in model.glob('*.safetensors')) / 1e9:.1f} GB BF16"
    )
    print(
        "| scheme | path | wall (s) | peak RSS (GiB) | plan (GiB) | plan / measured | written (GB) | prose KL | spot checks |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for scheme, path, seconds, peak, predicted, written, kl, checked in rows:
        kl_text = "-" if kl is None else f"{kl:.4f}"
        print(
            f"| {scheme} | {path} | {seconds:.0f} | {peak:.2f} | {predicted:.2f} | {predicted / peak:.2f} | "
            f"{written / 1e9:.1f} | {kl_text} | {checked} linears, 3 targets |"
        )
    if not args.keep:
        shutil.rmtree(model)


if __name__ == "__main__":
    main()
