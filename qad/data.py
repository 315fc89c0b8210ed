"""Token sequences for QAD: the teacher's own sampled answers (`self`), uniform random tokens, or a file."""

import random
from pathlib import Path

import torch
from torch import Tensor, nn

from nvfp4.converter.calibration import chat_prompt_ids, read_text_file
from nvfp4.converter.generate import generate_batch, pad_and_eos
from nvfp4.errors import UserError

PROMPTS = Path(__file__).parent / "data" / "prompts.txt"


def _fixed_length(sequences: list[list[int]], seq_len: int) -> Tensor:
    """Concatenate and cut into rows of seq_len (no padding inside a row)."""
    stream = [t for s in sequences for t in s]
    rows = len(stream) // seq_len
    if rows == 0:
        raise UserError(f"QAD data holds {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)


class TeacherSamples:
    """Fresh teacher answers to the shipped chat prompts, generated in rounds as training needs them.

    Sampled at temperature 0.7 (as the calibration answers are): closer to the answers the model
    gives in use than T=1 draws (held-out chat KL after the default pass 0.138 vs 0.146 of 0.249).
    A round answers 64 prompts at once: on CPU a decode step of 64 rows costs ~1.6x one of 32
    (the weights are read once per step), so rounds of 64 sample ~1.35x more rows per second.
    """

    TEMPERATURE = 0.7

    def __init__(self, teacher: nn.Module, tokenizer, seq_len: int, seed: int, batch: int = 64):
        self.teacher, self.tokenizer, self.seq_len, self.batch = teacher, tokenizer, seq_len, batch
        self.prompts = chat_prompt_ids(tokenizer, [p for p in PROMPTS.read_text().splitlines() if p.strip()])
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def rows(self) -> Tensor:
        """One round: `batch` prompts, each answered up to seq_len tokens; -> [n, seq_len] rows."""
        chosen = [self.rng.choice(self.prompts) for _ in range(self.batch)]
        new_tokens = max(8, self.seq_len - min(len(p) for p in chosen))
        answers = generate_batch(
            self.teacher, chosen, new_tokens, *pad_and_eos(self.tokenizer), self.generator, temperature=self.TEMPERATURE
        )
        return _fixed_length([p + a for p, a in zip(chosen, answers)], self.seq_len)


def random_rows(vocab_size: int, count: int, seq_len: int, seed: int) -> Tensor:
    return torch.randint(0, vocab_size, (count, seq_len), generator=torch.Generator().manual_seed(seed))


def file_rows(path: Path, tokenizer, seq_len: int) -> Tensor:
    documents = read_text_file(Path(path), tokenizer)
    return _fixed_length(documents, seq_len)
