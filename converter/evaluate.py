"""Held-out accuracy of students against their teacher: the numbers the report and `nvfp4 eval` print.

Material (converter/data/heldout_*) is never used for calibration or QAD data:
- chat: the teacher's own greedy answers to held-out prompts; mean token KL(teacher || student)
  and top-1 agreement over the answer tokens;
- prose: plain text; KL, top-1 and perplexity;
- greedy: how much of the teacher's first 32 greedy tokens the student reproduces (common prefix).
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nvfp4.converter.calibration import chat_prompt_ids
from nvfp4.converter.generate import generate_batch, pad_and_eos
from nvfp4.kernels.kl import token_kl
from nvfp4.kernels.linear import NVFP4FakeQuantLinear, frozen

_DATA = Path(__file__).parent / "data"
METRICS = ("chat_kl", "prose_kl", "chat_top1", "prose_top1", "greedy_agreement", "prose_ppl")


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


def build_eval_set(
    teacher: nn.Module, tokenizer, answer_tokens: int = 64, greedy_tokens: int = 32, prose_tokens: int = 256
) -> EvalSet:
    prompts = chat_prompt_ids(tokenizer, (_DATA / "heldout_chat_prompts.txt").read_text().splitlines())
    answers = _greedy_answers(teacher, prompts, answer_tokens, tokenizer)
    chat = [(torch.tensor([p + a]), len(p)) for p, a in zip(prompts, answers)]
    return EvalSet(chat, prose_samples(tokenizer, prose_tokens), prompts, [a[:greedy_tokens] for a in answers])


def prose_samples(tokenizer, prose_tokens: int = 256) -> list[Tensor]:
    """The held-out prose cut into samples ids [1, L]."""
    prose_ids = tokenizer((_DATA / "heldout_prose.txt").read_text(), add_special_tokens=False)["input_ids"]
    return [torch.tensor([prose_ids[i : i + prose_tokens]]) for i in range(0, len(prose_ids) - 16, prose_tokens)]


@contextmanager
def frozen_fake_quant(model: nn.Module):
    """Fake-quantize each weight once for the whole evaluation instead of on every forward."""
    with frozen(m for m in model.modules() if isinstance(m, NVFP4FakeQuantLinear)):
        yield model


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.no_grad()
def _padded_logits(model: nn.Module, samples: list[Tensor]) -> list[Tensor]:
    """Logits [L, V] of each sample from one right-padded forward: causal attention never lets a
    position see the padding after it, so each sample's logits are its own."""
    width = max(ids.shape[1] for ids in samples)
    batch = torch.zeros(len(samples), width, dtype=torch.long)
    for row, ids in enumerate(samples):
        batch[row, : ids.shape[1]] = ids[0]
    logits = model(batch.to(_device(model))).logits
    return [logits[row, : ids.shape[1]].float() for row, ids in enumerate(samples)]


def _batches(samples: list[Tensor], max_tokens: int = 512) -> list[list[Tensor]]:
    """Consecutive samples grouped so that a batch's padded [rows, width] holds at most max_tokens."""
    batches: list[list[Tensor]] = []
    for ids in samples:
        grown = (batches[-1] if batches else []) + [ids]
        if batches and len(grown) * max(x.shape[1] for x in grown) <= max_tokens:
            batches[-1] = grown
        else:
            batches.append([ids])
    return batches


class _Scores:
    """One row's running sums over the held-out samples."""

    def __init__(self) -> None:
        self.kl: dict[str, list[Tensor]] = {"chat": [], "prose": []}
        self.top1: dict[str, list[Tensor]] = {"chat": [], "prose": []}
        self.nll, self.prose_tokens, self.seconds = 0.0, 0, 0.0

    def add(self, kind: str, teacher: Tensor, student: Tensor, targets: Tensor | None = None) -> None:
        self.kl[kind].append(token_kl(teacher, student))
        self.top1[kind].append((teacher.argmax(-1) == student.argmax(-1)).float())
        if targets is not None:
            self.nll += F.cross_entropy(student, targets.to(student.device), reduction="sum").item()
            self.prose_tokens += len(targets)

    def metrics(self, agreement: float) -> dict[str, float]:
        return {
            "chat_kl": torch.cat(self.kl["chat"]).mean().item(),
            "prose_kl": torch.cat(self.kl["prose"]).mean().item(),
            "chat_top1": torch.cat(self.top1["chat"]).mean().item(),
            "prose_top1": torch.cat(self.top1["prose"]).mean().item(),
            "greedy_agreement": agreement,
            "prose_ppl": float(torch.tensor(self.nll / self.prose_tokens).exp()),
        }


def evaluate(
    teacher: nn.Module,
    students: dict[str, nn.Module],
    tokenizer,
    data: EvalSet | None = None,
    teacher_name: str | None = "BF16",
    seconds: dict[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics for the teacher itself (KL 0; left out when `teacher_name` is None) and each student, keyed
    by row name. The teacher runs once per batch of samples for all rows; `seconds`, when given, receives
    each row's own time and the teacher's ("teacher")."""
    data = data or build_eval_set(teacher, tokenizer)
    rows = ({teacher_name: teacher} if teacher_name else {}) | students
    scores = {name: _Scores() for name in rows}
    teacher_seconds = 0.0
    for kind, samples in (("chat", [ids for ids, _ in data.chat]), ("prose", data.prose)):
        starts = [prompt_len - 1 for _, prompt_len in data.chat] if kind == "chat" else [0] * len(samples)
        offset = 0
        for batch in _batches(samples):
            began = time.perf_counter()
            reference = _padded_logits(teacher, batch)
            teacher_seconds += time.perf_counter() - began
            for name, model in rows.items():
                began = time.perf_counter()
                logits = reference if model is teacher else _padded_logits(model, batch)
                for i, (ids, t, s) in enumerate(zip(batch, reference, logits)):
                    first = starts[offset + i]
                    scores[name].add(kind, t[first:-1], s[first:-1], ids[0, first + 1 :] if kind == "prose" else None)
                scores[name].seconds += time.perf_counter() - began
            offset += len(batch)
    results = {}
    for name, model in rows.items():
        began = time.perf_counter()
        if model is teacher:  # its greedy answers are the reference itself
            answers = data.teacher_greedy
        else:
            with frozen_fake_quant(model):
                answers = _greedy_answers(
                    model, data.greedy_prompts, max(len(r) for r in data.teacher_greedy), tokenizer
                )
        agreement = [_common_prefix(a, ref) / max(1, len(ref)) for a, ref in zip(answers, data.teacher_greedy)]
        results[name] = scores[name].metrics(sum(agreement) / len(agreement))
        scores[name].seconds += time.perf_counter() - began
    if seconds is not None:
        seconds.update(
            {name: round(score.seconds, 2) for name, score in scores.items()}, teacher=round(teacher_seconds, 2)
        )
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    width = max(14, 2 + max(map(len, results)))  # output folder names as row names stay aligned
    header = f"{'model':<{width}}{'chat KL':>10}{'prose KL':>10}{'chat top1':>11}{'prose top1':>11}{'greedy@32':>11}{'prose PPL':>11}"
    rows = [header, "-" * len(header)]
    for name, m in results.items():
        rows.append(
            f"{name:<{width}}{m['chat_kl']:>10.4f}{m['prose_kl']:>10.4f}{m['chat_top1']:>11.3f}"
            f"{m['prose_top1']:>11.3f}{m['greedy_agreement']:>11.3f}{m['prose_ppl']:>11.2f}"
        )
    return "\n".join(rows)
