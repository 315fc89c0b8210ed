"""What one request may ask for, and how many choices each model takes in at once (every engine alike)."""

from __future__ import annotations

from dataclasses import dataclass

from nvfp4.serve.interface import QueueFull


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 * 2**20  # 413 above it, before the JSON is parsed
    max_choices: int = 64  # prompts x n per request
    max_stop_chars: int = 256  # per stop string
    max_num_seqs: int = 16  # generating at once, per model
    max_queue: int = 256  # waiting behind them, per model; 429 with Retry-After beyond


class Admission:
    """One model's admission control in front of its engine: at most max_num_seqs + max_queue choices in
    flight; a request takes all its choices or none (429)."""

    def __init__(self, name: str, limits: Limits):
        self.name, self.capacity, self.in_flight = name, limits.max_num_seqs + limits.max_queue, 0

    def take(self, choices: int) -> None:
        if self.in_flight + choices > self.capacity:
            raise QueueFull(
                f"`{self.name}` is at capacity ({self.in_flight} of {self.capacity} choices in flight); retry later"
            )
        self.in_flight += choices

    def give_back(self, choices: int) -> None:
        self.in_flight -= choices
