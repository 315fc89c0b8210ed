"""QAD's flags of `nvfp4 convert`, registered with the converter's command (converter/stages.py
`register_training_flags`): the converter's CLI lists them and hands their values back to `training_from_flags`."""

import os

import click

from nvfp4.converter.stages import TrainingFlags, register_training_flags
from nvfp4.errors import UserError
from nvfp4.qad.config import MODES, QADConfig
from nvfp4.qad.stages import QADStage, qad_stage

OPTIONS = [
    click.Option(["--qad-steps"], type=int, default=None, help="0 = PTQ only; default: as many as the budget allows."),
    click.Option(["--qad-lr"], type=float, default=None, help="Peak learning rate (cosine decay with warmup)."),
    click.Option(
        ["--qad-scale-lr"],
        type=float,
        default=None,
        help="Peak learning rate of the block scales (trained as logarithms, LSQ-style); default 3e-3, "
        "0 = fixed scales.",
    ),
    click.Option(["--qad-batch"], type=int, default=None),
    click.Option(["--qad-seq-len"], type=int, default=None),
    click.Option(["--qad-budget-minutes"], type=float, default=None),
    click.Option(["--qad-data"], default=None, help="self | random | PATH (txt or JSONL)."),
    click.Option(
        ["--loss"],
        type=click.Choice(["kl", "ce"]),
        default=None,
        help="kl = QAD (forward KL to the teacher, the default); ce = plain QAT.",
    ),
    click.Option(
        ["--qad-mode"],
        type=click.Choice(MODES),
        default=None,
        help="global = KL of the whole model (default); layer = each decoder layer trained to match its "
        "teacher layer's output, one after another; layer+global = the first, then the second.",
    ),
    click.Option(
        ["--qad-layer-fraction"], type=float, default=None, help="layer+global: the layer stage's share (0.5)."
    ),
    click.Option(
        ["--qad-checkpoint-every"],
        type=int,
        default=None,
        help="Steps between QAD checkpoints (for --resume); default: one a minute.",
    ),
    click.Option(["--resume"], is_flag=True, help="Continue an interrupted QAD run from its last checkpoint."),
]
FIELDS = {
    "qad_steps": "steps",
    "qad_lr": "lr",
    "qad_scale_lr": "scale_lr",
    "qad_batch": "batch",
    "qad_seq_len": "seq_len",
    "qad_budget_minutes": "budget_minutes",
    "qad_data": "data",
    "loss": "loss",
    "qad_mode": "mode",
    "qad_layer_fraction": "layer_fraction",
    "qad_checkpoint_every": "checkpoint_every",
}


def qad_config(values: dict, seed: int, base: dict | None = None) -> QADConfig | None:
    """QADConfig from a recipe's settings (`base`) and the flags given; None for PTQ only (--qad-steps 0)."""
    given = {FIELDS[k]: v for k, v in values.items() if k in FIELDS and v is not None}
    settings = {**(base or {}), **given, "seed": seed}
    if settings.get("steps") == 0:
        return None
    return QADConfig(**settings)


def quant_defaults(values: dict, scheme: str) -> dict:
    """What a QAD pass changes in the quantization's defaults: mse-act block scales when it learns them (the best
    start measured, docs/BENCHMARKS.md), else amax (ModelOpt's bytes); smoothing 0.5 when it trains a W4A4
    student (it lowers the activations' share of the error), else 0."""
    steps, scale_lr = values["qad_steps"], values["qad_scale_lr"]
    learns_scales = steps != 0 and (QADConfig.scale_lr if scale_lr is None else scale_lr) > 0
    return {
        "scale_search": "mse-act" if learns_scales else "amax",
        "smooth_alpha": 0.5 if scheme == "nvfp4" and steps != 0 else 0.0,
    }


def training_from_flags(values: dict, seed: int, started: float, base: dict | None = None) -> QADStage | None:
    cfg = qad_config(values, seed, base)
    if cfg is None:
        return None
    if cfg.mode != "global" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            f"--qad-mode {cfg.mode} trains layer by layer in one process; run it without torchrun, "
            "or use --qad-mode global across GPUs"
        )
    return qad_stage(cfg, started, values["resume"])


def flags_from_settings(settings: dict | None) -> dict:
    """A recipe's QAD settings as flag values (None: no QAD, --qad-steps 0)."""
    if settings is None:
        return {"qad_steps": 0}
    return {flag: settings[field] for flag, field in FIELDS.items() if field in settings}


FLAGS = {f"qad.{field}": "--" + flag.replace("_", "-") for flag, field in FIELDS.items()}
register_training_flags(TrainingFlags(OPTIONS, training_from_flags, quant_defaults, flags_from_settings, FLAGS))
