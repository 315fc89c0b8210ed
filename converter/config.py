"""QuantConfig: the one description of a quantization, written into every checkpoint we produce."""

import fnmatch
from dataclasses import asdict, dataclass, field

from nvfp4.errors import UserError

SCHEMES = ("nvfp4", "nvfp4-a16")  # W4A4 (Blackwell) and weight-only (Hopper, Ampere)
# A field's choices: ModelOpt's rule (amax scales, nearest rounding), then the names the stages that implement the
# others register (converter/stages.py: mse, mse-act, gptq)
CHOICES: dict[str, list[str]] = {"scale_search": ["amax"], "rounding": ["nearest"]}
EXPERT_CALIBRATIONS = ("all", "routed")  # MoE: every expert sees every calibration token, or only the routed ones
DEFAULT_EXCLUDE = ("lm_head", "*embed_tokens*", "*router*", "*.mlp.gate", "*.block_sparse_moe.gate")
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class QuantConfig:
    scheme: str = "nvfp4"
    exclude: tuple[str, ...] = ()  # fnmatch patterns on module names, on top of DEFAULT_EXCLUDE
    scale_search: str = "amax"
    rounding: str = "nearest"
    smooth_alpha: float = 0.0  # 0 = off; else SmoothQuant's migration strength, folded in (converter/smoothing.py)
    expert_calibration: str = "all"  # "routed" = ModelOpt's statistics (rarely picked experts see few tokens)
    group_size: int = 16
    version: int = 1
    default_exclude: tuple[str, ...] = field(default=DEFAULT_EXCLUDE)

    def __post_init__(self) -> None:
        for name, choices in (
            ("scheme", SCHEMES),
            ("scale_search", CHOICES["scale_search"]),
            ("rounding", CHOICES["rounding"]),
            ("expert_calibration", EXPERT_CALIBRATIONS),
        ):
            if getattr(self, name) not in choices:
                raise UserError(
                    f"unknown `{name}` {getattr(self, name)!r}; choose one of {', '.join(choices)}", field=name
                )
        if not 0 <= self.smooth_alpha < 1:
            raise UserError(f"`smooth_alpha` must be in [0, 1), got {self.smooth_alpha}", field="smooth_alpha")
        if self.group_size != 16:
            raise UserError("NVFP4 uses blocks of 16 elements: `group_size` must be 16", field="group_size")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "default_exclude", tuple(self.default_exclude))

    @property
    def quantize_activations(self) -> bool:
        return self.scheme == "nvfp4"

    @property
    def quant_algo(self) -> str:
        """ModelOpt's name for the scheme (hf_quant_config.json)."""
        return "NVFP4" if self.quantize_activations else "W4A16_NVFP4"

    def is_excluded(self, module_name: str) -> bool:
        return any(fnmatch.fnmatchcase(module_name, p) or module_name == p for p in self.exclude + self.default_exclude)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
