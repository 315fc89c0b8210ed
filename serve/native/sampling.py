"""Per-request sampling: penalties, min_tokens, temperature, top-k, top-p, seeded draws, logprobs."""

import torch
from torch import Tensor

from nvfp4.serve.interface import SamplingParams


def make_generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed % 2**63)


def apply_penalties(logits: Tensor, params: SamplingParams, history: list[int], banned: list[int],
                    generated: list[int] = ()) -> Tensor:
    """Repetition penalty (HF/vLLM rule) on every token seen so far; presence and frequency penalties (OpenAI's
    rule) on the generated ones; `banned` (EOS before min_tokens) to -inf."""
    if params.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated:
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    if banned:
        logits[torch.tensor(banned, dtype=torch.long)] = -float("inf")
    return logits


def choose(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [vocab] fp32 (already penalised) -> token id."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """Logprob of `token` under the model's distribution and the `top` most likely alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives = []
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(logprobs[token]), alternatives
