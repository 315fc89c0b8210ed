"""The Writer base class: one subclass per export target, registered by name (`Writer.targets["gguf"]`)."""

import threading
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from nvfp4.converter.config import QuantConfig


# Writers may run in parallel threads on one student and one tokenizer; a fast tokenizer's backend
# is not safe to use from two threads at once (encode() reconfigures truncation/padding).
TOKENIZER_LOCK = threading.Lock()


class Writer:
    """Writes a quantized student (a model holding NVFP4FakeQuantLinear modules) as one target.

    `write` fills `out` (an empty folder the caller created, usually inside a temporary directory
    that is renamed into place at the end) and returns the path of the main artefact.
    """

    targets: ClassVar[dict[str, type["Writer"]]] = {}
    target: ClassVar[str]

    def __init_subclass__(cls, target: str, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.target = target
        Writer.targets[target] = cls

    def __init__(self, cfg: QuantConfig, dtype: torch.dtype = torch.bfloat16):
        self.cfg = cfg
        self.dtype = dtype  # for the tensors left unquantized

    def check(self, model: nn.Module, tokenizer, linears: dict[str, nn.Linear]) -> None:
        """Refuse, before any calibration or training, a model this target cannot hold (a UserError naming
        what); `linears` are those that will be quantized."""

    def write(self, student: nn.Module, tokenizer, source_dir: Path, out: Path) -> Path:
        raise NotImplementedError
