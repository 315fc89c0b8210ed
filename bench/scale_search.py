"""Scale search benchmark: PTQ with amax / mse / mse-act block scales, side by side in one run.

Prints, per mode: seconds spent choosing scales (quantize + calibrate, calibration data shared),
the weight-error ratio amax/mode over every quantized linear, and the held-out chat KL(teacher || student).

    .venv/bin/python bench/scale_search.py                      # default model (SmolLM2-135M-Instruct)
    .venv/bin/python bench/scale_search.py --scheme nvfp4-a16 --modes amax mse
    .venv/bin/python bench/scale_search.py --modes amax mse-act --factor-ranges 0.7,1.3 0.4,1.5   # candidate ranges
    .venv/bin/python bench/scale_search.py --modes mse-act --smooth-alphas 0 0.35 0.5 0.65   # channel smoothing first
    .venv/bin/python bench/scale_search.py --synthetic-layers 1  # Llama-7B-shaped random layers, search time only
"""

import argparse
import copy
import time
from unittest.mock import patch

import torch

from nvfp4.converter.calibration import calibration_batches, chat_prompt_ids  # noqa: E402
from nvfp4.converter.config import QuantConfig  # noqa: E402
from nvfp4.converter.models import load_causal_lm  # noqa: E402
from nvfp4.converter.quantize import calibrate, eligible_linears, quantize, quantized_modules  # noqa: E402
from nvfp4.converter.smoothing import smooth  # noqa: E402
from nvfp4.kernels import numerics, scale_search  # noqa: E402
from nvfp4.kernels.scale_search import block_errors, search_block_scales  # noqa: E402

# Not in converter/data/calibration_prompts.txt: the KL is measured on prompts calibration never saw.
HELD_OUT_PROMPTS = [
    "What causes the seasons on Earth?",
    "Write a haiku about the sea.",
    "How do vaccines train the immune system?",
    "Give three ideas for a rainy-day activity with kids.",
    "Explain what a hash table is.",
    "What is the capital of Australia, and why is it not Sydney?",
    "How can I make my bread rise better?",
    "Describe the difference between a virus and a bacterium.",
]
LLAMA_7B_SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def held_out_sequences(teacher, tokenizer, new_tokens: int) -> list[tuple[torch.Tensor, int]]:
    """(prompt + the teacher's greedy answer, prompt length) per held-out prompt."""
    sequences = []
    for prompt in chat_prompt_ids(tokenizer, HELD_OUT_PROMPTS):
        ids = torch.tensor([prompt], device=teacher.device)
        out = teacher.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        sequences.append((out, len(prompt)))
    return sequences


@torch.no_grad()
def held_out_kl(teacher, student, sequences) -> float:
    """Mean per-token KL(teacher || student) over the answer tokens (natural log)."""
    total, count = 0.0, 0
    for ids, prompt_len in sequences:
        t = torch.log_softmax(teacher(ids).logits[0, prompt_len - 1 : -1].float(), -1)
        s = torch.log_softmax(student(ids).logits[0, prompt_len - 1 : -1].float(), -1)
        total += float((t.exp() * (t - s)).sum())
        count += t.shape[0]
    return total / count


def weight_error(model) -> float:
    return sum(
        float(block_errors(m.weight, m.weight_gscale, m.export().scales).double().sum())
        for m in quantized_modules(model).values()
    )


def bench_model(args) -> None:
    torch.manual_seed(args.seed)
    teacher, tokenizer, folder = load_causal_lm(args.model, torch.float32, args.device)
    teacher.requires_grad_(False)
    n_weights = sum(m.weight.numel() for m in eligible_linears(teacher, QuantConfig()).values())
    t0 = time.perf_counter()
    batches = calibration_batches("self", teacher, tokenizer, args.calib_tokens, args.seed)
    calib_seconds = time.perf_counter() - t0
    sequences = held_out_sequences(teacher, tokenizer, args.new_tokens)
    print(
        f"model {folder.name}  scheme {args.scheme}  quantized weights {n_weights / 1e6:.1f} M  "
        f"device {args.device}  threads {torch.get_num_threads()}"
    )
    print(
        f"calibration data: self, {args.calib_tokens} tokens ({calib_seconds:.1f} s, shared by all modes); "
        f"held-out KL: {len(sequences)} prompts x {args.new_tokens} greedy teacher tokens"
    )
    rows = []
    runs = [
        (mode, rng, alpha)
        for mode in args.modes
        for rng in ([None] if mode == "amax" else args.factor_ranges)
        for alpha in args.smooth_alphas
    ]
    for mode, factors, alpha in runs:
        _sync(teacher.device)
        start = time.perf_counter()
        with patch.object(scale_search, "FACTOR_RANGE", factors or scale_search.FACTOR_RANGE):
            student = copy.deepcopy(teacher)
            if alpha:
                smooth(student, batches, alpha)
            student = quantize(student, QuantConfig(scheme=args.scheme, scale_search=mode))
            if student_needs_calibration(args.scheme, mode):
                calibrate(student, batches)
        _sync(teacher.device)
        seconds = time.perf_counter() - start
        label = mode if factors is None or len(args.factor_ranges) == 1 else f"{mode} {factors[0]:g}-{factors[1]:g}x"
        label += f" smooth {alpha:g}" if len(args.smooth_alphas) > 1 else ""
        rows.append((label, seconds, weight_error(student), held_out_kl(teacher, student, sequences)))
        del student
    amax_error = next((error for mode, _, error, _ in rows if mode == "amax"), rows[0][2])
    print("\n| PTQ scales | quantize+calibrate s | weight error amax/mode | held-out KL |")
    print("|---|---:|---:|---:|")
    for mode, seconds, error, kl in rows:
        print(f"| PTQ-{mode} | {seconds:.1f} | {amax_error / error:.3f} | {kl:.4f} |")


def student_needs_calibration(scheme: str, mode: str) -> bool:
    return scheme == "nvfp4" or mode == "mse-act"


def bench_synthetic(args) -> None:
    """Search time alone on random Llama-7B-shaped weights (32 layers in the real model)."""
    device = torch.device(args.device)
    generator = torch.Generator(device).manual_seed(args.seed)
    shapes = [s for name, s in LLAMA_7B_SHAPES.items() for _ in range({"q/k/v/o": 4, "gate/up": 2, "down": 1}[name])]
    per_layer = sum(o * i for o, i in shapes)
    print(f"Llama-7B-shaped layers: {args.synthetic_layers}  weights/layer {per_layer / 1e6:.0f} M  device {device}")
    print("\n| layers | mode | seconds | seconds x32 layers (est.) |\n|---|---|---:|---:|")
    for mode in args.modes:
        if mode == "amax":
            continue
        seconds = 0.0
        for _ in range(args.synthetic_layers):
            for out_f, in_f in shapes:
                w = torch.randn(out_f, in_f, device=device, generator=generator, dtype=torch.bfloat16) * 0.02
                act = torch.rand(in_f, device=device, generator=generator) if mode == "mse-act" else None
                gscale = numerics.global_scale(numerics.tensor_amax(w))
                _sync(device)
                start = time.perf_counter()
                search_block_scales(w, gscale, mode, act)
                _sync(device)
                seconds += time.perf_counter() - start
        per_model = seconds / args.synthetic_layers * 32
        print(f"| {args.synthetic_layers} | {mode} | {seconds:.1f} | {per_model:.0f} |")


def _factor_range(text: str) -> tuple[float, float]:
    low, high = (float(x) for x in text.split(","))
    return low, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder or GGUF; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--scheme", default="nvfp4", choices=["nvfp4", "nvfp4-a16"])
    parser.add_argument("--modes", nargs="+", default=["amax", "mse", "mse-act"], choices=["amax", "mse", "mse-act"])
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64, help="teacher tokens per held-out prompt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--factor-ranges",
        nargs="+",
        type=_factor_range,
        default=[None],
        help="LO,HI candidate ranges (times the amax scale) to compare; default: kernels' FACTOR_RANGE",
    )
    parser.add_argument(
        "--smooth-alphas",
        nargs="+",
        type=float,
        default=[0.0],
        help="channel smoothing strengths to compare (0 = none), applied before quantizing",
    )
    parser.add_argument(
        "--synthetic-layers", type=int, default=0, help="time the search on N Llama-7B-shaped layers instead"
    )
    args = parser.parse_args()
    if args.synthetic_layers:
        bench_synthetic(args)
    else:
        bench_model(args)


if __name__ == "__main__":
    main()
