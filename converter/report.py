"""Report: what a convert wrote into OUT/report.json (and report.md), read back by serve, eval and the UI."""

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from nvfp4.converter.models import DEFAULT_MODEL_NAME
from nvfp4.errors import UserError

FILE_NAME = "report.json"


@dataclass(frozen=True)
class Report:
    source: str | None  # what the user named (None: the embedded default model)
    source_dir: str  # the Hugging Face folder it was read from
    model: str  # its architecture
    scheme: str
    quant_config: dict
    nvfp4_parameter_share: float
    high_precision_modules: list[str]
    targets: list[str]
    calibration: dict | None
    seed: int
    sizes_bytes: dict[str, int]
    size_vs_bf16: dict[str, float]
    timings_seconds: dict[str, float]  # stages one after the other; "export" writes the targets at once
    export_seconds: dict[str, float | None]
    qad: dict | None  # the training stage's section
    accuracy: dict | None  # {"results": {row: metrics}, "table": text}
    config: dict  # the run's settings (converter/pipeline.py ConvertConfig)
    recipe: dict = field(default_factory=dict)  # converter/recipe.py ConvertRecipe (absent from older reports)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise UserError(f"a convert report without {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls, out: Path) -> "Report":
        """OUT/report.json; a missing, unreadable or foreign file is one UserError naming it."""
        path = Path(out) / FILE_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read {path}: {error}") from error
        if not isinstance(data, dict):
            raise UserError(f"{path} is not a convert report")
        try:
            return cls.from_dict(data)
        except UserError as error:
            raise UserError(f"{path}: {error}") from error

    def save(self, folder: Path) -> None:
        (folder / FILE_NAME).write_text(json.dumps(self.to_dict(), indent=2))
        (folder / "report.md").write_text(self.markdown())

    def markdown(self) -> str:
        quant = self.quant_config
        lines = [
            "# NVFP4 conversion report",
            "",
            f"- model: `{self.model}` from `{self.source or 'embedded ' + DEFAULT_MODEL_NAME}`",
            f"- scheme: `{self.scheme}` (scale search: `{quant['scale_search']}`, rounding: "
            f"`{quant.get('rounding', 'nearest')}`, smoothing alpha: `{quant.get('smooth_alpha', 0.0)}`)",
            f"- parameters in NVFP4: {100 * self.nvfp4_parameter_share:.1f}%; kept in high precision: "
            + ", ".join(f"`{n}`" for n in _condensed(self.high_precision_modules)),
            "",
            "| target | bytes | vs BF16 | export seconds |",
            "|---|---:|---:|---:|",
            f"| bf16 (teacher) | {self.sizes_bytes['bf16']:,} | 1.000 | |",
        ]
        seconds = {t: "written layer by layer" if s is None else f"{s:.1f}" for t, s in self.export_seconds.items()}
        lines += [
            f"| {t} | {self.sizes_bytes[t]:,} | {self.size_vs_bf16[t]:.3f} | {seconds[t]} |" for t in self.targets
        ]
        lines += ["", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {name} | {seconds:.1f} |" for name, seconds in self.timings_seconds.items()]
        if self.accuracy:
            lines += ["", "## Accuracy vs the teacher (held-out)", "", "```", self.accuracy["table"], "```"]
        return "\n".join(lines) + "\n"


def _condensed(names: list[str]) -> list[str]:
    """Module names with layer numbers folded: `model.layers.*.mlp.gate` once, not once per layer."""
    return list(dict.fromkeys(re.sub(r"\.layers\.\d+\.", ".layers.*.", n) for n in names))
