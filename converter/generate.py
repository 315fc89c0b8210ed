"""Batched KV-cache decoding for the tool's own data (calibration, QAD samples, evaluation).

Left-padded prompts advance together, one forward per new token for the whole batch: several times
faster on CPU than calling transformers' `generate` per prompt.
"""

import torch
from torch import nn


@torch.no_grad()
def generate_batch(model: nn.Module, prompts: list[list[int]], new_tokens: int, pad_id: int, eos_id: int | None,
                   generator: torch.Generator | None = None, temperature: float = 1.0) -> list[list[int]]:
    """Answers (without the prompts) to every prompt: greedy when `generator` is None, else sampled."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    step_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    cache, answers = DynamicCache(), [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        logits = model(step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits[:, -1]
        if generator is None:
            tokens = logits.argmax(-1).cpu()
        else:
            tokens = torch.multinomial(torch.softmax(logits.float() / temperature, -1).cpu(), 1, generator=generator).squeeze(1)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                answers[row].append(token)
                done[row] = token == eos_id
        if all(done):
            break
        step_ids = tokens.unsqueeze(1).to(device)
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=device)], dim=1)
    return answers
