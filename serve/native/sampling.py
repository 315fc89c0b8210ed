"""Per-request sampling: penalties, min_tokens, temperature, top-k, top-p, seeded draws, logprobs."""

import torch
from torch import Tensor

from nvfp4.serve.interface import SamplingParams


def make_generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed % 2**63)


def apply_penalties(
    logits: Tensor, params: SamplingParams, history: list[int], banned: list[int], generated: list[int] = ()
) -> Tensor:
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


def needs_penalties(params: SamplingParams, banned: list[int]) -> bool:
    return bool(banned) or params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [B, vocab] fp32 (already penalised), one row per sequence -> one token per row, on tensors: the
    greedy rows by one argmax; the sampled rows by temperature, then top-k and top-p (sorted) for the rows that
    ask for them, and one uniform draw per row from its own generator. Each row is computed the same whatever
    the batch, so a seeded request draws the same tokens alone or beside others."""
    tokens = logits.argmax(-1)
    vocab = logits.shape[-1]
    filtered = [i for i, p in enumerate(params) if p.temperature != 0 and (0 < p.top_k < vocab or p.top_p < 1.0)]
    plain = [i for i, p in enumerate(params) if p.temperature != 0 and i not in filtered]
    for rows, sort in ((plain, False), (filtered, True)):
        if rows:
            tokens[rows] = _draw(logits[rows], [params[i] for i in rows], [generators[i] for i in rows], sort)
    return tokens.tolist()


def _draw(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None], sort: bool) -> Tensor:
    device, vocab = logits.device, logits.shape[-1]
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    order = None
    if sort:
        logits, order = logits.sort(dim=-1, descending=True)
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
        logits = logits.masked_fill(torch.arange(vocab, device=device)[None, :] >= top_k[:, None], -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if sort:
        top_p = torch.tensor([p.top_p for p in params], device=device)
        probs = probs.masked_fill(
            probs.cumsum(-1) - probs > top_p[:, None], 0.0
        )  # keep the smallest set reaching top_p
    cdf = probs.cumsum(-1)
    draws = torch.stack([torch.rand((), generator=g) for g in generators]).to(device)
    picks = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp_(max=vocab - 1)
    return picks[:, 0] if order is None else order.gather(-1, picks)[:, 0]


def token_logprobs(logits: Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """Logprob of `token` under the model's distribution and the `top` most likely alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives = []
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(logprobs[token]), alternatives
