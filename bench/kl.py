"""Per-token KL at the default model's vocabulary: the C kernel (kernels/kl.py's CPU path) next to the torch
formula, forward + backward (a QAD chunk) and forward only (the evaluation), in one run.

    .venv/bin/python bench/kl.py
    .venv/bin/python bench/kl.py --rows 127 --vocab 151936
"""

import argparse
import time

import torch

from nvfp4.converter.pipeline import keep_freed_memory  # noqa: E402
from nvfp4.kernels.kl import token_kl, token_kl_ref  # noqa: E402


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="tokens per chunk (QAD's kl_chunk_tokens)")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    keep_freed_memory()  # as convert does: otherwise every fresh temporary pays page faults
    torch.manual_seed(0)
    teacher, student = torch.randn(args.rows, args.vocab), torch.randn(args.rows, args.vocab)

    def backward(kl):
        def run():
            logits = student.clone().requires_grad_(True)
            kl(teacher, logits).sum().backward()

        return run

    rows = [
        ("forward + backward", backward(token_kl), backward(token_kl_ref)),
        ("forward, no grad", lambda: token_kl(teacher, student), lambda: token_kl_ref(teacher, student)),
    ]
    print(f"{args.rows} x {args.vocab} fp32 logits, torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print("| pass | C kernel (ms) | torch formula (ms) | speed-up |\n|---|---:|---:|---:|")
    for name, ours, reference in rows:
        a, b = best_ms(ours, args.repeats), best_ms(reference, args.repeats)
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
