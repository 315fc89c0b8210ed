"""QAD step throughput on this machine vs the fp32 matmul-FLOP bound, side by side in one run.

    .venv/bin/python bench/qad.py                    # default model, convert's default step (batch 1 x 128), 3 timed steps
    .venv/bin/python bench/qad.py --batch 8 --seq-len 256

A timed step is what convert's training loop runs: forward both models, backward, gradient clipping
and the AdamW update (convert's process memory settings included).

FLOPs per step count the matmuls only: teacher forward 2*P, student forward 2*P, student backward
2*P_body (weight gradients) + 2*P (input gradients), where P = body linears + lm_head and the
lm_head has no weight gradient; attention-score FLOPs (seq_len^2) are added for both models.

A profiled step after the timed ones gives the time of its GEMMs alone (torch profiler, `aten::mm`):
their rate against the probe, and the step's "of bound" if all else in it took no time, the ceiling
this BLAS leaves at these shapes (at batch 1, 127-row GEMMs run well below the 2048^3 probe's rate).
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.config import QuantConfig  # noqa: E402
from converter.models import load_causal_lm  # noqa: E402
from converter.pipeline import keep_freed_memory  # noqa: E402
from converter.quantize import quantize, quantized_modules  # noqa: E402
from qad.config import QADConfig  # noqa: E402
from qad.distill import make_optimizer, train_step, trainable_parameters, update  # noqa: E402


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--scheme", default="nvfp4-a16")
    parser.add_argument("--batch", type=int, default=QADConfig.batch)
    parser.add_argument("--seq-len", type=int, default=QADConfig.seq_len)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--scale-lr", type=float, default=QADConfig.scale_lr, help="0: fixed block scales")
    args = parser.parse_args()
    keep_freed_memory()
    teacher, tokenizer, _ = load_causal_lm(args.model)
    student = quantize(copy.deepcopy(teacher), QuantConfig(scheme=args.scheme))
    cfg = QADConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, data="random", scale_lr=args.scale_lr)
    trainable_parameters(student, learn_scales=cfg.scale_lr > 0)
    optimizer, _ = make_optimizer(student, cfg)
    batch = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq_len))

    def step() -> None:  # what the training loop does per step, logging aside
        optimizer.zero_grad(set_to_none=True)
        train_step(student, teacher, batch, cfg)
        update(optimizer, cfg)

    for _ in range(2):  # warm-up discarded: the first two steps pay one-off allocator and thread-pool costs
        step()
    peak_before = matmul_gflops()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    peak = max(peak_before, matmul_gflops())
    gemm_flops, gemm_seconds = gemm_time(step)
    flops = step_flops(student, args.batch * (args.seq_len - 1), args.seq_len)
    achieved = flops / seconds / 1e9
    print(f"threads {torch.get_num_threads()}, batch {args.batch} x {args.seq_len}, scheme {args.scheme}, scale_lr {cfg.scale_lr:g}")
    print(f"{'fp32 matmul GFLOP/s':>22} {'step s':>8} {'step GFLOP':>11} {'achieved GFLOP/s':>17} {'of bound':>9} {'tokens/s':>9}")
    print(f"{peak:>22.1f} {seconds:>8.2f} {flops / 1e9:>11.1f} {achieved:>17.1f} {100 * achieved / peak:>8.0f}% {args.batch * args.seq_len / seconds:>9.0f}")
    gemm_rate = gemm_flops / gemm_seconds / 1e9
    print(f"GEMMs of a profiled step: {gemm_flops / 1e9:.1f} GFLOP in {gemm_seconds:.2f} s, {gemm_rate:.1f} GFLOP/s = "
          f"{100 * gemm_rate / peak:.0f}% of the probe; of bound if nothing else took time: "
          f"{100 * flops / gemm_seconds / 1e9 / peak:.0f}%")


if __name__ == "__main__":
    main()
