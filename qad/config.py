"""QADConfig: the recipe of one QAD (or QAT) pass, checked up front and written into the log."""

from dataclasses import asdict, dataclass

from nvfp4.errors import UserError

LOSSES = ("kl", "ce")
MODES = ("global", "layer", "layer+global")  # whole-model KL; layer-local output matching; the first, then the second


@dataclass(frozen=True)
class QADConfig:
    steps: int | None = None  # None: as many as `budget_minutes` allows; 0: no training
    lr: float = 1e-5  # peak; 1e-6 is the recommendation for SFT-only models on long runs
    scale_lr: float = 3e-3  # peak LR of the learned block scales' logarithms; 0: the scales stay fixed
    batch: int = 1  # at a fixed LR, more (noisier) steps per budget recover more (docs/BENCHMARKS.md)
    seq_len: int = 128
    budget_minutes: float = 8.0  # end to end, the whole convert included
    data: str = "self"  # self | random | PATH
    loss: str = "kl"  # kl = QAD (forward KL to the teacher, T=1); ce = plain QAT
    seed: int = 0
    warmup_fraction: float = 0.1
    min_lr_fraction: float = 0.1  # cosine decays to this fraction of the peak
    grad_clip: float = 1.0
    reuse: int = 2  # each generated sequence is trained on this many times (in different batches)
    checkpoint_every: int | None = None  # steps between checkpoints; None: by time, every checkpoint_seconds
    checkpoint_seconds: float = 60.0  # a checkpoint is ~3x the trained weights: not every small CPU step
    kl_chunk_tokens: int = 256
    mode: str = "global"
    layer_fraction: float = 0.5  # layer+global: the layer-local stage's share of the training window
    layer_lr: float = 1e-3  # layer-local: the weights' LR (Adam, constant) as a fraction of each weight's RMS
    layer_scale_lr: float = 1e-3  # layer-local: the block scales' logarithms' LR
    version: int = 1

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 0:
            _refuse("steps", f"must be >= 0, got {self.steps}")
        if self.loss not in LOSSES:
            _refuse("loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in (
            "lr",
            "batch",
            "seq_len",
            "budget_minutes",
            "reuse",
            "checkpoint_every",
            "checkpoint_seconds",
            "kl_chunk_tokens",
        ):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                _refuse(name, f"must be positive, got {getattr(self, name)}")
        if self.mode not in MODES:
            _refuse("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < self.layer_fraction < 1:
            _refuse("layer_fraction", f"must be in (0, 1), got {self.layer_fraction}")
        if self.scale_lr < 0:
            _refuse("scale_lr", f"must be >= 0, got {self.scale_lr}")
        if self.seq_len < 8:
            _refuse("seq_len", f"must be at least 8, got {self.seq_len}")

    def to_dict(self) -> dict:
        return asdict(self)


def _refuse(name: str, problem: str) -> None:
    raise UserError(f"`qad.{name}` {problem}", field=f"qad.{name}")
