"""ConvertRecipe: everything that decides a convert's bytes, apart from the model and where it runs — the
quantization, the calibration, the targets and the training stage's settings. Written into OUT/report.json;
`nvfp4 convert --recipe OUT/report.json` runs it again (flags given on the command line override it)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nvfp4.converter.config import QuantConfig
from nvfp4.converter.layout import TARGETS, canonical_target
from nvfp4.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ConvertRecipe:
    quant: QuantConfig = field(default_factory=QuantConfig)
    targets: tuple[str, ...] = TARGETS
    calib_data: str = "self"
    calib_tokens: int = 2048
    seed: int = 0
    dtype: str = "bfloat16"
    training: dict | None = None  # the training stage's settings (its package reads them back); None: PTQ only

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(canonical_target(t) for t in self.targets))
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise UserError(
                f"unknown target(s) {', '.join(unknown) or '(none)'} in `targets`; choose from {', '.join(TARGETS)}",
                field="targets",
            )
        if self.dtype not in DTYPES:
            raise UserError(f"unknown `dtype` {self.dtype}; choose from {', '.join(DTYPES)}", field="dtype")
        if self.calib_tokens <= 0:
            raise UserError(f"`calib_tokens` must be positive, got {self.calib_tokens}", field="calib_tokens")

    def to_dict(self) -> dict:
        return {
            "quant": self.quant.to_dict(),
            "targets": list(self.targets),
            "calib_data": self.calib_data,
            "calib_tokens": self.calib_tokens,
            "seed": self.seed,
            "dtype": self.dtype,
            "training": self.training,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ConvertRecipe":
        try:
            return cls(**{**data, "quant": QuantConfig.from_dict(data.get("quant", {}))})
        except (TypeError, ValueError) as error:
            raise UserError(f"not a convert recipe: {error}") from error

    @classmethod
    def load(cls, path: Path) -> "ConvertRecipe":
        """From a recipe file, or from a convert's report.json (its `recipe`)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read the recipe {path}: {error}") from error
        if not isinstance(data, dict):
            raise UserError(f"{path} holds no recipe")
        data = data.get("recipe", data)
        if not isinstance(data, dict):
            raise UserError(f"{path} holds no recipe")
        return cls.from_dict(data)
