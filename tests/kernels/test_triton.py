"""Triton kernels against the torch reference: under TRITON_INTERPRET=1 on CPU (CI), natively on CUDA.

The interpreter must be switched on before triton is first imported, and other test modules import
it earlier (compressed-tensors does), so the CPU checks run in a fresh interpreter process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

CHECKS = r"""
import json, sys, torch
from nvfp4.kernels import numerics as nv
from nvfp4.kernels.triton_nvfp4 import fake_quantize_triton, matmul_w4a16_triton, quantize_triton, scale_gradient_triton

device = sys.argv[1]
results = []
torch.manual_seed(0)
cases = [((2, 32), 1.0), ((3, 48), 1e-4), ((17, 96), 1e3), ((100, 160), 1.0), ((5, 32), 1e-30)]
for (rows, cols), magnitude in cases:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = (torch.randn(rows, cols) * magnitude).clamp(-6e4, 6e4).to(dtype)
        w[0, :16] = 0.0
        w[-1, -16:] = -0.0
        if w.abs().max() == 0:  # underflowed to an all-zero tensor: no global scale exists
            continue
        packed, scales, gscale = nv.quantize_ref(w)
        tp, ts = quantize_triton(w.to(device), gscale)
        fq = fake_quantize_triton(w.to(device), gscale).cpu()
        results.append({"case": f"{rows}x{cols} {magnitude} {dtype}",
                        "packed": torch.equal(tp.cpu(), packed),
                        "scales": torch.equal(ts.cpu().view(torch.uint8), scales.view(torch.uint8)),
                        "fake_quant": torch.equal(fq, nv.fake_quantize_ref(w, gscale))})
ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
w = torch.zeros(7, 16); w[:, 0] = 6.0; w[:, 1] = ties; w[:, 2] = -ties
tp, _ = quantize_triton(w.to(device), torch.tensor(1.0))
results.append({"case": "ties", "packed": torch.equal(tp.cpu(), nv.quantize_ref(w, torch.tensor(1.0))[0]), "scales": True, "fake_quant": True})
learned = []  # given (searched or learned) block scales: the forward, and the LSQ backward of learned ones
for rows, cols in ((3, 48), (17, 96), (64, 160)):
    for dtype in (torch.float32, torch.bfloat16):
        w, upstream = torch.randn(rows, cols).to(dtype), torch.randn(rows, cols)
        gscale = nv.global_scale(nv.tensor_amax(w))
        scale = nv.block_scales(w, gscale).float() * torch.empty(rows, cols // 16).uniform_(0.5, 1.5)
        scale[0, 0], scale[-1, -1] = 1e-4, 500.0  # held at e4m3's bounds: no gradient
        scales = nv.e4m3_scales(scale)
        fq = fake_quantize_triton(w.to(device), gscale, scales.to(device)).cpu()
        grad_x, grad_log = (t.cpu() for t in scale_gradient_triton(w.to(device), upstream.to(device), scale.to(device),
                                                                  scales.to(device), gscale))
        expected_x, expected_log = nv.scale_gradient_ref(w, upstream, scale, gscale)
        held = (scale < 2**-9) | (scale > 448)
        learned.append({"case": f"{rows}x{cols} {dtype}", "fake_quant": torch.equal(fq, nv.fake_quantize_ref(w, gscale, scales)),
                        "grad_x": torch.equal(grad_x, expected_x) and bool((expected_x == 0).any()),
                        "held": torch.equal(grad_log == 0, held),
                        "grad_log_rel": float((grad_log - expected_log).abs().max() / expected_log.abs().max())})
gemm = []
shapes = [(1, 16, 16), (1, 100, 160), (3, 48, 96), (3, 100, 48), (17, 100, 160), (17, 16, 48)]
for m, n, k in shapes:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        packed, scales, gscale = nv.quantize_ref(torch.randn(n, k))
        x = torch.randn(m, k).to(dtype)
        y = matmul_w4a16_triton(x.to(device), packed.to(device), scales.to(device), gscale).cpu()
        ref = x.double() @ nv.dequantize_ref(packed, scales, gscale).double().T
        diff = (ref - y.double()).abs()
        # rounding to x.dtype costs half an ulp; allow one ulp per element plus fp32 accumulation noise
        ulp_bound = torch.finfo(dtype).eps * ref.abs() + 1e-6 * ref.abs().max()
        gemm.append({"case": f"{m}x{n}x{k} {dtype}", "dtype": str(dtype), "out_dtype": str(y.dtype),
                     "within_ulp": bool((diff <= ulp_bound).all()),
                     "sqnr": float(20 * torch.log10(ref.norm() / diff.norm().clamp(min=1e-30))),
                     "max_rel": float((ref - y.double()).abs().max() / ref.abs().max())})
print(json.dumps({"quant": results, "learned": learned, "gemm": gemm}))
"""


ENGINE = r"""
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from nvfp4.serve.native.kv_cache import KVCache
from nvfp4.serve.native.loader import pack_model
from nvfp4.serve.native.model import BatchedCausalLM, Chunk

device = sys.argv[1]
torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
model = pack_model(LlamaForCausalLM(config).eval())


def logits(model, device):
    layers, kv_heads, head_dim = BatchedCausalLM.kv_shape(model)
    runner = BatchedCausalLM(model, KVCache(layers, 2, kv_heads, 32, head_dim, torch.float32, device))
    prompts = runner.forward([Chunk(0, [5, 6, 7, 8], 0), Chunk(1, [9, 10], 0)])[0]
    decodes = runner.forward([Chunk(0, [11], 4, decode=True), Chunk(1, [12], 2, decode=True)])[0]
    return torch.cat([prompts, decodes]).cpu()


reference = logits(model, "cpu")  # the C kernels
calls = {"linear_w4a16": 0, "decode_attention": 0}
if device == "cpu":  # the CUDA path's kernels on CPU tensors: Triton (interpreted) and the torch attention
    from nvfp4.kernels import attention, ops

    def counted(name, fn):
        def run(*args):
            calls[name] += 1
            return fn(*args)
        return run

    lib = torch.library.Library("nvfp4", "IMPL")
    lib.impl("linear_w4a16", counted("linear_w4a16", ops._linear_cuda), "CPU")
    lib.impl("decode_attention", counted("decode_attention", attention.decode_attention_torch), "CPU")
    got = logits(model, "cpu")
else:
    got = logits(model.to(device), device)
print(json.dumps({"max_rel": float((got - reference).abs().max() / reference.abs().max()), "calls": calls}))
"""


def run_checks(device: str, script: str = CHECKS) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1" if device == "cpu" else "0"}
    done = subprocess.run(
        [sys.executable, "-P", "-c", script, device], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_results(results: dict) -> None:
    for row in results["quant"]:
        assert row["packed"] and row["scales"] and row["fake_quant"], row
    assert len(results["quant"]) == 15  # 5 shapes x 3 dtypes, one all-underflowed case skipped, + ties
    assert len(results["learned"]) == 6
    for row in results["learned"]:
        assert row["fake_quant"] and row["grad_x"] and row["held"], row
        assert row["grad_log_rel"] <= 1e-5, row  # the same products, summed over each block in another order
    assert len(results["gemm"]) == 18
    for row in results["gemm"]:
        assert row["out_dtype"] == row["dtype"], row
        assert row["within_ulp"], row
        if row["dtype"] == "torch.float32":
            assert row["max_rel"] <= 1e-5, row
        else:  # bf16 output rounding alone is ~50 dB
            assert row["sqnr"] >= 40.0, row


def test_triton_kernels_match_reference_under_interpreter():
    assert_results(run_checks("cpu"))


@pytest.mark.gpu
def test_triton_kernels_match_reference_on_cuda():
    assert_results(run_checks("cuda"))


def test_native_engine_cuda_path_under_interpreter():
    """`nvfp4 serve --device cuda`'s kernels (Triton W4A16 for prompts and decode rows, the torch decode attention)
    in the native engine's forward, on CPU tensors: the logits of a prefill and a decode step = the C kernels'."""
    result = run_checks("cpu", ENGINE)
    assert result["calls"] == {"linear_w4a16": 2 * 2 * 4, "decode_attention": 2}  # 2 steps x 2 layers x 4 linears
    assert result["max_rel"] < 1e-4


@pytest.mark.gpu
def test_native_engine_on_cuda():
    assert run_checks("cuda", ENGINE)["max_rel"] < 1e-2  # fp32 tl.dot may run as TF32 on the GPU


@pytest.mark.gpu
def test_dispatch_uses_triton_on_cuda(monkeypatch):
    """On CUDA tensors kernels.ops runs the Triton kernels: the torch reference is made to fail after it
    computed the expected values on CPU copies."""
    from nvfp4.kernels import numerics as nv
    from nvfp4.kernels import ops

    w = torch.randn(64, 128, device="cuda")
    gscale = nv.global_scale(nv.tensor_amax(w))
    scales = nv.block_scales(w, gscale)
    cpu_w, cpu_gscale, cpu_scales = w.cpu(), gscale.cpu(), scales.cpu()
    expected_packed = nv.quantize_ref(cpu_w, cpu_gscale)[0]
    expected_amax, expected_given = (
        nv.fake_quantize_ref(cpu_w, cpu_gscale),
        nv.fake_quantize_ref(cpu_w, cpu_gscale, cpu_scales),
    )
    log_scales = scales.float().log().requires_grad_(True)
    expected_x, expected_log = nv.scale_gradient_ref(
        cpu_w, torch.ones(64, 128), log_scales.detach().exp().cpu(), cpu_gscale
    )

    def reference_ran(*args, **kwargs):
        raise AssertionError("the torch reference ran on CUDA tensors")

    for name in ("quantize_ref", "fake_quantize_ref", "scale_gradient_ref"):
        monkeypatch.setattr(ops.ref, name, reference_ran)
    assert torch.equal(ops.quantize(w, gscale)[0].cpu(), expected_packed)
    assert torch.equal(ops.fake_quantize(w, gscale).cpu(), expected_amax)
    assert torch.equal(ops.fake_quantize(w, gscale, scales).cpu(), expected_given)
    weight = w.clone().requires_grad_(True)
    ops.fake_quantize_learned(weight, gscale, log_scales).sum().backward()
    assert torch.equal(weight.grad.cpu(), expected_x)
    torch.testing.assert_close(
        log_scales.grad.cpu(), expected_log, rtol=1e-5, atol=1e-6 * expected_log.abs().max().item()
    )
