"""Per-token KL(teacher || student) at T=1 over the vocabulary: QAD's loss and the evaluation's metric.

On CPU (fp32) one C pass per row gives the KL and, when the student needs a gradient, softmax(s) -
softmax(t) with it; elsewhere the torch formula, over chunks of tokens to bound its temporaries.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from nvfp4.kernels import cpu

TOKEN_CHUNK = 256


def token_kl_ref(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """[T, V] x 2 -> [T]: sum_v p (log p - log q), p = softmax(teacher), q = softmax(student)."""
    out = []
    for t, s in zip(teacher_logits.split(TOKEN_CHUNK), student_logits.split(TOKEN_CHUNK)):
        log_p, log_q = F.log_softmax(t.float(), -1), F.log_softmax(s.float(), -1)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(out)


class _KLRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
        kl, grad = cpu.kl_rows(teacher_logits, student_logits, with_grad=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: Tensor) -> tuple[None, Tensor]:
        (grad,) = ctx.saved_tensors
        return None, grad.mul_(grad_kl.unsqueeze(-1))  # the saved buffer is used this once


def _use_c(teacher_logits: Tensor, student_logits: Tensor) -> bool:
    return (
        student_logits.device.type == "cpu"
        and teacher_logits.dtype == student_logits.dtype == torch.float32
        and student_logits.dim() == 2
        and cpu.available()
        and not teacher_logits.requires_grad
    )


def token_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Per-token KL(teacher || student) [T] of logits [T, V]; differentiable w.r.t. the student's."""
    if _use_c(teacher_logits, student_logits):
        return _KLRows.apply(teacher_logits.detach(), student_logits)
    return token_kl_ref(teacher_logits, student_logits)
