"""The native engine's decode step alone (no server, no sampling): tokens/s at several batch sizes, eager and
compiled with torch.compile, side by side in one process.

    .venv/bin/python bench/decode_step.py OUT                  # student from OUT/modelopt, teacher from report.json
    .venv/bin/python bench/decode_step.py OUT --batches 1,8,16 --steps 64 --models student
    python bench/decode_step.py --random smollm2-135m --device cuda     # GPU (bench/gpu.sh): random weights, real shapes

`--random PRESET` (bench/qad.py's presets) serves a randomly initialised model of that shape: its PTQ-packed
student and the model itself as teacher (fp32 on CPU, bf16 on CUDA), as `nvfp4 serve` holds them.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from pathlib import Path

import torch

from nvfp4.serve.native.kv_cache import KVCache
from nvfp4.serve.native.loader import hold_vocab_compact, load_student, load_teacher, pack_model, teacher_source
from nvfp4.serve.native.model import BatchedCausalLM

CONTEXT = 256  # each sequence's position at the start of the timed steps


def _runner(model: torch.nn.Module, slots: int, device: str) -> BatchedCausalLM:
    layers, kv_heads, head_dim = BatchedCausalLM.kv_shape(model)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return BatchedCausalLM(model, KVCache(layers, slots, kv_heads, CONTEXT + 512, head_dim, dtype, device))


def _random_models(preset: str, device: str) -> dict:
    """name -> loader of a random model of a real shape: the PTQ-packed student and its teacher."""
    spec = importlib.util.spec_from_file_location("bench_qad", Path(__file__).with_name("qad.py"))
    qad = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qad)
    teacher = qad.random_model(preset, torch.float32, torch.device("cpu"))

    def placed(model: torch.nn.Module) -> torch.nn.Module:
        return hold_vocab_compact(model) if device == "cpu" else model.to(device, torch.bfloat16)

    return {"student": lambda: placed(pack_model(copy.deepcopy(teacher))), "teacher": lambda: placed(teacher)}


def tokens_per_second(decode, batch: int, steps: int, vocab: int, device: str) -> float:
    tokens = torch.randint(vocab, (batch,), device=device)
    slots = torch.arange(batch, device=device)
    for warm in range(3):
        decode(tokens, torch.full((batch,), CONTEXT + warm, device=device), slots)
    _synchronize(device)
    start = time.perf_counter()
    for step in range(steps):
        tokens = decode(tokens, torch.full((batch,), CONTEXT + 3 + step, device=device), slots).argmax(-1)
    _synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", help="a convert output folder (or --random)")
    parser.add_argument("--random", help="a random model of this bench/qad.py preset's shape instead of OUT")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--models", default="student,teacher")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    if args.random:
        loaders = _random_models(args.random, args.device)
    elif args.out:
        loaders = {
            "student": lambda: load_student(args.out, args.device)[0],
            "teacher": lambda: load_teacher(teacher_source(args.out, None), args.device)[0],
        }
    else:
        parser.error("give OUT or --random PRESET")
    print(f"{args.device}, {torch.get_num_threads()} threads, context {CONTEXT}, {args.steps} steps")
    print(
        "| model | batch | eager tok/s | compiled tok/s | compiled / eager | compile s |\n|---|---:|---:|---:|---:|---:|"
    )
    for name in args.models.split(","):
        model = loaders[name]().eval()
        runner = _runner(model, max(batches), args.device)
        start = time.perf_counter()
        compiled = torch.compile(runner.decode, dynamic=True)
        with torch.no_grad():
            for batch in sorted({min(batches), 2} & set(range(1, max(batches) + 1))):  # B=1 and B>=2: two graphs
                zeros = torch.zeros(batch, dtype=torch.long, device=args.device)
                compiled(zeros, zeros, torch.arange(batch, device=args.device))
            compile_seconds = time.perf_counter() - start
            for batch in batches:
                eager = tokens_per_second(runner.decode, batch, args.steps, model.config.vocab_size, args.device)
                fast = tokens_per_second(compiled, batch, args.steps, model.config.vocab_size, args.device)
                print(
                    f"| {name} | {batch} | {eager:.1f} | {fast:.1f} | {fast / eager:.2f}x | {compile_seconds:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
