"""QAD as training stages of the convert pipeline (converter/stages.py `TrainingStage`), one class a mode:

- `GlobalQAD`: forward KL(teacher || student) of the whole model (qad/distill.py), resumable;
- `LayerQAD`: each decoder layer trained to its teacher layer's output (qad/layerlocal.py); it streams with
  the layer-by-layer PTQ of models larger than memory;
- `LayerThenGlobalQAD`: the first for `layer_fraction` of the window, then the second.

A budgeted pass (QADConfig.steps None) ends early enough that the whole convert, from `started` to the end of
the report's evaluation, fits `budget_minutes`: the pipeline passes what it still does after training as
`reserve_seconds`.
"""

import time
from dataclasses import dataclass, field

from torch import Tensor, nn

from nvfp4.converter.stages import (
    TRAINING_STAGES,
    Requirements,
    TrainingContext,
    TrainingStage,
    register_training_stage,
)
from nvfp4.qad.config import QADConfig
from nvfp4.qad.distill import run_qad
from nvfp4.qad.layerlocal import LayerResult, distill_layers, summary, train_layer

EXPORT_RESERVE_SECONDS = 20  # the exports after QAD
OPTIMIZER_BYTES_PER_WEIGHT = 12  # gradient and AdamW's two moments, fp32


@dataclass
class QADStage(TrainingStage):
    cfg: QADConfig
    started: float = field(default_factory=time.monotonic)  # when the convert began (the budget's start)
    resume: bool = False

    @property
    def requirements(self) -> Requirements:
        return Requirements(
            whole_model=self.whole_model,
            per_layer=self.per_layer,
            batch=self.cfg.batch,
            seq_len=self.cfg.seq_len,
            resume=self.resume,
            state_bytes_per_weight=OPTIMIZER_BYTES_PER_WEIGHT if self.whole_model else 0,
            row="QAT" if self.cfg.loss == "ce" else "QAD",
            without="--qad-steps 0",
            streamed="--qad-mode layer",
            batch_flag="--qad-batch",
        )

    whole_model = True
    per_layer = False

    def __post_init__(self) -> None:  # a subclass's own state
        pass

    def settings(self) -> dict:
        return self.cfg.to_dict()

    @property
    def budgeted(self) -> bool:
        return self.cfg.steps is None

    def deadline(self, reserve_seconds: float = 0.0) -> float:
        """When a budgeted pass must end (time.monotonic)."""
        return self.started + self.cfg.budget_minutes * 60 - EXPORT_RESERVE_SECONDS - reserve_seconds

    def _global(self, ctx: TrainingContext) -> dict:
        return run_qad(
            ctx.student,
            ctx.teacher,
            ctx.tokenizer,
            self.cfg,
            ctx.workdir,
            ctx.logdir,
            resume=self.resume,
            deadline=self.deadline(ctx.reserve_seconds),
        )


@register_training_stage("global")
class GlobalQAD(QADStage):
    def train(self, ctx: TrainingContext) -> dict:
        return self._global(ctx)


@register_training_stage("layer")
class LayerQAD(QADStage):
    whole_model = False
    per_layer = True

    def __post_init__(self) -> None:
        self.results: list[LayerResult] = []

    def train(self, ctx: TrainingContext) -> dict:
        deadline = self.deadline(ctx.reserve_seconds) if self.budgeted else None
        metrics = distill_layers(ctx.student, ctx.teacher, ctx.calibration, self.cfg, deadline)
        return {"config": self.cfg.to_dict(), "steps": metrics["steps"], "layer_local": metrics}

    def train_layer(
        self,
        layer: nn.Module,
        index: int,
        layers: int,
        inputs: list[Tensor],
        targets: list[Tensor],
        arguments: list[tuple],
    ) -> None:
        seconds = max(0.0, (self.deadline() - time.monotonic()) / (layers - index)) if self.budgeted else None
        self.results.append(
            train_layer(
                layer,
                inputs,
                targets,
                arguments,
                self.cfg,
                seconds,
                None if self.budgeted else self.cfg.steps,
                seed=self.cfg.seed + index,
            )
        )

    def summary(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "steps": sum(r.steps for r in self.results),
            "layer_local": summary(self.results),
        }


@register_training_stage("layer+global")
class LayerThenGlobalQAD(QADStage):
    per_layer = True

    def train(self, ctx: TrainingContext) -> dict:
        now = time.monotonic()
        layer_deadline = now + (self.deadline(ctx.reserve_seconds) - now) * self.cfg.layer_fraction
        layer_metrics = distill_layers(
            ctx.student, ctx.teacher, ctx.calibration, self.cfg, layer_deadline if self.budgeted else None
        )
        return {**self._global(ctx), "layer_local": layer_metrics}


def qad_stage(cfg: QADConfig, started: float, resume: bool = False) -> QADStage | None:
    """The stage of `cfg.mode`, or None when it trains no step (steps 0: PTQ only)."""
    if cfg.steps == 0:
        return None
    return TRAINING_STAGES[cfg.mode](cfg, started, resume)
