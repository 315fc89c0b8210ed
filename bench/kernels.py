"""W4A16 NVFP4 GEMM vs BF16 torch.matmul on a GPU: time, achieved GB/s, speed ratio, % of copy bandwidth.

python bench/kernels.py                 # CUDA: M in {1, 16, 128, 2048} x K=N in {4096, 8192}
TRITON_INTERPRET=1 python bench/kernels.py --interpret   # tiny shapes on CPU, proves the script runs
"""

import argparse
import time

import torch

from nvfp4.kernels import numerics  # noqa: E402


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (compilation) discarded
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def copy_bandwidth(device: str, repeats: int) -> float:
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), device, repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interpret", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.interpret:
        print("no CUDA device: the W4A16 GEMM benchmark needs a GPU (use --interpret to smoke-test on CPU)")
        return
    from nvfp4.kernels.triton_nvfp4 import matmul_w4a16_triton

    device = "cpu" if args.interpret else "cuda"
    sizes, ms = ([64], [1, 16]) if args.interpret else ([4096, 8192], [1, 16, 128, 2048])
    repeats = 1 if args.interpret else args.repeats
    peak = copy_bandwidth(device, repeats) if device == "cuda" else float("nan")
    print(
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}; copy bandwidth {peak:.0f} GB/s"
    )
    print(f"{'M':>6} {'K=N':>6} {'bf16 ms':>9} {'nvfp4 ms':>9} {'speed-up':>9} {'nvfp4 GB/s':>11} {'% copy bw':>10}")
    for size in sizes:
        weight = torch.randn(size, size, device=device)
        packed, scales, gscale = numerics.quantize_ref(weight)
        dense = weight.to(torch.bfloat16)
        for m in ms:
            x = torch.randn(m, size, device=device, dtype=torch.bfloat16)
            t_bf16 = timed(lambda: torch.matmul(x, dense.T), device, repeats)
            t_fp4 = timed(lambda: matmul_w4a16_triton(x, packed, scales, gscale), device, repeats)
            moved = packed.numel() + scales.numel() + 2 * x.numel() + 2 * m * size
            gbs = moved / t_fp4 / 1e9
            print(
                f"{m:>6} {size:>6} {t_bf16 * 1e3:>9.3f} {t_fp4 * 1e3:>9.3f} {t_bf16 / t_fp4:>8.2f}x {gbs:>11.0f} {100 * gbs / peak:>9.0f}%"
            )


if __name__ == "__main__":
    main()
