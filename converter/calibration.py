"""Token batches for W4A4 activation calibration: the teacher's own answers, random tokens, or a file."""

import json
from pathlib import Path

import torch
from torch import Tensor

from nvfp4.converter.generate import generate_batch, pad_and_eos
from nvfp4.errors import UserError

_PROMPTS = Path(__file__).parent / "data" / "calibration_prompts.txt"


def chat_prompt_ids(tokenizer, user_messages: list[str]) -> list[list[int]]:
    """Token ids of each message rendered with the model's chat template (generation prompt added); a base
    model without a chat template gets the message as plain text to continue (with its BOS, if it adds one)."""
    if not getattr(tokenizer, "chat_template", None):
        return [tokenizer(m)["input_ids"] for m in user_messages]
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True, tokenize=False)
        for m in user_messages
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]


def read_text_file(path: Path, tokenizer) -> list[list[int]]:
    """Token ids of a .txt file (one document) or JSONL with a `text` or `messages` field per line."""
    if not path.is_file():
        raise UserError(f"data file does not exist: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if not raw.strip():
        raise UserError(f"data file is empty: {path}")
    if path.suffix not in (".jsonl", ".json"):
        return [tokenizer(raw, add_special_tokens=False)["input_ids"]]
    documents = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            text = record["text"]
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            if not getattr(tokenizer, "chat_template", None):
                raise UserError(
                    f"{path}:{number}: `messages` need a chat template, and the model has none; give `text`"
                )
            text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        else:
            raise UserError(f"{path}:{number}: expected a `text` string or a `messages` list")
        documents.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return documents


def _pack(documents: list[list[int]], seq_len: int, total_tokens: int) -> list[Tensor]:
    stream = [t for doc in documents for t in doc]
    if not stream:
        raise UserError("calibration data holds no tokens")
    while len(stream) < total_tokens:
        stream = stream + stream
    return [torch.tensor(stream[i : i + seq_len]).unsqueeze(0) for i in range(0, total_tokens, seq_len)]


def _teacher_answers(model, tokenizer, total_tokens: int, seed: int) -> list[list[int]]:
    prompts = chat_prompt_ids(tokenizer, _PROMPTS.read_text().splitlines())
    new_tokens = max(16, total_tokens // len(prompts))
    answers = generate_batch(
        model, prompts, new_tokens, *pad_and_eos(tokenizer), torch.Generator().manual_seed(seed), temperature=0.7
    )
    return [p + a for p, a in zip(prompts, answers)]


def calibration_batches(
    source: str, model, tokenizer, total_tokens: int, seed: int, seq_len: int = 256
) -> list[Tensor]:
    """`self` (teacher's sampled answers to shipped prompts), `prompts` (those prompts alone), `random` (uniform
    tokens) or a file PATH."""
    if total_tokens <= 0:
        raise UserError(f"--calib-tokens must be positive, got {total_tokens}")
    if source == "random":
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (total_tokens,), generator=generator)
        return [chunk.unsqueeze(0) for chunk in ids.split(seq_len)]
    if source == "self":
        return _pack(_teacher_answers(model, tokenizer, total_tokens, seed), seq_len, total_tokens)
    if source == "prompts":
        return _pack(chat_prompt_ids(tokenizer, _PROMPTS.read_text().splitlines()), seq_len, total_tokens)
    return _pack(read_text_file(Path(source), tokenizer), seq_len, total_tokens)
