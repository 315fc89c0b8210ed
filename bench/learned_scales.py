"""Learned-scale fake-quant forward + backward of one QAD step's linears, at the default model's shapes.

    .venv/bin/python bench/learned_scales.py      # the installed nvfp4 (for a before/after pair, run it in each
                                                  # checkout with that checkout's own .venv)

Times `fake_quantize_learned` forward and backward over 30 layers of q, k, v, o, gate, up, down
(SmolLM2-135M: hidden 576, intermediate 1536, 3 KV heads of 64) on random weights: the weight-sized
work of a W4A4/W4A16 QAD step with learned block scales, which does not shrink with the tokens.
"""

import argparse
import time

import torch

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from nvfp4.converter.pipeline import keep_freed_memory
    from nvfp4.kernels import numerics
    from nvfp4.kernels.ops import fake_quantize_learned

    keep_freed_memory()
    torch.manual_seed(0)
    weights = [(torch.randn(shape) * 0.02).requires_grad_() for shape in SHAPES]
    gscale = numerics.global_scale(torch.tensor(0.1))
    log_scales = [torch.nn.Parameter(numerics.block_scales(w.detach(), gscale).float().log()) for w in weights]
    upstream = [torch.randn(shape) for shape in SHAPES]

    def layer() -> None:
        outs = [fake_quantize_learned(w, gscale, s) for w, s in zip(weights, log_scales)]
        torch.autograd.backward(outs, upstream)
        for param in weights + log_scales:
            param.grad = None

    layer()
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.layers):
            layer()
        best = min(best, time.perf_counter() - start)
    print(
        f"{args.repo}: forward + backward of {len(SHAPES) * args.layers} linears, best of {args.repeats}: "
        f"{best * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
