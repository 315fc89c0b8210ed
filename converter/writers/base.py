"""The Writer base class: one subclass per export target, registered by name (`Writer.targets["gguf"]`).

A writer is fed the student as a stream of entries, one decoder layer after another: every tensor the
export keeps, a quantized linear as its packed NVFP4 weight. It lays out its files from the entries'
names and shapes alone (`begin`), before any value exists, so that a model larger than memory is
written while its layers stream through (converter/layerwise.py), and an in-memory student through
the same code (`write`): the same bytes either way.
"""

import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from nvfp4.converter.config import QuantConfig
from nvfp4.converter.quantize import export_weights
from nvfp4.kernels.linear import NVFP4FakeQuantLinear, PackedWeight

# Writers may run in parallel threads on one student and one tokenizer; a fast tokenizer's backend
# is not safe to use from two threads at once (encode() reconfigures truncation/padding).
TOKENIZER_LOCK = threading.Lock()
QUANT_BUFFERS = ("weight_gscale", "block_scales", "input_gscale", "log_block_scales")


@dataclass(frozen=True)
class Entry:
    """One item of the export stream: a tensor kept as it is, or a quantized linear (its packed weight)."""

    name: str  # the tensor's name, or the quantized linear's module name (the model's own names)
    shape: tuple[int, ...]  # the tensor's, or the linear's weight [out, in]
    dtype: torch.dtype  # the tensor's own dtype (a packed linear: its weight's)
    packed: bool = False
    input_scale: bool = False  # a packed linear that quantizes its input (W4A4)

    @property
    def layer(self) -> int | None:
        parts = self.name.split(".")
        return next(
            (int(parts[i + 1]) for i, p in enumerate(parts[:-1]) if p == "layers" and parts[i + 1].isdigit()), None
        )


def entries(model: nn.Module, quantized: dict[str, bool]) -> list[Entry]:
    """The export stream of `model` (real or on the meta device) in state-dict order, i.e. embeddings, then
    layer by layer, then the final norm and head. `quantized`: module name -> whether it quantizes its input.
    A tied head is left out (it is the embedding); so are our quantizers' own buffers."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    stream = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        module, _, leaf = name.rpartition(".")
        if tied and name == "lm_head.weight" or module in quantized and leaf in QUANT_BUFFERS:
            continue
        if module in quantized and leaf == "weight":
            stream.append(Entry(module, tuple(tensor.shape), tensor.dtype, packed=True, input_scale=quantized[module]))
        else:
            stream.append(Entry(name, tuple(tensor.shape), tensor.dtype))
    return stream


def student_entries(student: nn.Module) -> list[Entry]:
    return entries(
        student,
        {
            n: m.quantize_input and m.input_gscale is not None
            for n, m in student.named_modules()
            if isinstance(m, NVFP4FakeQuantLinear)
        },
    )


_EXPORTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, PackedWeight]]]" = weakref.WeakKeyDictionary()


def _fingerprint(student: nn.Module) -> tuple:
    """Changes whenever a quantized weight, block scale or input scale is replaced or edited in place."""
    state = []
    for name, module in student.named_modules():
        if isinstance(module, NVFP4FakeQuantLinear):
            tensors = (module.weight, module.weight_gscale, module.block_scales, module.input_gscale)
            state.append(
                (
                    name,
                    module.quantize_input,
                    *((None, None) if t is None else (t.data_ptr(), t._version) for t in tensors),
                )
            )
    return tuple(state)


def packed_weights(student: nn.Module) -> dict[str, PackedWeight]:
    """`export_weights(student)`, computed once for all the targets written from the same student state."""
    key = _fingerprint(student)
    cached = _EXPORTS.get(student)
    if cached is None or cached[0] != key:
        cached = _EXPORTS[student] = (key, export_weights(student))
    return cached[1]


def student_values(student: nn.Module, stream: list[Entry]) -> Iterator[Tensor | PackedWeight]:
    """The value of every entry of an in-memory student, in order (packed weights computed once)."""
    packed, state = packed_weights(student), student.state_dict()
    for entry in stream:
        yield packed[entry.name] if entry.packed else state[entry.name].detach()


class Writer:
    """Writes a quantized student as one target: `begin` (files laid out from the entries), `add` every
    entry's value in order, `finish` (-> the main artefact's path). `write` does all three for a student
    held in memory. `out` is an empty folder the caller created, usually inside a temporary directory
    renamed into place at the end."""

    targets: ClassVar[dict[str, type["Writer"]]] = {}
    target: ClassVar[str]

    def __init_subclass__(cls, target: str | None, **kwargs):
        super().__init_subclass__(**kwargs)
        if target is not None:  # None: a base shared by targets
            cls.target = target
            Writer.targets[target] = cls

    def __init__(self, cfg: QuantConfig, dtype: torch.dtype = torch.bfloat16):
        self.cfg = cfg
        self.dtype = dtype  # for the tensors left unquantized

    def check(self, model: nn.Module, tokenizer, linears: dict[str, nn.Linear]) -> None:
        """Refuse, before any calibration or training, a model this target cannot hold (a UserError naming
        what); `linears` are those that will be quantized."""

    def begin(self, model: nn.Module, tokenizer, source_dir: Path, out: Path, stream: list[Entry]) -> None:
        """`model` gives the config and module types (it may be on the meta device)."""
        raise NotImplementedError

    def add(self, entry: Entry, value: Tensor | PackedWeight) -> None:
        raise NotImplementedError

    def finish(self) -> Path:
        raise NotImplementedError

    def write(self, student: nn.Module, tokenizer, source_dir: Path, out: Path) -> Path:
        stream = student_entries(student)
        self.begin(student, tokenizer, source_dir, out, stream)
        for entry, value in zip(stream, student_values(student, stream)):
            self.add(entry, value)
        return self.finish()
