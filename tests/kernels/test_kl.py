"""Per-token KL (kernels/kl.py): the C pass and the torch formula against a float64 oracle, value and gradient."""

import pytest
import torch

from nvfp4.kernels import cpu
from nvfp4.kernels.kl import token_kl, token_kl_ref

VOCABS = [37, 1000, 49152]  # 37: no full 8-lane vector, a scalar tail; 49152: the default model's vocabulary


def oracle(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    log_p, log_q = torch.log_softmax(t.double(), -1), torch.log_softmax(s.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def logits_pair(rows: int, vocab: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(vocab)
    t = torch.randn(rows, vocab) * spread
    return t, t + torch.randn(rows, vocab) * spread / 3


@pytest.mark.parametrize("kl", [token_kl, token_kl_ref], ids=["c", "torch"])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("spread", [1.0, 10.0])
def test_kl_and_gradient_match_float64(kl, vocab, spread):
    t, s = logits_pair(300, vocab, spread)  # 300 rows: the reference's chunks of 256, the last one short
    student = s.clone().requires_grad_(True)
    weights = torch.rand(300)
    value = kl(t, student)
    (value * weights).sum().backward()
    s64 = s.double().requires_grad_(True)
    expected = oracle(t, s64)
    (expected * weights.double()).sum().backward()
    assert ((value.double() - expected).abs() - 1e-4 * expected).max() < 1e-5
    assert (student.grad.double() - s64.grad).abs().max() < 1e-6


def test_c_kernel_is_the_cpu_path_and_more_exact_than_torch():
    assert cpu.available()
    t, s = logits_pair(64, 49152, 3.0)
    expected = oracle(t, s)
    c_error = (token_kl(t, s).double() - expected).abs().max()
    assert c_error < (token_kl_ref(t, s).double() - expected).abs().max()
    assert c_error < 1e-5


def test_kl_of_identical_logits_is_zero_and_no_grad_computes_no_gradient():
    t, _ = logits_pair(10, 1000, 5.0)
    assert token_kl(t, t).abs().max() < 1e-6
    kl, grad = cpu.kl_rows(t, t + 1.0, with_grad=False)  # a shift does not change the softmax
    assert grad is None and kl.abs().max() < 1e-6
