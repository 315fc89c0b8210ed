"""Held-out accuracy of students against their teacher: the numbers the report and `nvfp4 eval` print.

Material (converter/data/heldout_*) is never used for calibration or QAD data:
- chat: the teacher's own greedy answers to held-out prompts; mean token KL(teacher || student)
  and top-1 agreement over the answer tokens;
- prose: plain text; KL, top-1 and perplexity;
- greedy: how much of the teacher's first 32 greedy tokens the student reproduces (common prefix).
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from converter.calibration import chat_prompt_ids
from converter.generate import generate_batch, pad_and_eos

_DATA = Path(__file__).parent / "data"
METRICS = ("chat_kl", "prose_kl", "chat_top1", "prose_top1", "greedy_agreement", "prose_ppl")
_TOKEN_CHUNK = 256


@dataclass
class EvalSet:
    chat: list[tuple[Tensor, int]]  # (ids [1, L], prompt length): teacher's greedy answers
    prose: list[Tensor]  # ids [1, L]
    greedy_prompts: list[list[int]]
    teacher_greedy: list[list[int]]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _greedy_answers(model: nn.Module, prompts: list[list[int]], new_tokens: int, tokenizer) -> list[list[int]]:
    return generate_batch(model, prompts, new_tokens, *pad_and_eos(tokenizer))


def build_eval_set(teacher: nn.Module, tokenizer, answer_tokens: int = 64, greedy_tokens: int = 32,
                   prose_tokens: int = 256) -> EvalSet:
    prompts = chat_prompt_ids(tokenizer, (_DATA / "heldout_chat_prompts.txt").read_text().splitlines())
    answers = _greedy_answers(teacher, prompts, answer_tokens, tokenizer)
    chat = [(torch.tensor([p + a]), len(p)) for p, a in zip(prompts, answers)]
    prose_ids = tokenizer((_DATA / "heldout_prose.txt").read_text(), add_special_tokens=False)["input_ids"]
    prose = [torch.tensor([prose_ids[i : i + prose_tokens]]) for i in range(0, len(prose_ids) - 16, prose_tokens)]
    return EvalSet(chat, prose, prompts, [a[:greedy_tokens] for a in answers])


def token_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Per-token KL(teacher || student) at T=1, computed in chunks of tokens: [T, V] x 2 -> [T]."""
    out = []
    for t, s in zip(teacher_logits.split(_TOKEN_CHUNK), student_logits.split(_TOKEN_CHUNK)):
        log_p, log_q = F.log_softmax(t.float(), -1), F.log_softmax(s.float(), -1)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(out)


@torch.no_grad()
def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(ids.to(_device(model))).logits[0].float()


@contextmanager
def frozen_fake_quant(model: nn.Module):
    """Fake-quantize each weight once for the whole evaluation instead of on every forward."""
    modules = [m for m in model.modules() if hasattr(m, "quantized_weight") and hasattr(m, "weight_gscale")]
    for module in modules:
        cached = module.quantized_weight().detach()
        module.quantized_weight = lambda cached=cached: cached
    try:
        yield model
    finally:
        for module in modules:
            del module.quantized_weight


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.no_grad()
def evaluate_one(teacher: nn.Module, student: nn.Module, data: EvalSet, tokenizer) -> dict[str, float]:
    kl, top1, prose_kl, prose_top1, nll, prose_count = [], [], [], [], 0.0, 0
    for ids, prompt_len in data.chat:
        t, s = _logits(teacher, ids)[prompt_len - 1 : -1], _logits(student, ids)[prompt_len - 1 : -1]
        kl.append(token_kl(t, s))
        top1.append((t.argmax(-1) == s.argmax(-1)).float())
    for ids in data.prose:
        t, s = _logits(teacher, ids)[:-1], _logits(student, ids)[:-1]
        prose_kl.append(token_kl(t, s))
        prose_top1.append((t.argmax(-1) == s.argmax(-1)).float())
        nll += F.cross_entropy(s, ids[0, 1:].to(s.device), reduction="sum").item()
        prose_count += ids.shape[1] - 1
    answers = _greedy_answers(student, data.greedy_prompts, max(len(r) for r in data.teacher_greedy), tokenizer)
    agreement = [_common_prefix(a, ref) / max(1, len(ref)) for a, ref in zip(answers, data.teacher_greedy)]
    return {
        "chat_kl": torch.cat(kl).mean().item(),
        "prose_kl": torch.cat(prose_kl).mean().item(),
        "chat_top1": torch.cat(top1).mean().item(),
        "prose_top1": torch.cat(prose_top1).mean().item(),
        "greedy_agreement": sum(agreement) / len(agreement),
        "prose_ppl": float(torch.tensor(nll / prose_count).exp()),
    }


def evaluate(teacher: nn.Module, students: dict[str, nn.Module], tokenizer, data: EvalSet | None = None,
             teacher_name: str = "BF16") -> dict[str, dict[str, float]]:
    """Metrics for the teacher itself (KL 0) and each student, keyed by row name."""
    data = data or build_eval_set(teacher, tokenizer)
    results = {}
    for name, model in {teacher_name: teacher, **students}.items():
        with frozen_fake_quant(model):
            results[name] = evaluate_one(teacher, model, data, tokenizer)
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    width = max(14, 2 + max(map(len, results)))  # output folder names as row names stay aligned
    header = f"{'model':<{width}}{'chat KL':>10}{'prose KL':>10}{'chat top1':>11}{'prose top1':>11}{'greedy@32':>11}{'prose PPL':>11}"
    rows = [header, "-" * len(header)]
    for name, m in results.items():
        rows.append(f"{name:<{width}}{m['chat_kl']:>10.4f}{m['prose_kl']:>10.4f}{m['chat_top1']:>11.3f}"
                    f"{m['prose_top1']:>11.3f}{m['greedy_agreement']:>11.3f}{m['prose_ppl']:>11.2f}")
    return "\n".join(rows)
