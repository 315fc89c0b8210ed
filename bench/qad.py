"""QAD step throughput on this machine vs the fp32 matmul-FLOP bound, side by side in one run.

    .venv/bin/python bench/qad.py                    # default model, convert's default step (batch 1 x 128), 3 timed steps
    .venv/bin/python bench/qad.py --batch 8 --seq-len 256
    python bench/qad.py --random llama-1b --device cuda --baseline --batch 8 --seq-len 512   # GPU (bench/gpu.sh)

`--random PRESET` trains a randomly initialised model of that shape instead of loading one (a machine
without the embedded model, e.g. a GPU box; step times do not depend on the weights' values).
`--baseline` also times the same step with an unquantized student (the same linears' weights trained,
no fake quantization) and prints the ratio: issue 5's GPU target is quantized <= 1.3x unquantized.

A timed step (the median of --steps) is what convert's training loop runs: forward both models,
backward, gradient clipping and the AdamW update (convert's process memory settings included).

FLOPs per step count the matmuls only: teacher forward 2*P, student forward 2*P, student backward
2*P_body (weight gradients) + 2*P (input gradients), where P = body linears + lm_head and the
lm_head has no weight gradient; attention-score FLOPs (seq_len^2) are added for both models.

A profiled step after the timed ones gives the time of its GEMMs alone (torch profiler, `aten::mm`):
their rate against the probe, and the step's "of bound" if all else in it took no time, the ceiling
this BLAS leaves at these shapes (at batch 1, 127-row GEMMs run well below the 2048^3 probe's rate).
"""

import argparse
import copy
import statistics
import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from nvfp4.converter.config import QuantConfig  # noqa: E402
from nvfp4.converter.models import load_causal_lm  # noqa: E402
from nvfp4.converter.pipeline import compute_dtype, keep_freed_memory, torch_device  # noqa: E402
from nvfp4.converter.quantize import calibrate, quantize, quantized_modules  # noqa: E402
from nvfp4.qad.config import QADConfig  # noqa: E402
from nvfp4.qad.distill import make_optimizer, train_step, trainable_parameters, update  # noqa: E402

PRESETS = {  # LlamaConfig fields of the models a random run can stand in for
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}


def random_model(preset: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model's init is slow on a few CPU cores
        model = LlamaForCausalLM(LlamaConfig(**PRESETS[preset], max_position_embeddings=8192))
    return model.to(dtype).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def step_flops(model, tokens: int, seq_len: int) -> float:
    body = sum(m.weight.numel() for m in quantized_modules(model).values())
    head = model.get_output_embeddings().weight.numel()
    config = model.config
    attention = 4 * config.num_hidden_layers * seq_len * config.hidden_size  # QK^T and PV per token
    forward = 2 * (body + head) * tokens + attention * tokens
    backward = 2 * body * tokens + 2 * (body + head) * tokens + 2 * attention * tokens
    return 2 * forward + backward  # teacher forward + student forward + student backward


def gemm_time(step) -> tuple[float, float]:
    """(GEMM FLOPs, seconds spent in GEMMs) of one profiled call of `step`."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        step()
    gemms = [e for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    return sum(e.flops for e in gemms), sum(e.self_cpu_time_total for e in gemms) / 1e6


def unquantized_student(teacher, quantized) -> torch.nn.Module:
    """The teacher's copy with the same linears' weights trainable as the quantized student's, nothing fake-quantized."""
    plain = copy.deepcopy(teacher).requires_grad_(False)
    modules = dict(plain.named_modules())
    for name in quantized_modules(quantized):
        modules[name].weight.requires_grad_(True)
    return plain


def step_runner(student, teacher, batch: torch.Tensor, cfg: QADConfig):
    optimizer, _ = make_optimizer(student, cfg)

    def step() -> None:  # what the training loop does per step, logging aside
        optimizer.zero_grad(set_to_none=True)
        train_step(student, teacher, batch, cfg)
        update(optimizer, cfg)

    return step


def interleaved_seconds(steps: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each named step, the steps taking turns (a noisy machine slows them alike)."""
    for step in [*steps.values()] * 2:  # warm-up discarded: one-off allocator, thread-pool and kernel-build costs
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or .gguf; default: the embedded model")
    parser.add_argument("--random", choices=sorted(PRESETS), default=None, help="a random model of this shape instead")
    parser.add_argument("--scheme", default="nvfp4-a16")
    parser.add_argument("--batch", type=int, default=QADConfig.batch)
    parser.add_argument("--seq-len", type=int, default=QADConfig.seq_len)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--scale-lr", type=float, default=QADConfig.scale_lr, help="0: fixed block scales")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--baseline", action="store_true", help="also time the step with an unquantized student")
    args = parser.parse_args()
    device = torch_device(args.device)
    dtype = compute_dtype(device)
    keep_freed_memory()
    teacher = random_model(args.random, dtype, device) if args.random else load_causal_lm(args.model, dtype, device)[0]
    batch = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq_len), device=device)
    student = quantize(copy.deepcopy(teacher), QuantConfig(scheme=args.scheme))
    calibrate(student, [batch])  # W4A4: the input scales, without which activations are not fake-quantized
    cfg = QADConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, data="random", scale_lr=args.scale_lr)
    trainable_parameters(student, learn_scales=cfg.scale_lr > 0)
    steps = {"quantized": step_runner(student, teacher, batch, cfg)}
    if args.baseline:
        steps["unquantized"] = step_runner(
            unquantized_student(teacher, student), teacher, batch, replace(cfg, scale_lr=0.0)
        )

    peak_before = matmul_gflops(device, dtype)
    seconds = interleaved_seconds(steps, args.steps, device)
    peak = max(peak_before, matmul_gflops(device, dtype))
    flops = step_flops(student, args.batch * (args.seq_len - 1), args.seq_len)
    achieved = flops / seconds["quantized"] / 1e9
    print(
        f"{device.type}, threads {torch.get_num_threads()}, batch {args.batch} x {args.seq_len}, scheme {args.scheme}, "
        f"scale_lr {cfg.scale_lr:g}"
    )
    probe = f"{str(dtype).removeprefix('torch.')} matmul GFLOP/s"
    print(f"{probe:>22} {'step s':>8} {'step GFLOP':>11} {'achieved GFLOP/s':>17} {'of bound':>9} {'tokens/s':>9}")
    print(
        f"{peak:>22.1f} {seconds['quantized']:>8.2f} {flops / 1e9:>11.1f} {achieved:>17.1f} {100 * achieved / peak:>8.0f}% {args.batch * args.seq_len / seconds['quantized']:>9.0f}"
    )
    if device.type == "cpu":  # the profiler's CPU self time is the GEMMs' own time only on CPU
        gemm_flops, gemm_seconds = gemm_time(steps["quantized"])
        gemm_rate = gemm_flops / gemm_seconds / 1e9
        print(
            f"GEMMs of a profiled step: {gemm_flops / 1e9:.1f} GFLOP in {gemm_seconds:.2f} s, {gemm_rate:.1f} GFLOP/s = "
            f"{100 * gemm_rate / peak:.0f}% of the probe; of bound if nothing else took time: "
            f"{100 * flops / gemm_seconds / 1e9 / peak:.0f}%"
        )
    if args.baseline:
        print(
            f"unquantized student: {seconds['unquantized']:.3f} s a step; quantized {seconds['quantized']:.3f} s = "
            f"{seconds['quantized'] / seconds['unquantized']:.2f}x (GPU target <= 1.3x)"
        )


if __name__ == "__main__":
    main()
